"""The hub's MQTT side: one worker that ingests what devices publish and answers with receipts.

::

    store = HubStore(path="hub.db")
    with HubWorker(store, broker_url="mqtt://127.0.0.1:1883") as worker:
        ...                                  # worker.stats() while it runs

The worker's own MQTT client (:mod:`cloud_hub.mqtt_client`: MQTT 5 or 3.1.1 on one socket;
paho read each packet with several ``recv`` calls and sent each ack with a ``send`` of its own,
half of what the hub may spend per message) subscribes with QoS 1 to
``$share/<group>/edgefleet/v1/+/{telemetry,state,ack}`` (:func:`fleet_protocol.topics.
hub_subscriptions`), so several workers of one group split the fleet. Three threads:

- the **network thread** owns the connection: it reads up to 256 KiB at a time, hands every
  PUBLISH of it to the inbox at once, and between reads sends what the other threads handed
  over (PUBACKs and receipts of a committed batch: one ``sendall``, one wake-up per batch),
  keepalive pings, reconnects;
- the **ingest thread** takes batches from the inbox (up to ``batch_max`` messages or
  ``batch_wait`` seconds after the first), decodes one (``store.decode``) while the previous
  one commits, then writes it in a transaction (``store.begin_ingest``) and hands it over;
- the **commit thread** commits it (the fsync runs without the GIL while the next batch is
  decoded), and only then hands the batch's PUBACKs and one
  :class:`~fleet_protocol.messages.Receipt` per device and stream (QoS 1) to the network
  thread. Anything that fails on this path takes the plain one (``store.ingest`` with
  retries, see :meth:`HubWorker._handle`); a store without ``decode`` and ``begin_ingest``
  always does.

Delivery (DESIGN, "Delivery and durability"), and why each choice:

- **Ack after commit.** The broker gets its PUBACK for a message only after the batch holding
  it is committed. A hub killed with SIGKILL mid-batch leaves those messages unacknowledged in
  its persistent session, and the broker delivers them again when the worker comes back
  (Mosquitto does; see embedded_broker for amqtt, which does not). Redelivered copies are
  harmless: the store counts each (device, seq) once.
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
- **Bounded queue, bounded in flight, bounded packets.** MQTT 5's Receive Maximum
  (``inflight``) caps how many unacknowledged messages the broker sends, and the inbox holds at
  least that many, so the network thread need not wait (though Mosquitto 2.0.11 was measured
  sending ~3x past it once PUBACKs flow: then the inbox fills and the back-pressure below
  applies; nothing is lost). With 3.1.1 the broker's own limit
  applies (Mosquitto's ``max_inflight_messages``); if the inbox ever fills, the network thread
  waits, which stops reading from the socket (back-pressure) rather than dropping a message;
  meanwhile it keeps pinging, and does not take the unread PINGRESP for a dead broker. No
  packet over :data:`MAX_PACKET_SIZE` (the largest message the hub accepts, plus MQTT's own
  bytes) is ever buffered: MQTT 5 tells the broker, which then drops such a message itself;
  one that comes anyway is skipped unread, acknowledged, and counted and logged as rejected
  ("oversized").
- **Receipts survive a lost connection**: the client keeps each until the broker acknowledges
  it and sends it again after the next CONNACK.
- **Acks of an earlier connection are not sent** on a later one: packet ids restart with a lost
  session, so a stale ack could acknowledge a message that is not stored. The broker redelivers
  those messages instead.
- **Subscribed at QoS 1 or not at all.** A SUBACK that grants anything but QoS 1 for every
  filter (a refusal, or QoS 0, with which ack after commit would silently stop applying) is a
  failed subscription: logged naming the filter, and the worker reconnects.
- **Reconnect** with exponential backoff and jitter (each wait uniform in [d/2, d]), so workers
  restarted together do not reconnect in step; the backoff starts again from the bottom only
  after a connection that subscribed.

A message the store rejects (malformed, oversized, wrong version, foreign topic) is counted and
logged with its device id, at most ``log_burst`` lines at once and one per ``log_every`` seconds
after that (a flood cannot fill the disk; the counters keep the exact numbers). A receipt the
broker refuses (an MQTT 5 PUBACK with a failure reason: its ACL, say) and one that cannot be
encoded are counted (``receipts_refused``, ``receipt_errors``) and logged at a bounded rate too;
the device resends what no receipt names, so only the receipt is lost.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import queue
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol
from urllib.parse import urlsplit

from cloud_hub.errors import HubStoreError, MqttConnectionError
from cloud_hub.mqtt_client import ConnAck, HubMqttClient, Received, tls_context
from fleet_protocol import messages, topics, wire

if TYPE_CHECKING:
    from cloud_hub.ingest import IngestResult

__all__ = ["GC_YOUNG_THRESHOLD", "MAX_PACKET_SIZE", "STAT_KEYS", "BrokerAddress", "HubWorker",
           "IngestingStore", "default_client_id", "parse_broker_url", "settle_heap"]

log = logging.getLogger(__name__)

MqttVersion = Literal["auto", 5, 311]
#: CONNACK reason "Unsupported protocol version" (a 3.1.1 broker's answer to an MQTT 5 CONNECT)
_UNSUPPORTED_PROTOCOL = 132
#: DISCONNECT reason "Session taken over": another client connected with our client id
_SESSION_TAKEN_OVER = 142
#: long enough to ride out a restart; short, because Mosquitto keeps routing a shared
#: subscription's share to a member that crashed, until its session expires
DEFAULT_SESSION_EXPIRY = 3600
#: MQTT's own bytes around the largest message: the fixed header (5), a device's topic (2 + at
#: most 151: edgefleet/v1/<128 characters>/telemetry), the packet id (2), and the MQTT 5
#: properties a publisher may attach and the broker forwards (the agent attaches none)
PACKET_OVERHEAD = 4096
#: the largest MQTT packet the hub takes (announced to an MQTT 5 broker as its Maximum Packet
#: Size; larger ones are skipped unread): the largest message it accepts, plus PACKET_OVERHEAD.
#: devices/mosquitto/mosquitto.conf sets the broker's max_packet_size to the same value.
MAX_PACKET_SIZE = max(m.MAX_WIRE_BYTES for m in messages.MESSAGE_TYPES.values()) \
    + PACKET_OVERHEAD


class IngestingStore(Protocol):
    """What the worker needs of a store (cloud_hub.store.HubStore is one). A store that also
    has ``decode(messages)`` and ``begin_ingest(messages, *, now, worker, decoded)`` (returning
    something with ``commit()`` and ``rollback()``, as HubStore does) has its batches written
    ahead and committed on the commit thread; any other store gets ``ingest`` per batch."""

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
             "receipts_sent", "receipts_refused", "receipt_errors", "store_errors", "connects",
             "connected", "subscribed", "queued")


class _SessionTakenOver(MqttConnectionError):
    """The broker ended the session: another client connected with this client id."""


class _SubscriptionFailed(MqttConnectionError):
    """The broker did not grant QoS 1 for every filter of the SUBSCRIBE."""


class _Received(NamedTuple):
    generation: int
    mid: int
    qos: int
    topic: str
    payload: bytes


class _Inbox:
    """Between the network thread and the ingest thread: the messages of one read put at once,
    a batch taken at once (a ``queue.Queue`` costs two lock round trips per message).
    ``put_many`` waits while ``maxsize`` or more are queued."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: deque[_Received] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._full_waiters = 0  # producers waiting for room

    def __len__(self) -> int:
        return len(self._items)

    def put_many(self, items: list[_Received], timeout: float) -> bool:
        """Queue ``items`` once fewer than ``maxsize`` are queued; False if still full after
        ``timeout`` seconds (nothing queued then)."""
        with self._cond:
            if len(self._items) >= self.maxsize:
                self._full_waiters += 1
                try:
                    self._cond.wait(timeout)
                finally:
                    self._full_waiters -= 1
                if len(self._items) >= self.maxsize:
                    return False
            self._items.extend(items)
            self._cond.notify_all()
        return True

    def take(self, batch_max: int, *, first_wait: float, batch_wait: float) -> list[_Received]:
        """Up to ``batch_max`` messages: waits at most ``first_wait`` for the first one, then
        at most ``batch_wait`` more for the batch to fill; [] when nothing came."""
        with self._cond:
            if not self._items:
                self._cond.wait(first_wait)
                if not self._items:
                    return []
            deadline = time.monotonic() + batch_wait
            while len(self._items) < batch_max:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            items = self._items
            batch = [items.popleft() for _ in range(min(batch_max, len(items)))]
            if self._full_waiters:
                self._cond.notify_all()  # room for the producer
        return batch


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


#: the cyclic collector's first threshold in a hub process (see :func:`settle_heap`); the
#: standard library's is 700
GC_YOUNG_THRESHOLD = 50_000


def settle_heap() -> None:
    """For a process whose main work is hub workers (``edgefleet hub serve``, the benchmark):
    collect once, then freeze what start-up left (``gc.freeze``), so that later collections
    skip it, and raise the collector's first threshold to :data:`GC_YOUNG_THRESHOLD`.

    Ingestion makes ~100 short-lived containers per message and keeps a batch's worth alive
    until it is written. Each full collection walked every long-lived object of the process
    again (SQLAlchemy, pydantic and numpy internals): ~7 µs of CPU per message, measured,
    until the freeze. With the default threshold (700 more containers allocated than freed)
    the young collection still ran every ~26 messages while a batch was decoded, and walked
    that batch again and again as its containers were promoted (none of them is ever garbage:
    the collections of 20,000 messages found nothing): 3.7-4.4 µs of CPU per message in 776
    young, 70 middle and 6 full collections, measured offline (20,000 of the benchmark's
    windows in batches of 500 through decode, write and commit). With 20,000 one collection
    ran (0.1 µs per message), with 50,000 none: the two batches a worker holds at once (one
    decoded, one committing) stay under it. Reference cycles are still collected, only less
    often. Call it once, after start-up; what it freezes is never collected."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


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
    ``on_batch``, an observer (the benchmark's finish line), is called with each batch's
    IngestResult once the batch is stored, its receipts and acks handed over and its counts
    in :meth:`stats`, on the thread that stored it; what it raises is logged (rate-limited),
    and ingestion goes on.
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
                 clock: Callable[[], float] = time.time, seed: int | None = None,
                 on_batch: Callable[[IngestResult], object] | None = None) -> None:
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
        self.on_batch = on_batch
        self._random = random.Random(seed)
        # the receive maximum bounds what is unacknowledged, so this never fills with MQTT 5
        self._inbox = _Inbox(maxsize=max(inflight, batch_max) * 2)
        #: (acks by connection generation, receipts as (topic, payload)) of committed batches
        self._outbox: deque[tuple[dict[int, list[int]], list[tuple[str, bytes]]]] = deque()
        self._wake_r: socket.socket | None = None  # a socket pair while running
        self._wake_w: socket.socket | None = None
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
        #: batches written ahead, waiting for the commit thread (None: no more)
        self._commits: queue.Queue[tuple[list[_Received], Any] | None] = queue.Queue()
        self._commit_idle = threading.Event()
        self._commit_idle.set()
        self._last_error = ""
        self._reject_log = _RateLimit(log_burst, log_every, time.monotonic)
        self._error_log = _RateLimit(5, 10.0, time.monotonic)
        self._receipt_log = _RateLimit(5, 10.0, time.monotonic)
        self._v5 = mqtt_version != 311
        self._probed = mqtt_version != "auto"
        self._subscribe_mid: int | None = None
        self._unsubscribe_mid: int | None = None
        self._unsubscribe_wanted = False
        self._unsubscribed = threading.Event()
        self._keep_session = True
        self._tls = tls_context(str(ca_certs) if ca_certs else None,
                                str(certfile) if certfile else None,
                                str(keyfile) if keyfile else None) if self.address.tls else None
        self._client = self._make_client()

    @property
    def filters(self) -> tuple[str, ...]:
        """The topic filters this worker subscribes to (they depend on the MQTT version)."""
        shared = self._v5 if self.shared is None else self.shared
        if shared:
            return topics.hub_subscriptions(self.group)
        return tuple(f"{topics.PROTOCOL}/+/{kind}" for kind in topics.DEVICE_KINDS)


    # --- the broker connection (cloud_hub.mqtt_client) --------------------------------

    def _make_client(self) -> HubMqttClient:
        # receipts: a few per batch; the client holds the rest until the broker takes them
        return HubMqttClient(
            self.address.host, self.address.port, client_id=self.client_id, v5=self._v5,
            keepalive=self.keepalive, username=self.username, password=self.password,
            tls=self._tls, session_expiry=self.session_expiry, receive_maximum=self.inflight,
            max_inflight=100, max_packet_size=MAX_PACKET_SIZE)

    def _wake(self) -> None:
        """Wake the network thread (it waits on the broker's socket and this pair)."""
        wake = self._wake_w
        if wake is not None:
            with contextlib.suppress(BlockingIOError, InterruptedError):  # full of wake-ups
                wake.send(b"\0")

    def _connected_now(self, client: HubMqttClient, ack: ConnAck) -> None:
        with self._lock:
            self._generation += 1
            self._counts["connects"] += 1
        self._connected.set()
        filters = self.filters
        log.info("worker %s connected to %s with MQTT %s (session present: %s); subscribing "
                 "to %s", self.client_id, self.broker_url, "5" if self._v5 else "3.1.1",
                 ack.session_present, ", ".join(filters))
        self._subscribe_mid = client.subscribe(list(filters))

    def _event(self, event: tuple[Any, ...]) -> None:
        if event[0] == "suback":
            _, mid, codes = event
            if mid == self._subscribe_mid:
                self._check_suback(codes)
                self._subscribed.set()
        elif event[0] == "oversized":
            _, topic, qos, size = event
            with self._lock:
                self._counts["received"] += 1
                self._counts["rejected"] += 1
            self._log_rejection(size, topic, "oversized",
                                f"larger than the hub's maximum packet size of {MAX_PACKET_SIZE} "
                                "bytes: skipped unread" + (" and acknowledged" if qos else ""))
        elif event[0] == "refused":
            _, topic, reason, text = event
            with self._lock:
                self._counts["receipts_refused"] += 1
            if self._receipt_log.allow():
                suppressed = self._receipt_log.take_suppressed()
                log.error("worker %s: broker %s refused a receipt on %.200r: reason code 0x%02X "
                          "%s (check that the broker lets this user publish receipts); its "
                          "device resends what no receipt names%s", self.client_id,
                          self.broker_url, topic, reason, text,
                          f" ({suppressed} more refusals not logged)" if suppressed else "")
        elif event[0] == "unsuback":
            if event[1] == self._unsubscribe_mid:
                self._unsubscribed.set()
        elif event[0] == "disconnect":
            _, reason, text = event
            if reason == _SESSION_TAKEN_OVER:
                raise _SessionTakenOver(
                    f"another client connected to {self.broker_url} with the same client id "
                    "and took this session; give each hub worker its own client id "
                    "(--client-id, broker.client_id)")
            raise MqttConnectionError(f"the broker disconnected: reason code 0x{reason:02X} "
                                      f"{text}".rstrip())

    def _check_suback(self, codes: list[int]) -> None:
        """_SubscriptionFailed naming each filter the SUBACK did not grant at QoS 1 exactly:
        refused (>= 0x80), QoS 0 (the broker would not redeliver what the hub never acked: ack
        after commit would silently stop applying), or missing (fewer codes than filters)."""
        filters = self.filters
        if len(codes) != len(filters):
            raise _SubscriptionFailed(
                f"broker {self.broker_url} answered the SUBSCRIBE of {len(filters)} filters "
                f"({', '.join(filters)}) with {len(codes)} reason codes "
                f"({', '.join(f'0x{rc:02X}' for rc in codes)}); one per filter expected; "
                "reconnecting")
        bad = [f"{f} (reason code 0x{rc:02X}: "
               + ("refused" if rc >= 0x80 else f"granted QoS {rc}") + ")"
               for f, rc in zip(filters, codes, strict=True) if rc != 1]
        if bad:
            raise _SubscriptionFailed(
                f"broker {self.broker_url} did not grant QoS 1 for {', '.join(bad)}: the hub "
                "needs QoS 1 on every filter (check the broker's ACL and max_qos for this "
                "user); reconnecting")

    def _deliver(self, client: HubMqttClient, received: list[Received]) -> None:
        """Hand one read's messages to the ingest thread. A full inbox (MQTT 3.1.1 only: with
        MQTT 5 the Receive Maximum keeps it from filling) makes this wait, which stops reading
        from the socket (back-pressure) rather than dropping a message; meanwhile the acks of
        committed batches still go out, and so do pings, whose answers wait unread (the
        client does not count them missing meanwhile: with the database down for minutes,
        the connection stays)."""
        if not self._accepting:
            return  # stopping: left unacknowledged, so the broker delivers it again
        g = self._generation
        items = [_Received(g, mid, qos, topic, payload)
                 for mid, qos, topic, payload in received]
        while not self._inbox.put_many(items, timeout=0.2):
            if not self._accepting:
                return
            self._send_committed(client)
            client.tick(time.monotonic(), reading=False)
        with self._lock:
            self._counts["received"] += len(items)

    def _send_committed(self, client: HubMqttClient) -> None:
        """The acks and receipts the ingest thread handed over, with one sendall. Acks of an
        earlier connection are dropped: packet ids restart with a lost session, so a stale ack
        could acknowledge a message that is not stored (the broker redelivers those)."""
        while self._outbox:
            by_generation, receipts = self._outbox.popleft()
            client.ack(by_generation.get(self._generation, []))
            for topic, payload in receipts:
                client.publish(topic, payload)
        if self._unsubscribe_wanted:
            self._unsubscribe_wanted = False
            self._unsubscribe_mid = client.unsubscribe(list(self.filters))
        client.flush()

    def _serve(self, client: HubMqttClient) -> None:
        """One connection: read, hand over, ack, ping, until it is lost or the worker stops
        (then DISCONNECT, after the acks queued)."""
        while True:
            self._send_committed(client)
            if self._stop_net.is_set():
                self._send_committed(client)
                client.disconnect(end_session=not self._keep_session)
                return
            wait = min(0.2, client.tick(time.monotonic()))
            readable, woken = client.wait(wait, self._wake_r)
            if woken and self._wake_r is not None:
                with contextlib.suppress(BlockingIOError):
                    self._wake_r.recv(4096)
            if readable:
                received, events = client.read()
                for event in events:
                    self._event(event)
                if received:
                    self._deliver(client, received)

    # --- network thread: connect, serve, reconnect with jittered backoff ------------------

    def _backoff(self, attempt: int) -> float:
        d = min(self.reconnect_max, self.reconnect_min * 2.0 ** min(attempt, 30))
        return self._random.uniform(d / 2, d)

    def _network_loop(self) -> None:
        attempt = 0
        while not self._stop_net.is_set():
            subscribed = False
            try:
                if not self._probed:
                    self._probe()
                ack = self._client.connect()
            except MqttConnectionError as err:
                if self._error_log.allow():
                    log.warning("worker %s cannot reach the broker %s: %s", self.client_id,
                                self.broker_url, err)
            else:
                if not ack.ok:
                    if self._error_log.allow():
                        log.error("broker %s refused worker %s: %s", self.broker_url,
                                  self.client_id, ack.reason_name)
                else:
                    self._connected_now(self._client, ack)
                    try:
                        self._serve(self._client)
                    except MqttConnectionError as err:
                        self._client.close()
                        if not self._stop_net.is_set() and self._error_log.allow():
                            (log.error if isinstance(err, _SessionTakenOver | _SubscriptionFailed)
                             else log.warning)("worker %s lost the broker %s: %s",
                                               self.client_id, self.broker_url, err)
                    finally:
                        subscribed = self._subscribed.is_set()
                        self._connected.clear()
                        self._subscribed.clear()
                if self._stop_net.is_set():
                    break
            if subscribed:
                # a connection that worked: start the backoff again from the bottom (not after
                # a mere CONNACK: a broker that never grants the subscription is not hammered)
                attempt = 0
            self._stop_net.wait(self._backoff(attempt))
            attempt += 1
        self._client.close()
        self._connected.clear()
        self._subscribed.clear()

    def _probe(self) -> None:
        """Find out whether the broker speaks MQTT 5 (``mqtt_version="auto"``), before the first
        real connection: a throwaway CONNECT (clean start, no session, no properties) that a
        3.1.1-only broker answers with "unsupported protocol version". amqtt cannot be asked
        with the real CONNECT: it never answers one that carries MQTT 5 properties.
        MqttConnectionError when the broker cannot be reached or does not answer."""
        probe = HubMqttClient(self.address.host, self.address.port,
                              client_id=f"edgefleet-probe-{self._random.getrandbits(48):012x}",
                              v5=True, keepalive=10, username=self.username,
                              password=self.password, tls=self._tls,
                              max_packet_size=MAX_PACKET_SIZE)
        answer = probe.probe()
        self._probed = True
        if answer.not_v5:
            log.warning("broker %s does not speak MQTT 5: worker %s uses MQTT 3.1.1%s",
                        self.broker_url, self.client_id,
                        ", without a shared subscription (run one worker)"
                        if self.shared is None else "")
            self._v5 = False
            self._client = self._make_client()

    # --- ingest thread: batch, commit, then receipts and acks -----------------------------

    def _next_batch(self) -> list[_Received]:
        return self._inbox.take(self.batch_max, first_wait=0.2, batch_wait=self.batch_wait)

    def _ingest_loop(self) -> None:
        pipelined = callable(getattr(self.store, "decode", None)) and \
            callable(getattr(self.store, "begin_ingest", None))
        committer = None
        if pipelined:
            committer = threading.Thread(target=self._commit_loop, daemon=True,
                                         name=f"hub-commit-{self.client_id}")
            committer.start()
        try:
            while True:
                batch = self._next_batch()
                if batch:
                    if pipelined:
                        self._write_ahead(batch)
                    else:
                        self._handle(batch)
                elif self._stop_ingest.is_set():
                    return
        finally:
            if committer is not None:
                self._commits.put(None)
                committer.join()

    def _write_ahead(self, batch: list[_Received]) -> None:
        """Decode a batch while the previous one commits, write it once that commit is done,
        and hand its commit to the commit thread: the fsync (and SQLite's WAL writes) run
        without the GIL while the next batch is decoded. Anything that fails here takes the
        plain path (:meth:`_handle`: retries, split, unstorable), after the pending commit."""
        pairs = [(m.topic, m.payload) for m in batch]
        store: Any = self.store
        try:
            decoded = store.decode(pairs)
        except Exception:  # the plain path decodes again and says why
            decoded = None
        self._commit_idle.wait()
        if decoded is not None:
            try:
                pending = store.begin_ingest(pairs, now=self.clock(), worker=self.client_id,
                                             decoded=decoded)
            except Exception as err:
                log.debug("worker %s: writing a batch ahead failed (%s); storing it with "
                          "retries", self.client_id, err)
            else:
                self._commit_idle.clear()
                self._commits.put((batch, pending))
                return
        self._handle(batch)

    def _commit_loop(self) -> None:
        """The commit thread: commit each written batch, then receipt and ack it; a commit
        that fails leaves nothing stored, and the batch takes the plain path."""
        while (item := self._commits.get()) is not None:
            batch, pending = item
            try:
                try:
                    result = pending.commit()
                except Exception as err:
                    log.debug("worker %s: a commit failed (%s); storing the batch with "
                              "retries", self.client_id, err)
                    self._handle(batch)
                else:
                    self._acknowledge(batch, result)
            finally:
                self._commit_idle.set()

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
        self._acknowledge(batch, result)

    def _acknowledge(self, batch: list[_Received], result: IngestResult) -> None:
        """After the commit: the receipts and acks to the network thread, the counts."""
        try:
            self._after_commit(batch, result.receipts)
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

    def _after_commit(self, batch: list[_Received], receipts: dict[tuple[str, str], int]
                      ) -> None:
        """Hand the batch's acks and receipts to the network thread (one wake-up per batch);
        it sends them with one sendall between reads. The acks first, and each receipt
        encoded on its own: one that cannot be encoded is counted and logged, and holds back
        neither the acks nor the other receipts (its device resends, and a later batch
        receipts it)."""
        by_generation: dict[int, list[int]] = {}
        for m in batch:
            if m.qos > 0:
                by_generation.setdefault(m.generation, []).append(m.mid)
        self._outbox.append((by_generation, []))
        now = self.clock()
        payloads: list[tuple[str, bytes]] = []
        for (device, stream), seq in receipts.items():
            try:
                payloads.append((topics.receipt(device),
                                 wire.encode_receipt(device, stream, seq, now)))
            except Exception as err:  # a bug or an odd stored value: never the batch's acks
                with self._lock:
                    self._counts["receipt_errors"] += 1
                if self._receipt_log.allow():
                    log.error("worker %s: the receipt of device %.160r stream %.40r up to seq "
                              "%s cannot be encoded (not sent; the device resends): %s",
                              self.client_id, device, stream, seq, err, exc_info=True)
        if payloads:
            self._outbox.append(({}, payloads))
        with self._lock:
            self._counts["receipts_sent"] += len(payloads)
        self._wake()

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
            self._log_rejection(r.size, r.topic, r.kind, r.reason, r.device_id)
        log.debug("worker %s: batch of %d: %d stored, %d duplicates, %d rejected",
                  self.client_id, n, result.stored, result.duplicates, len(rejections))
        if self.on_batch is not None:
            try:
                self.on_batch(result)
            except Exception as err:  # an observer's bug: never the ingestion's
                if self._error_log.allow():
                    log.error("worker %s: the on_batch observer failed: %s", self.client_id,
                              err, exc_info=True)

    def _log_rejection(self, size: int, topic: str, kind: str, reason: str,
                       device_id: str | None = None) -> None:
        """One line per rejected message, at most ``log_burst`` at once, then one per
        ``log_every`` seconds (the counters keep the exact numbers)."""
        if not self._reject_log.allow():
            return
        if device_id is None:
            with contextlib.suppress(topics.TopicError):
                device_id = topics.parse(topic)[0]
        suppressed = self._reject_log.take_suppressed()
        log.warning("worker %s rejected a message of %d bytes from device %s on %.200r (%s): "
                    "%.500s%s", self.client_id, size, device_id or "(unknown)", topic, kind,
                    reason, f" ({suppressed} more rejections not logged)" if suppressed else "")

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> HubWorker:
        """Start the network and ingest threads; returns at once (see :meth:`wait_subscribed`).

        RuntimeError while the threads of a :meth:`stop` that timed out still run (two
        pipelines would then share the inbox and the connection): call ``stop()`` again, which
        waits for them, then ``start()``."""
        if self._net_thread is not None:
            if not self._stopping():
                return self  # running
            alive = self._alive_threads()
            if alive:
                raise RuntimeError(
                    f"worker {self.client_id} cannot start: the {' and '.join(alive)} thread(s) "
                    "of its last stop() are still running (it timed out); call stop() again "
                    "to wait for them, then start()")
            self._stopped()
        self._accepting = True
        self._commit_idle.set()
        decode = getattr(self.store, "decode", None)
        if callable(decode):
            # the decoders load now (HubStore imports cloud_hub.ingest, its SQL and msgspec
            # types on first use), not while the first batch waits: measured, that import
            # held the first messages for 0.1-0.5 s
            decode([])
        if self._wake_r is None:
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
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

        A stop whose threads do not end within ``timeout`` leaves them stopping (logged); call
        it again to wait for them (:meth:`start` refuses until they have ended).
        """
        if self._net_thread is None:
            return
        deadline = time.monotonic() + timeout
        if not self._stopping():
            self._begin_stop(deadline, keep_session)
        if self._ingest_thread is not None:
            self._ingest_thread.join(max(0.1, deadline - time.monotonic()))
        # the receipts of what was stored: sent and acknowledged by the broker (while connected;
        # those still waiting go out after the next CONNACK of this client id)
        while self._connected.is_set() and time.monotonic() < deadline:
            if not self._outbox and not self._client.unacknowledged:
                break
            time.sleep(0.01)
        self._stop_net.set()
        self._wake()
        self._net_thread.join(max(0.1, deadline - time.monotonic()))
        alive = self._alive_threads()
        if alive:  # keep the handles and the stop flags: they still have to end, then stop()
            log.error("worker %s: its %s thread(s) did not end within %s s of stop(); they are "
                      "still stopping (call stop() again to wait for them)", self.client_id,
                      " and ".join(alive), timeout)
            return
        self._stopped()
        log.info("worker %s stopped: %s", self.client_id, self.stats())

    def _begin_stop(self, deadline: float, keep_session: bool | None) -> None:
        """The first stop(): unsubscribe (a session to end), stop taking messages, tell the
        ingest thread to finish."""
        shared = self.filters[0].startswith("$share/")
        self._keep_session = (keep_session if keep_session is not None else not shared) \
            or not self._v5
        if not self._keep_session and self._connected.is_set():
            self._unsubscribed.clear()
            self._unsubscribe_wanted = True
            self._wake()
            if not self._unsubscribed.wait(max(0.1, min(5.0, deadline - time.monotonic()))):
                log.warning("worker %s: no UNSUBACK from %s; stopping anyway", self.client_id,
                            self.broker_url)
        self._accepting = False
        self._stop_ingest.set()

    def _stopping(self) -> bool:
        return self._stop_ingest.is_set()

    def _alive_threads(self) -> list[str]:
        return [name for name, t in (("ingest", self._ingest_thread),
                                     ("network", self._net_thread))
                if t is not None and t.is_alive()]

    def _stopped(self) -> None:
        """Both threads have ended: forget them, so that start() can run new ones."""
        if self._wake_r is not None and self._wake_w is not None:
            self._wake_r.close()
            self._wake_w.close()
            self._wake_r = self._wake_w = None
        self._net_thread = self._ingest_thread = None
        self._stop_net.clear()
        self._stop_ingest.clear()

    def stats(self) -> dict[str, int]:
        """Counters since start (exact, unlike the rate-limited log); keys in STAT_KEYS.

        ``connected`` and ``subscribed`` are 0 or 1, ``queued`` is the queue's depth now.
        """
        with self._lock:
            out = dict(self._counts)
        out["connected"] = int(self._connected.is_set())
        out["subscribed"] = int(self._subscribed.is_set())
        out["queued"] = len(self._inbox)
        return out

    def __enter__(self) -> HubWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


