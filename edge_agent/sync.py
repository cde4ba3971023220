"""The device's MQTT adapter: sends the outbox to the hub, applies its receipts, says what runs.

One paho-mqtt client (callback API version 2) and two threads of ours:

- the **network thread** connects, runs paho's loop and reconnects with jittered exponential
  backoff (:func:`full_jitter`): a fleet that lost its broker must not come back all at once
  (FIELD-NOTES: "no reconnect storms"). It registers the last will — a retained offline
  :class:`~fleet_protocol.messages.StateMessage` — before every connect, and on a clean stop it
  publishes that offline state itself and disconnects.
- the **publisher thread** owns every outbox read and write (:class:`~edge_agent.outbox.Outbox`):
  it applies receipts, subscribes after each connect, publishes the online state (and again when
  the agent's slots or swap phase change), resends unreceipted batches in seq order (after every
  reconnect, and after ``resend_after_seconds``, doubling up to 16x while the hub does not
  answer) and forms new batches while fewer than ``max_inflight`` wait for a receipt.

paho's callbacks only set events and enqueue what arrived; no database work happens in paho's
thread, and serving never waits on the network or on the outbox (the agent's writer only calls
:meth:`Sync.notify`). paho's own queue is bounded (``max_queued_messages_set``) since the outbox
is the real queue: a QoS 1 message paho holds in memory is lost with the process anyway.

Facts this depends on (FIELD-NOTES, "Delivery facts"; paho-mqtt 2.2):

- with ``loop()`` driven by our own thread, paho's ``publish()`` from another thread writes to
  the socket itself unless a socket-write callback is registered; we register a no-op one, so
  every write happens in the network thread (as with paho's ``loop_start``).
- paho's own reconnect (``reconnect_delay_set``) doubles without jitter, so we reconnect
  ourselves.
- MQTT 5 with ``clean_start=False`` and a session expiry keeps our subscriptions and the queued
  receipts while offline. paho does not fall back from 5 to 3.1.1 by itself, and amqtt 0.12
  (the hub's quick-start broker) neither answers nor closes a version-5 CONNECT: so unless
  ``mqtt_version`` pins one, a refused or unanswered version-5 CONNECT makes the next attempt
  use 3.1.1 (``clean_session=False``), for the rest of the process. A CONNECT unanswered for
  ``connect_timeout_seconds`` counts as a failed attempt either way.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.errors import ConfigError
from edge_agent.outbox import Batch, Outbox
from fleet_protocol import topics
from fleet_protocol.errors import ProtocolError
from fleet_protocol.messages import Command, MessageError, Receipt, StateMessage
from fleet_protocol.wire import decode_for_topic, encode

if TYPE_CHECKING:
    from edge_agent.config import AgentConfig
    from edge_agent.store import AgentStore

__all__ = ["AGENT_VERSION", "Backoff", "Sync", "SyncSettings", "SyncStats", "agent_version",
           "full_jitter"]

log = logging.getLogger(__name__)

#: CONNACK reason codes that mean "your credentials": 3.1.1 (4, 5) and 5 (134, 135)
_AUTH_REFUSALS = {4, 5, 134, 135}
#: "unsupported protocol version": 3.1.1 (1) and 5 (132)
_VERSION_REFUSALS = {1, 132}
#: messages from the hub waiting for the publisher (receipts are cumulative: dropping is safe)
INBOUND_QUEUE = 1024


def agent_version() -> str:
    """The installed edgefleet version (what StateMessage and envelopes carry)."""
    try:
        return metadata.version("edgefleet")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


AGENT_VERSION = agent_version()


#: a batch the hub does not answer is resent after resend_after, 2x, 4x ... at most this many x
RESEND_BACKOFF_CAP = 16


def resend_wait(resend_after: float, resends: int) -> float:
    """How long after its last send an unreceipted batch is sent again, when it was already
    resent ``resends`` times without the hub answering: a hub that is down (or working through
    a backlog) is not fed the same batches every ``resend_after`` seconds."""
    return resend_after * min(2.0 ** min(resends, 30), RESEND_BACKOFF_CAP)


def full_jitter(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait before reconnect ``attempt`` (0 first): random(0, min(cap, base*2**n)).

    "Full jitter": spread over the whole interval, so devices that lost the broker together do
    not return together.

    >>> rng = random.Random(1)
    >>> 0 <= full_jitter(3, 1.0, 60.0, rng) <= 8.0
    True
    """
    ceiling = min(cap, base * 2.0 ** min(attempt, 62))
    return rng.uniform(0.0, ceiling)


class Backoff:
    """Reconnect delays: :func:`full_jitter` of a growing attempt count, reset after a success."""

    def __init__(self, base: float, cap: float, rng: random.Random | None = None) -> None:
        if not 0 < base <= cap:
            raise ValueError(f"backoff base {base} and cap {cap}: expected 0 < base <= cap")
        self.base = base
        self.cap = cap
        self.rng = rng if rng is not None else random.Random()
        self.attempt = 0

    def next(self) -> float:
        delay = full_jitter(self.attempt, self.base, self.cap, self.rng)
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


@dataclass(frozen=True)
class SyncSettings:
    """Everything the adapter needs, resolved from the agent's config (see
    :meth:`from_config`)."""

    device_id: str
    host: str
    port: int
    tls: bool = False
    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    client_id: str | None = None
    #: 5, 311, or None: 5, falling back to 3.1.1 if the broker does not take 5
    mqtt_version: int | None = None
    keepalive_seconds: int = 60
    session_expiry_seconds: int = 7 * 86400
    max_batch_items: int = 100
    max_batch_bytes: int = 256 * 1024
    max_inflight: int = 4
    resend_after_seconds: float = 30.0
    backoff_base_seconds: float = 1.0
    backoff_cap_seconds: float = 120.0
    poll_seconds: float = 1.0
    connect_timeout_seconds: float = 5.0
    agent_version: str = AGENT_VERSION

    @classmethod
    def from_config(cls, config: AgentConfig) -> SyncSettings:
        """Settings of ``config.sync`` (ConfigError if it is off or a password file is
        unreadable)."""
        s = config.sync
        if not s.enabled or s.broker_url is None:
            raise ConfigError("sync is not configured: set sync.broker_url in the agent config")
        return cls(
            device_id=config.device_id, host=s.host, port=s.port, tls=s.tls,
            ca_certs=None if s.ca_certs is None else str(s.ca_certs),
            certfile=None if s.certfile is None else str(s.certfile),
            keyfile=None if s.keyfile is None else str(s.keyfile),
            username=s.username, password=s.password_text(), client_id=s.client_id,
            mqtt_version=s.mqtt_version, keepalive_seconds=s.keepalive_seconds,
            session_expiry_seconds=s.session_expiry_seconds, max_batch_items=s.max_batch_items,
            max_batch_bytes=s.max_batch_bytes, max_inflight=s.max_inflight,
            resend_after_seconds=s.resend_after_seconds,
            backoff_base_seconds=s.backoff_base_seconds,
            backoff_cap_seconds=s.backoff_cap_seconds, poll_seconds=s.poll_seconds)

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


@dataclass
class SyncStats:
    """Counters of one :class:`Sync` since it started (a copy from :attr:`Sync.stats`)."""

    connect_attempts: int = 0
    connects: int = 0
    #: connects whose CONNACK said the broker still held this device's session (its
    #: subscriptions, and what was queued for it while away)
    sessions_resumed: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    published: int = 0
    resent: int = 0
    batches_formed: int = 0
    states_published: int = 0
    #: subscriptions the broker granted (two per connect: receipt and cmd)
    subscribed: int = 0
    receipts: int = 0
    ignored_receipts: int = 0
    bad_messages: int = 0
    commands: int = 0
    inbound_dropped: int = 0
    last_receipt_seq: int = 0
    last_error: str | None = None
    #: reconnect delays chosen, most recent last (bounded)
    delays: list[float] = field(default_factory=list)


class Sync:
    """The agent's link to the hub: ``Sync(settings, outbox, state).start()`` ... ``.stop()``.

    ``state`` returns the agent's current online :class:`StateMessage` (it is called on the
    publisher thread). ``on_command`` receives decoded hub commands (commands are a later issue:
    without it they are logged and ignored). ``rng`` seeds the reconnect jitter.
    """

    def __init__(self, settings: SyncSettings, outbox: Outbox,
                 state: Callable[[], StateMessage], *, rng: random.Random | None = None,
                 on_command: Callable[[Command], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.outbox = outbox
        self.state = state
        self.on_command = on_command
        self.clock = clock
        self.backoff = Backoff(settings.backoff_base_seconds, settings.backoff_cap_seconds, rng)
        self.device_id = topics.check_device_id(settings.device_id)
        self._telemetry_topic = topics.telemetry(self.device_id)
        self._state_topic = topics.state(self.device_id)
        self._stats = SyncStats()
        self._stats_lock = threading.Lock()
        self._inbound: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=INBOUND_QUEUE)
        self._wake = threading.Event()
        self._connected = threading.Event()
        self._closing = threading.Event()
        self._stop_publisher = threading.Event()
        self._generation = 0  # successful connects; the publisher notices a new one
        self._accepted = False
        self._refusal: int | None = None
        # network thread only: the protocol of the current client
        self._protocol = 311 if settings.mqtt_version == 311 else 5
        # publisher thread only
        self._seen_generation = 0
        self._last_sent: dict[int, float] = {}  # seq -> monotonic time of its last publish
        #: seq -> timed resends since the hub last answered (each waits twice as long)
        self._resends: dict[int, int] = {}
        self._ever_sent: set[int] = set()
        self._last_state: dict[str, Any] | None = None
        self._client = self._make_client()
        self._threads: list[threading.Thread] = []

    @classmethod
    def from_config(cls, config: AgentConfig, store: AgentStore,
                    state: Callable[[], StateMessage], **kwargs: Any) -> Sync:
        """The sync of an agent configured with a ``[sync]`` section, on its store."""
        settings = SyncSettings.from_config(config)
        outbox = Outbox(store, max_batch_items=settings.max_batch_items,
                        max_batch_bytes=settings.max_batch_bytes,
                        max_inflight=settings.max_inflight)
        return cls(settings, outbox, state, **kwargs)

    # --- paho ------------------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        s = self.settings
        client_id = s.client_id or self.device_id
        if self._protocol == 5:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                 protocol=MQTTProtocolVersion.MQTTv5, reconnect_on_failure=False)
        else:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                 clean_session=False, protocol=MQTTProtocolVersion.MQTTv311,
                                 reconnect_on_failure=False)
        client.connect_timeout = s.connect_timeout_seconds
        # paho's queue is bounded: batches in flight, their resends, state messages
        client.max_queued_messages_set(3 * s.max_inflight + 8)
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        if s.tls:
            try:
                client.tls_set(ca_certs=s.ca_certs, certfile=s.certfile, keyfile=s.keyfile)
            except (OSError, ValueError) as err:  # ssl.SSLError is an OSError
                raise ConfigError(
                    f"config keys sync.ca_certs / sync.certfile / sync.keyfile ({s.ca_certs}, "
                    f"{s.certfile}, {s.keyfile}): cannot load them for TLS: {err}") from err
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        # every socket write happens in the network thread (see the module docstring)
        client.on_socket_register_write = _no_op
        return client

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if reason.is_failure:
            self._refusal = reason.value
            hint = (" (check sync.username and sync.password / sync.password_file)"
                    if reason.value in _AUTH_REFUSALS else "")
            self._fail(f"broker {self.settings.url} refused the connection: {reason}{hint}")
            return
        self._accepted = True
        resumed = bool(getattr(flags, "session_present", False))
        with self._stats_lock:
            self._stats.connects += 1
            self._stats.sessions_resumed += resumed
        log.info("connected to %s as %s (session present: %s)", self.settings.url,
                 self.device_id, resumed)
        self._generation += 1
        self._connected.set()
        self._wake.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was:
            with self._stats_lock:
                self._stats.disconnects += 1
            if not self._closing.is_set():
                log.warning("lost the connection to %s: %s", self.settings.url, reason)
        self._wake.set()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any,
                      properties: Any) -> None:
        granted = sum(1 for r in reasons if not r.is_failure)
        with self._stats_lock:
            self._stats.subscribed += granted
        for r in reasons:
            if r.is_failure:  # an ACL that does not let this device read its own topics
                log.error("broker %s refused a subscription of %s: %s; receipts or commands "
                          "will not arrive (check the broker's ACL for this device)",
                          self.settings.url, self.device_id, r)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: Any) -> None:
        try:
            self._inbound.put_nowait((str(message.topic), bytes(message.payload)))
        except queue.Full:
            with self._stats_lock:
                self._stats.inbound_dropped += 1
        self._wake.set()

    def _fail(self, text: str) -> None:
        with self._stats_lock:
            self._stats.connect_failures += 1
            repeat = self._stats.last_error == text
            self._stats.last_error = text
        # the same failure again (a broker down for hours) is not news at error level
        log.log(logging.INFO if repeat else logging.ERROR, "%s; retrying with backoff", text)

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Sync:
        """Start the network and publisher threads (returns at once; connects in the
        background)."""
        if self._threads:
            raise RuntimeError("sync already started")
        self._threads = [
            threading.Thread(target=self._network_loop, name="edgefleet-sync-net", daemon=True),
            threading.Thread(target=self._publisher_loop, name="edgefleet-sync-pub",
                             daemon=True)]
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Publish the offline state (if connected), disconnect cleanly, join the threads."""
        if not self._threads:
            return
        self._stop_publisher.set()
        self._wake.set()
        self._threads[1].join(timeout)
        self._closing.set()
        self._threads[0].join(timeout + self.settings.connect_timeout_seconds)
        self._threads = []

    def notify(self) -> None:
        """New outbox rows were committed (cheap; never blocks)."""
        self._wake.set()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def stats(self) -> SyncStats:
        with self._stats_lock:
            return SyncStats(**{**asdict(self._stats), "delays": list(self._stats.delays)})

    def status(self) -> dict[str, Any]:
        """For Agent.status(): connection, counters."""
        stats = self.stats
        return {"broker": self.settings.url, "connected": self.connected,
                "connects": stats.connects, "sessions_resumed": stats.sessions_resumed,
                "published": stats.published, "resent": stats.resent,
                "receipts": stats.receipts, "last_receipt_seq": stats.last_receipt_seq,
                "last_error": stats.last_error}

    # --- the network thread ------------------------------------------------------------------

    def _network_loop(self) -> None:
        try:
            while not self._closing.is_set():
                self._connect_once()
                if self._closing.is_set():
                    break
                delay = self.backoff.next()
                with self._stats_lock:
                    self._stats.delays = [*self._stats.delays[-99:], delay]
                log.info("reconnecting to %s in %.1f s (attempt %d)", self.settings.url,
                         delay, self.backoff.attempt)
                self._closing.wait(delay)
        finally:
            self._connected.clear()
            # close paho's wake-up socket pair too (paho would only do it when garbage-collected)
            self._client._reset_sockets()

    def _connect_once(self) -> None:
        s = self.settings
        client = self._client
        with self._stats_lock:
            self._stats.connect_attempts += 1
        # composed per connect: its ts is the connect time (see StateMessage)
        will = StateMessage.offline(self.device_id, agent_version=s.agent_version,
                                    ts=self.clock())
        client.will_set(self._state_topic, encode(will), qos=1, retain=True)
        self._accepted = False
        self._refusal = None
        try:
            if self._protocol == 5:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = s.session_expiry_seconds
                client.connect(s.host, s.port, s.keepalive_seconds, clean_start=False,
                               properties=props)
            else:
                client.connect(s.host, s.port, s.keepalive_seconds)
        except (OSError, ValueError) as err:  # refused, unreachable, TLS, timeout
            self._fail(f"cannot connect to {s.url}: {err}")
            return
        answer_by = time.monotonic() + s.connect_timeout_seconds
        unanswered = False
        while True:
            rc = client.loop(timeout=0.2)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
            if self._closing.is_set():
                self._goodbye()
                break
            if not self._accepted and time.monotonic() > answer_by:
                unanswered = True
                self._fail(f"broker {s.url} did not answer the MQTT {self._version_name} "
                           f"CONNECT within {s.connect_timeout_seconds} s")
                break
        self._connected.clear()
        if self._accepted:
            self.backoff.reset()
        elif (self._protocol == 5 and s.mqtt_version is None
              and (unanswered or self._refusal in _VERSION_REFUSALS)):
            log.warning("broker %s does not take MQTT 5; using MQTT 3.1.1 (persistent session "
                        "without an expiry) from now on", s.url)
            client._reset_sockets()  # the old client goes; close its sockets now
            self._protocol = 311
            self._client = self._make_client()

    @property
    def _version_name(self) -> str:
        return "5" if self._protocol == 5 else "3.1.1"

    def _goodbye(self) -> None:
        """Clean stop: the retained offline state, then DISCONNECT (so no will is sent)."""
        client = self._client
        deadline = time.monotonic() + 5.0
        if self._connected.is_set():
            offline = StateMessage.offline(self.device_id,
                                           agent_version=self.settings.agent_version,
                                           ts=self.clock())
            info = client.publish(self._state_topic, encode(offline), qos=1, retain=True)
            while not info.is_published() and time.monotonic() < deadline:
                if client.loop(timeout=0.1) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    return
        client.disconnect()
        while time.monotonic() < deadline:
            if client.loop(timeout=0.1) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return

    # --- the publisher thread -----------------------------------------------------------------

    def _publisher_loop(self) -> None:
        while not self._stop_publisher.is_set():
            self._wake.wait(self.settings.poll_seconds)
            self._wake.clear()
            if self._stop_publisher.is_set():
                break
            try:
                self._step()
            except Exception:  # a bad moment (database busy, agent closing): try again later
                log.exception("sync step failed; retrying")
                self._stop_publisher.wait(1.0)

    def _step(self) -> None:
        self._drain_inbound()
        if not self._connected.is_set():
            return
        generation = self._generation
        if generation != self._seen_generation:
            self._seen_generation = generation
            for sub in topics.device_subscriptions(self.device_id):
                self._client.subscribe(sub, qos=1)
            self._last_sent.clear()  # every unreceipted batch is due again
            self._last_state = None
        self._publish_state()
        if not self._send_due():
            return
        while self._connected.is_set():
            batch = self.outbox.form_batch()
            if batch is None:
                break
            with self._stats_lock:
                self._stats.batches_formed += 1
            if not self._send(batch):
                break

    def _drain_inbound(self) -> None:
        while True:
            try:
                topic, payload = self._inbound.get_nowait()
            except queue.Empty:
                return
            self._handle_inbound(topic, payload)

    def _handle_inbound(self, topic: str, payload: bytes) -> None:
        try:
            msg = decode_for_topic(topic, payload)
            device, _ = topics.parse(topic)
            if device != self.device_id:
                raise MessageError(f"topic {topic} is not this device's ({self.device_id})")
        except ProtocolError as err:
            with self._stats_lock:
                self._stats.bad_messages += 1
            log.warning("refused a message on %s (%d bytes): %s", topic, len(payload), err)
            return
        if isinstance(msg, Receipt):
            deleted = self.outbox.apply_receipt(msg.up_to_seq, msg.stream)
            with self._stats_lock:
                if deleted is None:
                    self._stats.ignored_receipts += 1
                    return
                self._stats.receipts += 1
                self._stats.last_receipt_seq = max(self._stats.last_receipt_seq, msg.up_to_seq)
            for seq in [s for s in self._last_sent if s <= msg.up_to_seq]:
                del self._last_sent[seq]
            self._resends.clear()  # the hub answers: back to the normal cadence
            self._ever_sent = {s for s in self._ever_sent if s > msg.up_to_seq}
            log.debug("receipt up to seq %d: %d batches done", msg.up_to_seq, deleted)
        elif isinstance(msg, Command):
            with self._stats_lock:
                self._stats.commands += 1
            if self.on_command is not None:
                self.on_command(msg)
            else:
                log.info("command %s (%s) ignored: this agent does not take hub commands yet",
                         msg.command_id, msg.kind)

    def _publish_state(self) -> None:
        try:
            state = self.state()
        except Exception:
            log.exception("cannot compose the state message")
            return
        key = state.model_dump(exclude={"ts"})
        if key == self._last_state:
            return
        info = self._client.publish(self._state_topic, encode(state), qos=1, retain=True)
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._last_state = key
            with self._stats_lock:
                self._stats.states_published += 1

    def _send_due(self) -> bool:
        """Resend unreceipted batches whose last send is older than resend_after (all of them
        after a reconnect), in seq order; False if paho took no more."""
        now = time.monotonic()
        for seq in self.outbox.inflight():
            last = self._last_sent.get(seq)
            if last is not None:
                if now - last < resend_wait(self.settings.resend_after_seconds,
                                            self._resends.get(seq, 0)):
                    continue
                self._resends[seq] = self._resends.get(seq, 0) + 1
            batch = self.outbox.batch(seq)
            if batch is not None and not self._send(batch):
                return False
        return True

    def _send(self, batch: Batch) -> bool:
        if not self._connected.is_set():
            return False
        s = self.settings
        try:
            payload = batch.payload(self.device_id, s.agent_version, self.clock())
        except MessageError as err:
            self.outbox.replace_unsendable(batch.seq, str(err))
            replaced = self.outbox.batch(batch.seq)
            if replaced is None:
                return True
            payload = replaced.payload(self.device_id, s.agent_version, self.clock())
        info = self._client.publish(self._telemetry_topic, payload, qos=1)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            log.debug("publish of seq %d not taken by paho (%s); later", batch.seq,
                      mqtt.error_string(info.rc))
            return False
        self._last_sent[batch.seq] = time.monotonic()
        with self._stats_lock:
            self._stats.published += 1
            if batch.seq in self._ever_sent:
                self._stats.resent += 1
        self._ever_sent.add(batch.seq)
        return True


def _no_op(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """paho's socket-write callback: the network thread's select() does the writing."""
