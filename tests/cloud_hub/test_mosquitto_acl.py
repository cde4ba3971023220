"""devices/mosquitto/ as shipped: a real Mosquitto started from its mosquitto.conf and acl
(only the port, the persistence folder, the password file and the user to run as swapped), with
a password file made by ``mosquitto_passwd -b``.

Negative checks ("never arrives") use a sentinel: after the forbidden message, the same
client sends an allowed one on the same connection; MQTT keeps their order, so once the
sentinel arrives the forbidden one would have arrived before it.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from cloud_hub.mosquitto import MosquittoProcess, adapt_conf, free_port
from cloud_hub.store import HubStore
from cloud_hub.worker import MAX_PACKET_SIZE, HubWorker
from fleet_protocol import messages, topics, wire
from tests.cloud_hub.test_worker import assert_exactly_once, envelope, wait_for

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "devices" / "mosquitto" / "mosquitto.conf"
ACL = ROOT / "devices" / "mosquitto" / "acl"
USERS = {"hub": "hub-secret", "pi-1": "pi-1-secret", "pi-2": "pi-2-secret"}


def conf_options(text: str) -> dict[str, list[str]]:
    """Active (uncommented) options of a Mosquitto config: name -> values."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        words = line.split(None, 1)
        if words and not words[0].startswith("#"):
            out.setdefault(words[0], []).append(words[1].strip() if len(words) > 1 else "")
    return out


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """Mosquitto running the shipped config and ACL, users made with mosquitto_passwd -b."""
    passwd = tmp_path / "passwd"
    for i, (user, password) in enumerate(USERS.items()):
        subprocess.run(["mosquitto_passwd", *(["-c"] if i == 0 else []), "-b", str(passwd),
                        user, password], check=True, capture_output=True)
    port = free_port()
    workdir = tmp_path / "broker"
    # Started as root, Mosquitto drops to the `mosquitto` user before reading the password
    # file, which pytest's private tmp folder hides from it: run as the user running the tests.
    me = pwd.getpwuid(os.geteuid()).pw_name
    conf = adapt_conf(CONF.read_text(encoding="utf-8"), workdir=workdir, port=port,
                      options={"password_file": passwd, "acl_file": ACL, "user": me})
    process = MosquittoProcess(workdir, port=port, conf=conf)
    process.start()
    try:
        yield process
    finally:
        process.kill()


class Client:
    """A paho client logged in as ``user``; records what it receives and its acks."""

    def __init__(self, broker: MosquittoProcess, user: str | None, password: str | None = None,
                 *, protocol: MQTTProtocolVersion = mqtt.MQTTv5) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.connack: list[Any] = []
        self.subacks: list[list[Any]] = []
        self.pubacks: dict[int, Any] = {}
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-{user}",
                                  protocol=protocol)
        if user is not None:
            self.client.username_pw_set(user, password if password is not None else USERS[user])
        self.client.on_connect = lambda c, u, f, rc, p: self.connack.append(rc)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.append(list(rcs))
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        wait_for(lambda: bool(self.connack), 10, f"CONNACK for {user}")

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        with self.lock:
            self.pubacks[mid] = rc

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self.lock:
            self.got.append((msg.topic, bytes(msg.payload)))

    @property
    def accepted(self) -> bool:
        return not self.connack[0].is_failure

    def subscribe(self, *filters: str) -> None:
        n = len(self.subacks)
        self.client.subscribe([(f, 1) for f in filters])
        wait_for(lambda: len(self.subacks) > n, 10, f"SUBACK for {filters}")

    def publish(self, topic: str, payload: bytes) -> Any:
        info = self.client.publish(topic, payload, qos=1)
        wait_for(lambda: info.mid in self.pubacks, 10, f"PUBACK for {topic}")
        return self.pubacks[info.mid]

    def received(self, topic: str, payload: bytes) -> bool:
        with self.lock:
            return (topic, payload) in self.got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def connect(broker: MosquittoProcess) -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(user: str | None, password: str | None = None, **kw: Any) -> Client:
        c = Client(broker, user, password, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def test_shipped_config_sets_the_production_options() -> None:
    """The shipped config refuses anonymous clients, persists often, bounds sizes and queues,
    its message size limit is the protocol's largest message (TelemetryEnvelope) and its
    packet size limit the hub's own (what the hub announces to the broker)."""
    options = conf_options(CONF.read_text(encoding="utf-8"))
    assert options["allow_anonymous"] == ["false"]
    assert options["persistence"] == ["true"]
    assert int(options["autosave_interval"][0]) <= 60
    assert int(options["message_size_limit"][0]) == messages.TelemetryEnvelope.MAX_WIRE_BYTES
    assert int(options["max_packet_size"][0]) == MAX_PACKET_SIZE
    for name in ("password_file", "acl_file", "max_queued_messages", "max_queued_bytes",
                 "max_inflight_messages", "persistent_client_expiration"):
        assert name in options, name
    assert options["listener"] == ["1883 127.0.0.1"]  # plain MQTT on loopback only
    text = CONF.read_text(encoding="utf-8")
    assert "#listener 8883" in text and "#certfile" in text  # the TLS listener, to uncomment


def test_device_cannot_publish_as_another_device(connect: Callable[..., Client]) -> None:
    """pi-1 publishing on pi-2's telemetry topic is refused and never reaches the hub's shared
    subscription; on its own topic it does."""
    hub = connect("hub")
    hub.subscribe(*topics.hub_subscriptions("hub"))
    pi1 = connect("pi-1")
    forged = pi1.publish(topics.telemetry("pi-2"), b"forged")
    own = pi1.publish(topics.telemetry("pi-1"), b"own")
    assert forged.is_failure and not own.is_failure  # MQTT 5 PUBACK: "Not authorized"
    wait_for(lambda: hub.received(topics.telemetry("pi-1"), b"own"), 10, "pi-1's own message")
    assert not hub.received(topics.telemetry("pi-2"), b"forged")
    assert [t for t, _ in hub.got] == [topics.telemetry("pi-1")]
    # nor may it publish a receipt or a command to anyone, itself included
    assert pi1.publish(topics.receipt("pi-2"), b"fake receipt").is_failure
    assert pi1.publish(topics.cmd("pi-1"), b"fake command").is_failure


def test_device_cannot_read_another_devices_topics(connect: Callable[..., Client]) -> None:
    """pi-1 subscribing to pi-2's receipts and commands (directly or by wildcard) never gets
    them; pi-2 does, and pi-1 gets its own."""
    pi1, pi2 = connect("pi-1"), connect("pi-2")
    pi1.subscribe(topics.receipt("pi-2"), topics.cmd("pi-2"), "edgefleet/v1/+/receipt",
                  topics.receipt("pi-1"))
    pi2.subscribe(*topics.device_subscriptions("pi-2"))
    hub = connect("hub")
    assert not hub.publish(topics.receipt("pi-2"), b"for pi-2").is_failure
    assert not hub.publish(topics.cmd("pi-2"), b"cmd for pi-2").is_failure
    assert not hub.publish(topics.receipt("pi-1"), b"for pi-1").is_failure  # the sentinel
    wait_for(lambda: pi1.received(topics.receipt("pi-1"), b"for pi-1"), 10, "pi-1's receipt")
    wait_for(lambda: pi2.received(topics.cmd("pi-2"), b"cmd for pi-2"), 10, "pi-2's command")
    assert {t for t, _ in pi1.got} == {topics.receipt("pi-1")}
    assert pi2.received(topics.receipt("pi-2"), b"for pi-2")


def test_anonymous_and_wrong_passwords_are_refused(connect: Callable[..., Client]) -> None:
    """No username, a wrong password and an unknown user are all refused at CONNECT."""
    assert not connect(None).accepted
    assert not connect("pi-1", "not-the-password").accepted
    assert not connect("pi-9", "whatever").accepted
    assert not connect(None, protocol=mqtt.MQTTv311).accepted
    assert connect("pi-1").accepted


def test_oversized_message_never_reaches_the_hub(connect: Callable[..., Client]) -> None:
    """A payload one byte over TelemetryEnvelope.MAX_WIRE_BYTES is dropped by the broker."""
    hub = connect("hub")
    hub.subscribe(*topics.hub_subscriptions("hub"))
    pi1 = connect("pi-1", protocol=mqtt.MQTTv311)  # 3.1.1: the broker still PUBACKs it
    limit = messages.TelemetryEnvelope.MAX_WIRE_BYTES
    pi1.publish(topics.telemetry("pi-1"), b"{" + b" " * limit)
    pi1.publish(topics.telemetry("pi-1"), b"sentinel")
    wait_for(lambda: hub.received(topics.telemetry("pi-1"), b"sentinel"), 10, "the sentinel")
    assert [len(p) for _, p in hub.got] == [len(b"sentinel")]


def test_a_packet_over_max_packet_size_disconnects_its_sender(
        connect: Callable[..., Client]) -> None:
    """A device declaring a packet over max_packet_size is disconnected at once (the broker
    does not read it into memory first), and the hub never gets it."""
    hub = connect("hub")
    hub.subscribe(*topics.hub_subscriptions("hub"))
    pi1 = connect("pi-1", protocol=mqtt.MQTTv311)
    disconnected = threading.Event()
    pi1.client.on_disconnect = lambda *a: disconnected.set()
    pi1.client.reconnect_delay_set(30, 60)  # paho would send it again on reconnect
    pi1.client.publish(topics.telemetry("pi-1"), b"x" * MAX_PACKET_SIZE, qos=1)
    wait_for(disconnected.is_set, 10, "the broker to disconnect pi-1")
    pi2 = connect("pi-2")
    pi2.publish(topics.telemetry("pi-2"), b"sentinel")
    wait_for(lambda: hub.received(topics.telemetry("pi-2"), b"sentinel"), 10, "the sentinel")
    assert [len(p) for _, p in hub.got] == [len(b"sentinel")]


def test_hub_ingests_and_receipts_through_the_acl(broker: MosquittoProcess,
                                                  connect: Callable[..., Client],
                                                  tmp_path: Path) -> None:
    """The hub worker, logged in as `hub`, stores pi-1's envelopes and its receipt reaches pi-1;
    pi-1's envelope forged for pi-2 is refused by the broker and stored nowhere."""
    pi1 = connect("pi-1")
    pi1.subscribe(*topics.device_subscriptions("pi-1"))
    with HubStore(path=tmp_path / "hub.db") as store:
        worker = HubWorker(store, broker_url=broker.url, username="hub",
                           password=USERS["hub"], client_id="hub-acl")
        worker.start()
        try:
            assert worker.wait_subscribed(15)
            assert pi1.publish(topics.telemetry("pi-2"), envelope("pi-2", 1)).is_failure
            for seq in (1, 2, 3):
                assert not pi1.publish(topics.telemetry("pi-1"), envelope("pi-1", seq)).is_failure

            def receipted() -> bool:
                with pi1.lock:
                    return any(wire.decode(p, messages.Receipt).up_to_seq == 3
                               for t, p in pi1.got if t == topics.receipt("pi-1"))

            wait_for(receipted, 30, "pi-1's receipt for seq 3")
            assert_exactly_once(store, ["pi-1"], 3)
            assert [d.device_id for d in store.devices()] == ["pi-1"]
            assert worker.stats()["rejected"] == 0
        finally:
            worker.stop()
