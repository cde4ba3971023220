"""The hub's MQTT side: one worker that ingests what devices publish and answers with receipts.

::

    store = HubStore(path="hub.db")
    with HubWorker(store, broker_url="mqtt://127.0.0.1:1883") as worker:
        ...                                  # worker.stats() while it runs

One paho client (callback API version 2; its callbacks only enqueue) subscribes with QoS 1 to
``$share/<group>/edgefleet/v1/+/{telemetry,state,ack}`` (:func:`fleet_protocol.topics.
hub_subscriptions`), so several workers of one group split the fleet. An ingest thread drains
the queue in batches (up to ``batch_max`` messages or ``batch_wait`` seconds after the first),
calls ``store.ingest`` once per batch, and only after that commit publishes one
:class:`~fleet_protocol.messages.Receipt` per device (QoS 1) and acknowledges the batch to the
broker.

Delivery (DESIGN, "Delivery and durability"), and why each choice:

- **Ack after commit.** The client runs with ``manual_ack=True``: the broker gets its PUBACK for
  a message only after the batch holding it is committed. A hub killed with SIGKILL mid-batch
  leaves those messages unacknowledged in its persistent session, and the broker delivers them
  again when the worker comes back (Mosquitto does; see embedded_broker for amqtt, which does
  not). Redelivered copies are harmless: the store counts each (device, seq) once.
- **The device's resend is the guarantee**, the ack is the fast path. A broker killed with
  SIGKILL loses what it had not saved, and a queue can expire; the agent keeps every batch in
  its outbox until a receipt names it and resends it, so nothing depends on the broker's memory.
- **Receipts only after commit**, so a receipt never names a batch the store could still lose.
- **A persistent session** (MQTT 5: ``clean_start=False`` and a session expiry, an hour by
  default; 3.1.1: ``clean_session=False``) under a stable client id, so what arrives while the
  worker restarts or crashed waits in the broker for it. Give each worker its own id: two
  clients with one id take the session from each other in turn. Mosquitto 2.0 keeps routing a
  shared subscription's share to a member whose session is offline (measured here), so a
  shared worker's clean :meth:`HubWorker.stop` unsubscribes first and ends its session: a
  worker that scales down hands its share to the others instead of taking it into a queue
  nobody reads (with no other worker, the devices resend what came meanwhile). After a crash
  the share waits at most the session expiry; meanwhile the devices' resends of it are split
  again among the group, so its gaps fill over a few resend rounds.
- **Bounded queue, bounded in flight.** MQTT 5's Receive Maximum (``inflight``) caps how many
  unacknowledged messages the broker sends, and the queue holds at least that many, so the
  callback never waits. With 3.1.1 the broker's own limit applies (Mosquitto's
  ``max_inflight_messages``); if the queue ever fills, the callback waits, which stops reading
  from the socket (back-pressure) rather than dropping a message.
- **Acks of an earlier connection are not sent** on a later one: packet ids restart with a lost
  session, so a stale ack could acknowledge a message that is not stored. The broker redelivers
  those messages instead.
- **Reconnect** with exponential backoff and jitter (each wait uniform in [d/2, d]), so workers
  restarted together do not reconnect in step.

A message the store rejects (malformed, oversized, wrong version, foreign topic) is counted and
logged with its device id, at most ``log_burst`` lines at once and one per ``log_every`` seconds
after that (a flood cannot fill the disk; the counters keep the exact numbers).
"""

from __future__ import annotations

import logging
import queue
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol
from urllib.parse import urlsplit

from cloud_hub.errors import HubStoreError
from fleet_protocol import messages, topics

if TYPE_CHECKING:
    from cloud_hub.ingest import IngestResult

__all__ = ["STAT_KEYS", "BrokerAddress", "HubWorker", "IngestingStore", "default_client_id",
           "parse_broker_url"]

log = logging.getLogger(__name__)

MqttVersion = Literal["auto", 5, 311]
#: CONNACK reason "Unsupported protocol version" (a 3.1.1 broker's answer to an MQTT 5 CONNECT)
_UNSUPPORTED_PROTOCOL = 132
#: DISCONNECT reason "Session taken over": another client connected with our client id
_SESSION_TAKEN_OVER = 142
#: long enough to ride out a restart; short, because Mosquitto keeps routing a shared
#: subscription's share to a member that crashed, until its session expires
DEFAULT_SESSION_EXPIRY = 3600


class IngestingStore(Protocol):
    """What the worker needs of a store (cloud_hub.store.HubStore is one)."""

    def ingest(self, messages: Sequence[tuple[str, bytes]], *, now: float,
               worker: str = "") -> IngestResult: ...


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://host[:1883]`` or ``mqtts://host[:8883]`` (TLS); ValueError naming the URL.

    Credentials go in ``username``/``password``, never in the URL (URLs end up in logs)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"broker URL {url!r}: expected mqtt://host:port or mqtts://host:port "
                         "(TLS)")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as err:
        raise ValueError(f"broker URL {url!r}: bad port ({err})") from None
    if not parts.hostname:
        raise ValueError(f"broker URL {url!r} names no host (e.g. mqtt://127.0.0.1:1883)")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"broker URL {url.split('@')[-1]!r}: put the user name and password "
                         "in their own settings, not in the URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"broker URL {url!r}: expected only scheme, host and port")
    return BrokerAddress(parts.hostname, port, tls)


#: the keys of :meth:`HubWorker.stats`
STAT_KEYS = ("received", "ingested_batches", "stored", "duplicates", "rejected", "conflicts",
             "receipts_sent", "store_errors", "connects", "connected", "subscribed", "queued")


class _Received(NamedTuple):
    generation: int
    mid: int
    qos: int
    topic: str
    payload: bytes


class _RateLimit:
    """At most ``burst`` events at once, then one per ``every`` seconds; counts the rest."""

    def __init__(self, burst: int, every: float, clock: Callable[[], float]) -> None:
        self.burst, self.every, self.clock = burst, every, clock
        self.tokens = float(burst)
        self.last = clock()
        self.suppressed = 0

    def allow(self) -> bool:
        now = self.clock()
        self.tokens = min(float(self.burst), self.tokens + (now - self.last) / self.every)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        n, self.suppressed = self.suppressed, 0
        return n


def default_client_id(group: str) -> str:
    """``edgefleet-hub-<group>-<hostname>``: stable across restarts of this machine's hub."""
    host = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname())
    return f"edgefleet-hub-{group}-{host or 'host'}"[:128]


class HubWorker:
    """One hub worker: broker subscription → batched ``store.ingest`` → receipts and acks.

    ``broker_url`` is ``mqtt://host:port`` (``mqtts://`` for TLS, with ``ca_certs`` or the
    system's CAs, and ``certfile``/``keyfile`` for a client certificate). ``mqtt_version`` is
    5, 311 (3.1.1) or ``"auto"``: MQTT 5 unless the broker refuses it, as the embedded amqtt
    broker does (one probe before the first connection). ``shared`` subscribes through
    ``$share/<group>/...``; ``None`` (the default) means "when the connection is MQTT 5":
    shared subscriptions are an MQTT 5 feature, and a broker that refuses MQTT 5 is taken not
    to have them (amqtt treats ``$share/...`` as a literal filter that matches nothing).
    Without them every worker gets every message: run one.
    ``client_id`` must be stable across restarts (the broker keeps the session under it) and
    unique per worker; the default is ``edgefleet-hub-<group>-<hostname>``.
    """

    def __init__(self, store: IngestingStore, *, broker_url: str, group: str = "hub",
                 client_id: str | None = None, username: str | None = None,
                 password: str | None = None, ca_certs: str | Path | None = None,
                 certfile: str | Path | None = None, keyfile: str | Path | None = None,
                 mqtt_version: MqttVersion = "auto", shared: bool | None = None,
                 batch_max: int = 500, batch_wait: float = 0.05, inflight: int = 1000,
                 session_expiry: int = DEFAULT_SESSION_EXPIRY, keepalive: int = 30,
                 reconnect_min: float = 0.5, reconnect_max: float = 30.0,
                 log_burst: int = 20, log_every: float = 1.0,
                 clock: Callable[[], float] = time.time, seed: int | None = None) -> None:
        if mqtt_version not in ("auto", 5, 311):
            raise ValueError(f"mqtt_version {mqtt_version!r} is not 'auto', 5 or 311")
        if not 1 <= batch_max <= 100_000:
            raise ValueError(f"batch_max {batch_max} is not between 1 and 100000")
        if not 0.0 <= batch_wait <= 60.0:
            raise ValueError(f"batch_wait {batch_wait} is not between 0 and 60 seconds")
        if not 1 <= inflight <= 65_535:
            raise ValueError(f"inflight {inflight} is not between 1 and 65535 (MQTT 5 Receive "
                             "Maximum)")
        if not 0 < reconnect_min <= reconnect_max:
            raise ValueError(f"reconnect_min {reconnect_min} must be > 0 and <= reconnect_max "
                             f"{reconnect_max}")
        topics.hub_subscriptions(group)  # TopicError for a bad group name, now
        self.store = store
        self.address = parse_broker_url(broker_url)
        if (ca_certs or certfile or keyfile) and not self.address.tls:
            raise ValueError(f"TLS files are given but broker URL {broker_url!r} is not "
                             "mqtts://")
        if (certfile is None) != (keyfile is None):
            raise ValueError("certfile and keyfile go together (a client certificate)")
        self.broker_url = broker_url
        self.group = group
        self.client_id = client_id or default_client_id(group)
        self.username, self.password = username, password
        self.ca_certs, self.certfile, self.keyfile = ca_certs, certfile, keyfile
        self.mqtt_version: MqttVersion = mqtt_version
        self.shared = shared
        self.batch_max, self.batch_wait, self.inflight = batch_max, batch_wait, inflight
        self.session_expiry, self.keepalive = session_expiry, keepalive
        self.reconnect_min, self.reconnect_max = reconnect_min, reconnect_max
        self.clock = clock
        self._random = random.Random(seed)
        # the receive maximum bounds what is unacknowledged, so this never fills with MQTT 5
        self._queue: queue.Queue[_Received] = queue.Queue(maxsize=max(inflight, batch_max) * 2)
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(STAT_KEYS, 0)
        self._generation = 0
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._accepting = True
        self._stop_net = threading.Event()
        self._stop_ingest = threading.Event()
        self._net_thread: threading.Thread | None = None
        self._ingest_thread: threading.Thread | None = None
        self._last_error = ""
        self._pending: list[Any] = []  # MQTTMessageInfo of receipts the broker has not taken
        self._reject_log = _RateLimit(log_burst, log_every, time.monotonic)
        self._error_log = _RateLimit(5, 10.0, time.monotonic)
        self._v5 = mqtt_version != 311
        self._probed = mqtt_version != "auto"
        self._subscribe_mid: int | None = None
        self._unsubscribe_mid: int | None = None
        self._unsubscribed = threading.Event()
        self._keep_session = True
        self._client = self._make_client()

    @property
    def filters(self) -> tuple[str, ...]:
        """The topic filters this worker subscribes to (they depend on the MQTT version)."""
        shared = self._v5 if self.shared is None else self.shared
        if shared:
            return topics.hub_subscriptions(self.group)
        return tuple(f"{topics.PROTOCOL}/+/{kind}" for kind in topics.DEVICE_KINDS)

    # --- paho adapter -------------------------------------------------------------------

    def _make_client(self) -> Any:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311,
                             clean_session=None if self._v5 else False, manual_ack=True)
        self._credentials(client)
        # receipts: a few per batch; paho holds the rest in memory until the broker takes them
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        client.on_message = self._on_message
        return client

    def _disconnect_properties(self) -> Any:
        if not self._v5 or self._keep_session:
            return None
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.DISCONNECT)
        props.SessionExpiryInterval = 0  # the session ends here: the broker queues nothing
        return props

    def _credentials(self, client: Any) -> None:
        if self.username is not None:
            client.username_pw_set(self.username, self.password)
        if self.address.tls:
            client.tls_set(ca_certs=str(self.ca_certs) if self.ca_certs else None,
                           certfile=str(self.certfile) if self.certfile else None,
                           keyfile=str(self.keyfile) if self.keyfile else None,
                           cert_reqs=ssl.CERT_REQUIRED)

    def _connect(self) -> None:
        host, port = self.address.host, self.address.port
        if not self._v5:
            self._client.connect(host, port, self.keepalive)
            return
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry
        props.ReceiveMaximum = self.inflight
        self._client.connect(host, port, self.keepalive, clean_start=False, properties=props)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any,
                    properties: Any) -> None:
        if reason_code.is_failure:
            if self._error_log.allow():
                log.error("broker %s refused worker %s: %s", self.broker_url, self.client_id,
                          reason_code)
            return
        with self._lock:
            self._generation += 1
            self._counts["connects"] += 1
        self._connected.set()
        filters = self.filters
        log.info("worker %s connected to %s with MQTT %s (session present: %s); subscribing "
                 "to %s", self.client_id, self.broker_url, "5" if self._v5 else "3.1.1",
                 flags.session_present, ", ".join(filters))
        _, self._subscribe_mid = client.subscribe([(f, 1) for f in filters])

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reason_codes: Any,
                      properties: Any) -> None:
        failed = [(f, rc) for f, rc in zip(self.filters, reason_codes, strict=False)
                  if rc.is_failure]
        for f, rc in failed:
            log.error("broker %s refused the subscription %s of worker %s: %s (check the "
                      "broker's ACL for this user)", self.broker_url, f, self.client_id, rc)
        if mid == self._subscribe_mid and not failed:
            self._subscribed.set()

    def _on_unsubscribe(self, client: Any, userdata: Any, mid: int, reason_codes: Any,
                        properties: Any) -> None:
        if mid == self._unsubscribe_mid:
            self._unsubscribed.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any) -> None:
        self._connected.clear()
        self._subscribed.clear()
        if self._stop_net.is_set() or not self._error_log.allow():
            return
        if getattr(reason_code, "value", None) == _SESSION_TAKEN_OVER:
            log.error("worker %s: another client connected to %s with the same client id and "
                      "took this session; give each hub worker its own client id "
                      "(--client-id, broker.client_id)", self.client_id, self.broker_url)
        else:
            log.warning("worker %s lost the broker %s: %s", self.client_id, self.broker_url,
                        reason_code)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if not self._accepting:
            return  # stopping: left unacknowledged, so the broker delivers it again
        item = _Received(self._generation, msg.mid, msg.qos, msg.topic, bytes(msg.payload))
        while True:
            try:
                self._queue.put(item, timeout=0.5)
                break
            except queue.Full:
                if not self._accepting:
                    return
        with self._lock:
            self._counts["received"] += 1

    # --- network thread: connect, loop, reconnect with jittered backoff -------------------

    def _backoff(self, attempt: int) -> float:
        d = min(self.reconnect_max, self.reconnect_min * 2.0 ** min(attempt, 30))
        return self._random.uniform(d / 2, d)

    def _network_loop(self) -> None:
        import paho.mqtt.client as mqtt

        attempt = 0
        while not self._stop_net.is_set():
            generation = self._generation
            try:
                if not self._probed:
                    self._probe()
                self._connect()
            except (OSError, ssl.SSLError) as err:
                if self._error_log.allow():
                    log.warning("worker %s cannot reach the broker %s: %s", self.client_id,
                                self.broker_url, err)
            else:
                stop_by = None
                while self._client.loop(timeout=0.2) == mqtt.MQTT_ERR_SUCCESS:
                    if not self._stop_net.is_set():
                        continue
                    if stop_by is None:  # DISCONNECT from this thread, after the acks queued
                        self._client.disconnect(properties=self._disconnect_properties())
                        stop_by = time.monotonic() + 2.0
                    elif time.monotonic() > stop_by:
                        break
                if self._stop_net.is_set():
                    break
            if self._generation != generation:
                attempt = 0  # a CONNACK came: start the backoff again from the bottom
            self._stop_net.wait(self._backoff(attempt))
            attempt += 1
        self._connected.clear()
        self._subscribed.clear()

    def _probe(self) -> None:
        """Find out whether the broker speaks MQTT 5 (``mqtt_version="auto"``), before the first
        real connection: a throwaway CONNECT (clean start, no session, no properties) that a
        3.1.1-only broker answers with "unsupported protocol version". amqtt cannot be asked
        with the real CONNECT: it never answers one that carries MQTT 5 properties.
        OSError when the broker cannot be reached or does not answer."""
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        probe = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                            client_id=f"edgefleet-probe-{self._random.getrandbits(48):012x}")
        self._credentials(probe)
        answer: list[Any] = []
        probe.on_connect = lambda c, u, f, rc, p: answer.append(rc)
        probe.connect(self.address.host, self.address.port, keepalive=10, clean_start=True)
        deadline = time.monotonic() + 10.0
        try:
            while not answer and time.monotonic() < deadline and not self._stop_net.is_set():
                if probe.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
                    break
            probe.disconnect()  # a refused CONNECT has closed the socket already
            probe.loop(timeout=0.1)
        finally:
            if probe.socket() is not None:
                probe._sock_close()  # no answer: paho has no public way to drop the socket
        if not answer:
            raise OSError("no CONNACK to an MQTT 5 CONNECT")
        self._probed = True
        if answer[0].value == _UNSUPPORTED_PROTOCOL:
            log.warning("broker %s does not speak MQTT 5: worker %s uses MQTT 3.1.1%s",
                        self.broker_url, self.client_id,
                        ", without a shared subscription (run one worker)"
                        if self.shared is None else "")
            self._v5 = False
            self._client = self._make_client()

    # --- ingest thread: batch, commit, then receipts and acks -----------------------------

    def _next_batch(self) -> list[_Received]:
        try:
            first = self._queue.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.batch_wait
        while len(batch) < self.batch_max:
            remaining = deadline - time.monotonic()
            try:
                batch.append(self._queue.get(timeout=remaining) if remaining > 0
                             else self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _ingest_loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch:
                self._handle(batch)
            elif self._stop_ingest.is_set():
                return

    def _handle(self, batch: list[_Received]) -> None:
        """Store a batch, then receipt and ack it. A batch the store keeps refusing is split in
        halves (each retried on its own) until the message it chokes on is alone; that one is
        recorded as "unstorable" and acked when the database meanwhile takes other writes, and
        retried without ack while the database takes nothing (it is down: the broker keeps the
        messages)."""
        result = self._store_with_retries(batch, tries=3 if len(batch) > 1 else 5)
        if result is None and len(batch) > 1 and not self._stop_ingest.is_set():
            half = len(batch) // 2
            self._handle(batch[:half])
            self._handle(batch[half:])
            return
        while result is None:
            if self._stop_ingest.is_set():
                log.error("worker %s stops with %d message(s) not stored; the broker and the "
                          "devices deliver them again", self.client_id, len(batch))
                return
            result = self._unstorable_or_wait(batch[0])
        try:
            self._publish_receipts(result.receipts)
            self._ack(batch)
        except Exception as err:  # committed already: the devices resend what has no receipt
            if self._error_log.allow():
                log.error("worker %s: receipts or acks of a stored batch failed: %s",
                          self.client_id, err, exc_info=True)
        self._count(result, len(batch))

    def _store_with_retries(self, batch: list[_Received], tries: int) -> IngestResult | None:
        for attempt in range(tries):
            try:
                return self.store.ingest([(m.topic, m.payload) for m in batch],
                                         now=self.clock(), worker=self.client_id)
            except Exception as err:  # the store's own errors and any bug: never ack, retry
                with self._lock:
                    self._counts["store_errors"] += 1
                self._last_error = f"{type(err).__name__}: {err}"
                if self._error_log.allow():
                    log.error("worker %s: store.ingest of %d message(s) failed (nothing "
                              "acknowledged): %s", self.client_id, len(batch), err,
                              exc_info=not isinstance(err, HubStoreError))
                if self._stop_ingest.is_set():
                    return None
                self._stop_ingest.wait(min(5.0, 0.1 * 2 ** attempt))
        return None

    def _unstorable_or_wait(self, message: _Received) -> IngestResult | None:
        """One message the store will not take, after its own retries (the store's run_write
        retries transient errors too). Recording it as unstorable is itself a write: if that
        commits, the database takes writes and this message is what it refuses — the result
        acks it; if not, the database is down (or full): wait, and let the caller retry it."""
        record = getattr(self.store, "record_unstorable", None)
        try:
            if record is None:
                raise HubStoreError("this store cannot record unstorable messages")
            result: IngestResult = record(message.topic, message.payload, self._last_error,
                                          now=self.clock(), worker=self.client_id)
            return result
        except Exception as err:
            if self._error_log.allow():
                log.error("worker %s: the database does not answer (%s); retrying, nothing "
                          "acknowledged", self.client_id, err)
            self._stop_ingest.wait(5.0)
            return self._store_with_retries([message], tries=1)

    def _publish_receipts(self, receipts: dict[tuple[str, str], int]) -> None:
        now = self.clock()
        infos = []
        for (device, stream), seq in receipts.items():
            payload = messages.encode(messages.Receipt(device_id=device, stream=stream,
                                                       up_to_seq=seq, ts=now))
            infos.append(self._client.publish(topics.receipt(device), payload, qos=1))
        with self._lock:
            self._counts["receipts_sent"] += len(infos)
            self._pending = [i for i in self._pending if not _published(i)] + infos

    def _ack(self, batch: list[_Received]) -> None:
        generation = self._generation
        for m in batch:
            if m.qos > 0 and m.generation == generation:
                self._client.ack(m.mid, m.qos)

    def _count(self, result: IngestResult, n: int) -> None:
        rejections = result.rejections
        with self._lock:
            c = self._counts
            c["ingested_batches"] += 1
            c["stored"] += result.stored
            c["duplicates"] += result.duplicates
            c["rejected"] += len(rejections)
            c["conflicts"] += result.conflicts
        for r in rejections:
            if self._reject_log.allow():
                suppressed = self._reject_log.take_suppressed()
                log.warning("worker %s rejected a message of %d bytes from device %s on %.200r "
                            "(%s): %.500s%s", self.client_id, r.size, r.device_id or "(unknown)",
                            r.topic, r.kind, r.reason,
                            f" ({suppressed} more rejections not logged)" if suppressed else "")
        log.debug("worker %s: batch of %d: %d stored, %d duplicates, %d rejected",
                  self.client_id, n, result.stored, result.duplicates, len(rejections))

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> HubWorker:
        """Start the network and ingest threads; returns at once (see :meth:`wait_subscribed`)."""
        if self._net_thread is not None:
            return self
        self._accepting = True
        self._net_thread = threading.Thread(target=self._network_loop, daemon=True,
                                            name=f"hub-mqtt-{self.client_id}")
        self._ingest_thread = threading.Thread(target=self._ingest_loop, daemon=True,
                                               name=f"hub-ingest-{self.client_id}")
        self._ingest_thread.start()
        self._net_thread.start()
        return self

    def wait_connected(self, timeout: float | None = None) -> bool:
        """True once connected to the broker, False after ``timeout``."""
        return self._connected.wait(timeout)

    def wait_subscribed(self, timeout: float | None = None) -> bool:
        """True once the broker granted every subscription of the current connection."""
        return self._subscribed.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def stop(self, timeout: float = 10.0, *, keep_session: bool | None = None) -> None:
        """Stop taking messages, store what is queued, send its receipts and acks, disconnect.

        ``keep_session`` True: the broker keeps the session and queues for it until this
        client id comes back (messages arriving during the stop stay unacknowledged there and
        are delivered again). False (MQTT 5): first unsubscribe, so the broker hands new
        messages to the other workers of the group, store and acknowledge everything already
        received, then end the session. Default: keep it unless the subscription is shared —
        Mosquitto would otherwise go on routing this worker's share of the fleet into a queue
        nobody reads (a worker that scales down must not take messages with it).
        """
        if self._net_thread is None:
            return
        deadline = time.monotonic() + timeout
        shared = self.filters[0].startswith("$share/")
        self._keep_session = (keep_session if keep_session is not None else not shared) \
            or not self._v5
        if not self._keep_session and self._client.is_connected():
            self._unsubscribed.clear()
            _, self._unsubscribe_mid = self._client.unsubscribe(list(self.filters))
            if not self._unsubscribed.wait(max(0.1, min(5.0, deadline - time.monotonic()))):
                log.warning("worker %s: no UNSUBACK from %s; stopping anyway", self.client_id,
                            self.broker_url)
        self._accepting = False
        self._stop_ingest.set()
        if self._ingest_thread is not None:
            self._ingest_thread.join(max(0.1, deadline - time.monotonic()))
        while self._client.is_connected() and time.monotonic() < deadline:
            with self._lock:
                self._pending = [i for i in self._pending if not _published(i)]
                if not self._pending:
                    break
            time.sleep(0.01)
        self._stop_net.set()
        self._net_thread.join(max(0.1, deadline - time.monotonic()))
        self._net_thread = self._ingest_thread = None
        self._stop_net.clear()
        self._stop_ingest.clear()
        log.info("worker %s stopped: %s", self.client_id, self.stats())

    def stats(self) -> dict[str, int]:
        """Counters since start (exact, unlike the rate-limited log); keys in STAT_KEYS.

        ``connected`` and ``subscribed`` are 0 or 1, ``queued`` is the queue's depth now.
        """
        with self._lock:
            out = dict(self._counts)
        out["connected"] = int(self._connected.is_set())
        out["subscribed"] = int(self._subscribed.is_set())
        out["queued"] = self._queue.qsize()
        return out

    def __enter__(self) -> HubWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _published(info: Any) -> bool:
    """True once the broker took a receipt, or when there is nothing to wait for: published
    while disconnected (paho resends it after the next CONNACK) or refused by paho."""
    try:
        return bool(info.is_published())
    except (RuntimeError, ValueError):
        return True
