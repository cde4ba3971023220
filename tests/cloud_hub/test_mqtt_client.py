"""The hub's MQTT client: packets parsed however the bytes arrive, against real Mosquitto (MQTT 5
and 3.1.1, keepalive, receipts queued while disconnected, TLS) and the embedded amqtt broker."""

from __future__ import annotations

import itertools
import struct
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from cloud_hub.errors import MqttConnectionError
from cloud_hub.mosquitto import MosquittoProcess
from cloud_hub.mqtt_client import HubMqttClient, Received, _packet, _string, _varint
from cloud_hub.store import HubStore
from cloud_hub.worker import HubWorker
from fleet_protocol import topics
from tests.cloud_hub.test_worker import assert_exactly_once, envelope, wait_for
from tests.tls_certs import make_certs

# --- parsing, whatever the chunks ----------------------------------------------------------


def publish_packet(topic: str, payload: bytes, *, qos: int, mid: int, v5: bool,
                   properties: bytes = b"") -> bytes:
    """A PUBLISH as a broker sends it (MQTT 5: with a properties block)."""
    body = _string(topic) + (struct.pack(">H", mid) if qos else b"")
    if v5:
        body += _varint(len(properties)) + properties
    return _packet(0x30 | (qos << 1), body + payload)


messages_st = st.lists(st.tuples(
    st.sampled_from(["edgefleet/v1/pi-1/telemetry", "edgefleet/v1/ä-2/state", "x"]),
    st.binary(max_size=300) | st.sampled_from([b"", b"x" * 20_000]),  # 1-3 length bytes
    st.sampled_from([0, 1]), st.integers(1, 65535),
    st.sampled_from([b"", b"\x01\x01", b"\x26\x00\x01k\x00\x01v" * 30])), min_size=1,
    max_size=12)


@settings(max_examples=200, deadline=None)
@given(messages=messages_st, v5=st.booleans(), cuts=st.lists(st.integers(0, 50_000),
                                                            max_size=8))
def test_publishes_are_parsed_however_the_bytes_are_cut(messages: list[Any], v5: bool,
                                                        cuts: list[int]) -> None:
    """Every PUBLISH comes out once, in order, with its topic, QoS, packet id and payload,
    whatever recv boundaries split the stream (mid-header, mid-length, mid-payload)."""
    wire = b"".join(publish_packet(t, p, qos=q, mid=m, v5=v5, properties=props)
                    for t, p, q, m, props in messages)
    client = HubMqttClient("127.0.0.1", 1, client_id="t", v5=v5, keepalive=0)
    got: list[Received] = []
    bounds = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    for a, b in itertools.pairwise(bounds):
        client._buf += wire[a:b]
        received, events = client._parse()
        got += received
        assert events == []
    assert got == [(m if q else 0, q, t, p) for t, p, q, m, _ in messages]
    assert client._buf == b""


def test_a_qos2_publish_or_an_unknown_packet_is_a_protocol_error() -> None:
    """The hub subscribes at QoS 1: a QoS 2 PUBLISH (or a packet type it never asked for)
    breaks the connection instead of being acknowledged wrongly."""
    for wire in (publish_packet("a/b", b"x", qos=2, mid=7, v5=True),
                 _packet(0x50, b"\x00\x07")):  # PUBREC
        client = HubMqttClient("127.0.0.1", 1, client_id="t", v5=True, keepalive=0)
        client._buf += wire
        with pytest.raises(MqttConnectionError):
            client._parse()


# --- against real brokers --------------------------------------------------------------------


class Listener:
    """A paho subscriber: what arrives on ``topic`` (the device's side of receipts)."""

    def __init__(self, url: str, topic: str, **tls: Any) -> None:
        from cloud_hub.worker import parse_broker_url

        address = parse_broker_url(url)
        self.got: list[bytes] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="listener",
                                  protocol=mqtt.MQTTv5)
        if tls:
            self.client.tls_set(**tls)
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = lambda c, u, m: self.got.append(bytes(m.payload))
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.connect(address.host, address.port)
        self.client.loop_start()
        wait_for(subscribed.is_set, 10, "the listener to subscribe")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def serve(client: HubMqttClient, seconds: float) -> list[tuple[Any, ...]]:
    """Run the client's read/ping loop for a while; the control events it saw."""
    events: list[tuple[Any, ...]] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        client.flush()
        readable, _ = client.wait(min(0.05, client.tick(time.monotonic())))
        if readable:
            events += client.read()[1]
    return events


@pytest.mark.parametrize("v5", [True, False])
def test_receipts_queued_offline_go_out_after_connect_and_pings_keep_it_alive(
        mosquitto: MosquittoProcess, v5: bool) -> None:
    """QoS 1 messages published while disconnected wait and are sent after the CONNACK; a
    connection with a 1 s keepalive and nothing to say pings and stays up."""
    listener = Listener(mosquitto.url, "edgefleet/v1/+/receipt")
    client = HubMqttClient("127.0.0.1", mosquitto.port, client_id="hub-client-test", v5=v5,
                           keepalive=1, session_expiry=60, receive_maximum=10)
    try:
        client.publish(topics.receipt("pi-1"), b"first")
        assert client.unacknowledged == 1 and not client.connected
        ack = client.connect()
        assert ack.ok
        mid = client.subscribe(["edgefleet/v1/+/telemetry"])
        events = serve(client, 2.5)
        assert ("suback", mid, [1]) in events
        assert client.connected and client.unacknowledged == 0
        wait_for(lambda: listener.got == [b"first"], 10, "the queued receipt")
        client.disconnect(end_session=True)
        assert not client.connected
    finally:
        client.close()
        listener.close()


def test_the_probe_tells_mqtt5_from_311(mosquitto: MosquittoProcess) -> None:
    """Mosquitto accepts a bare MQTT 5 CONNECT; amqtt answers "unsupported protocol version";
    a port with no broker is a connection error."""
    from cloud_hub.embedded_broker import EmbeddedBroker

    probe = HubMqttClient("127.0.0.1", mosquitto.port, client_id="probe", v5=True, keepalive=5)
    assert probe.probe().ok
    with EmbeddedBroker() as broker:
        answer = HubMqttClient(broker.host, broker.port, client_id="probe", v5=True,
                               keepalive=5).probe()
        assert answer.not_v5 and not answer.ok
    from cloud_hub.mosquitto import free_port

    with pytest.raises(MqttConnectionError, match="cannot connect"):
        HubMqttClient("127.0.0.1", free_port(), client_id="probe", v5=True,
                      keepalive=5, connect_timeout=2).probe()


# --- TLS ----------------------------------------------------------------------------------


def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key) PEM files."""
    files = make_certs(folder)
    return files["ca"], files["server"], files["server_key"]


def test_hub_ingests_over_tls_and_refuses_an_unknown_ca(tmp_path: Path) -> None:
    """mqtts://: the worker checks the broker's certificate against ca_certs (and its host
    name), stores what a device sends over TLS and receipts it; with another CA it never
    connects; a CA file that cannot be read is a ValueError naming it."""
    ca, cert, key = _certificates(tmp_path)
    (tmp_path / "other").mkdir()
    other_ca, _, _ = _certificates(tmp_path / "other")
    broker = MosquittoProcess(tmp_path / "broker", extra_conf=f"cafile {ca}\ncertfile {cert}\n"
                              f"keyfile {key}\nrequire_certificate false")
    broker.start()
    url = f"mqtts://127.0.0.1:{broker.port}"
    workers: list[HubWorker] = []
    device: Listener | None = None
    try:
        with HubStore(path=tmp_path / "hub.db") as store:
            bad = HubWorker(store, broker_url=url, ca_certs=other_ca, client_id="hub-bad-ca",
                            reconnect_min=0.05, reconnect_max=0.2)
            workers.append(bad.start())
            assert not bad.wait_connected(1.5)
            worker = HubWorker(store, broker_url=url, ca_certs=ca, client_id="hub-tls")
            workers.append(worker.start())
            assert worker.wait_subscribed(15)
            device = Listener(url, topics.receipt("pi-1"), ca_certs=str(ca))
            for seq in (1, 2, 3):
                device.client.publish(topics.telemetry("pi-1"), envelope("pi-1", seq), qos=1)
            got = device.got
            wait_for(lambda: any(b'"up_to_seq":3' in p for p in got), 30,
                     "the receipt for seq 3 over TLS")
            assert_exactly_once(store, ["pi-1"], 3)
        with pytest.raises(ValueError, match="cannot be loaded"):
            HubWorker(HubStoreStub(), broker_url=url, ca_certs=tmp_path / "missing.pem")
    finally:
        for w in workers:
            w.stop()
        if device is not None:
            device.close()
        broker.stop()


class HubStoreStub:
    def ingest(self, messages: Any, *, now: float, worker: str = "") -> Any:
        raise AssertionError("not used")


# --- packet size bounds ------------------------------------------------------------------------

LIMIT = 2048  # a small max_packet_size, so that "oversized" stays cheap to generate

sized_st = st.lists(st.tuples(
    st.sampled_from(["edgefleet/v1/pi-1/telemetry", "edgefleet/v1/ä-2/state"]),
    st.sampled_from([0, 10, LIMIT - 60, LIMIT + 1, 5_000, 300_000]),  # payload bytes
    st.sampled_from([0, 1]), st.integers(1, 65535)), min_size=1, max_size=8)


@settings(max_examples=100, deadline=None)
@given(messages=sized_st, v5=st.booleans(), cuts=st.lists(st.integers(0, 400_000), max_size=8))
def test_oversized_publishes_are_skipped_unbuffered_however_the_bytes_are_cut(
        messages: list[Any], v5: bool, cuts: list[int]) -> None:
    """A PUBLISH over max_packet_size never sits in the buffer, whatever the recv boundaries:
    its bytes are discarded as they come, the messages around it come out intact, and once
    skipped it is reported ("oversized", with its topic) and, at QoS 1, acknowledged."""
    packets = [publish_packet(t, b"p" * size, qos=q, mid=m, v5=v5) for t, size, q, m in messages]
    wire = b"".join(packets)
    client = HubMqttClient("127.0.0.1", 1, client_id="t", v5=v5, keepalive=0,
                           max_packet_size=LIMIT)
    got: list[Received] = []
    events: list[tuple[Any, ...]] = []
    bounds = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    for a, b in itertools.pairwise(bounds):
        client._buf += wire[a:b]
        received, new_events = client._parse()
        got += received
        events += new_events
        assert len(client._buf) <= LIMIT  # never more than one packet the hub takes
    small = [(t, s, q, m) for (t, s, q, m), p in zip(messages, packets, strict=True)
             if len(p) <= LIMIT]
    big = [(t, q, m, len(p)) for (t, s, q, m), p in zip(messages, packets, strict=True)
           if len(p) > LIMIT]
    assert got == [(m if q else 0, q, t, b"p" * s) for t, s, q, m in small]
    assert events == [("oversized", t, q, size) for t, q, _, size in big]
    assert b"".join(client._out) == b"".join(struct.pack(">HH", 0x4002, m)
                                             for _, q, m, _ in big if q)
    assert client._buf == b"" and client._skip == 0


def test_an_oversized_control_packet_is_a_protocol_error() -> None:
    """Only a PUBLISH is skipped: a SUBACK (or any other packet) declaring more than
    max_packet_size breaks the connection as soon as its length is read, before its body."""
    client = HubMqttClient("127.0.0.1", 1, client_id="t", v5=True, keepalive=0,
                           max_packet_size=LIMIT)
    client._buf += b"\x90" + _varint(200 * 1024 * 1024)
    with pytest.raises(MqttConnectionError, match="larger than the maximum packet size"):
        client._parse()


class FakeBroker:
    """A listening socket that answers one CONNECT with ``reply`` and keeps the connection
    open: the protocol violations no real broker here commits. ``connect`` holds the CONNECT."""

    def __init__(self, reply: bytes) -> None:
        import socket

        self.reply = reply
        self.connect = b""
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            conn.settimeout(5)
            self.connect = conn.recv(65536)
            conn.sendall(self.reply)
            self.done.wait(10)

    def close(self) -> None:
        self.done.set()
        self.thread.join(10)
        self.server.close()


def test_connect_announces_the_maximum_packet_size_and_never_buffers_a_huge_connack() -> None:
    """The MQTT 5 CONNECT carries Maximum Packet Size (property 0x27) = max_packet_size; an
    answer declaring 200 MiB is refused as soon as its length is read, not waited for."""
    broker = FakeBroker(b"\x20" + _varint(200 * 1024 * 1024) + b"\x00\x00")
    try:
        client = HubMqttClient("127.0.0.1", broker.port, client_id="t", v5=True, keepalive=5,
                               max_packet_size=LIMIT, connect_timeout=30)
        started = time.monotonic()
        with pytest.raises(MqttConnectionError, match="larger than the maximum packet size"):
            client.connect()
        assert time.monotonic() - started < 10  # not the connect timeout
        assert b"\x27" + struct.pack(">I", LIMIT) in broker.connect
    finally:
        broker.close()


def test_a_receive_maximum_of_zero_is_a_protocol_error() -> None:
    """A CONNACK with Receive Maximum 0 (which MQTT 5 forbids) is refused: as a cap on
    receipts in flight it would hold every receipt back forever."""
    props = b"\x21\x00\x00"
    broker = FakeBroker(_packet(0x20, b"\x00\x00" + _varint(len(props)) + props))
    try:
        client = HubMqttClient("127.0.0.1", broker.port, client_id="t", v5=True, keepalive=5)
        with pytest.raises(MqttConnectionError, match="Receive Maximum of 0"):
            client.connect()
        assert not client.connected
    finally:
        broker.close()


def publisher(url: str, protocol: MQTTProtocolVersion = mqtt.MQTTv311) -> Any:
    """A paho client that publishes (a device)."""
    from cloud_hub.worker import parse_broker_url

    address = parse_broker_url(url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="device", protocol=protocol)
    client.connect(address.host, address.port)
    client.loop_start()
    return client


def read_until(client: HubMqttClient, cond: Any, timeout: float = 10.0
               ) -> tuple[list[Received], list[tuple[Any, ...]]]:
    """Serve the client until ``cond(received, events)``; the buffer never past the limit."""
    received: list[Received] = []
    events: list[tuple[Any, ...]] = []
    deadline = time.monotonic() + timeout
    while not cond(received, events):
        assert time.monotonic() < deadline, f"timed out: {received!r:.300} {events}"
        client.flush()
        if client.wait(0.05)[0]:
            r, e = client.read()
            received += r
            events += e
            assert len(client._buf) <= client.max_packet_size
    client.flush()
    return received, events


def test_mosquitto_drops_for_an_mqtt5_hub_what_is_over_its_maximum_packet_size(
        mosquitto: MosquittoProcess) -> None:
    """Told the limit in the CONNECT, Mosquitto never sends the hub a larger message: the
    message after it arrives, it does not."""
    client = HubMqttClient("127.0.0.1", mosquitto.port, client_id="hub-v5-limit", v5=True,
                           keepalive=10, max_packet_size=65536)
    device = publisher(mosquitto.url)
    try:
        assert client.connect().ok
        mid = client.subscribe(["edgefleet/v1/+/telemetry"])
        read_until(client, lambda r, e: ("suback", mid, [1]) in e)
        device.publish(topics.telemetry("pi-1"), b"x" * 200_000, qos=1).wait_for_publish(10)
        device.publish(topics.telemetry("pi-1"), b"sentinel", qos=1).wait_for_publish(10)
        received, events = read_until(client, lambda r, e: bool(r))
        assert [p for _, _, _, p in received] == [b"sentinel"] and events == []
    finally:
        client.close()
        device.disconnect()
        device.loop_stop()


def test_an_oversized_publish_over_311_is_skipped_and_acknowledged(
        mosquitto: MosquittoProcess) -> None:
    """A 3.1.1 broker cannot be told the limit: its oversized PUBLISH is read past without
    being buffered, reported with its topic, and acknowledged, so the broker does not send it
    again on the next connection of the session (a later sentinel arrives alone)."""
    def connect() -> HubMqttClient:
        c = HubMqttClient("127.0.0.1", mosquitto.port, client_id="hub-311-limit", v5=False,
                          keepalive=10, max_packet_size=65536)
        assert c.connect().ok
        return c

    client = connect()
    device = publisher(mosquitto.url)
    try:
        mid = client.subscribe(["edgefleet/v1/+/telemetry"])
        read_until(client, lambda r, e: ("suback", mid, [1]) in e)
        device.publish(topics.telemetry("pi-1"), b"x" * 600_000, qos=1).wait_for_publish(10)
        device.publish(topics.telemetry("pi-1"), b"sentinel", qos=1).wait_for_publish(10)
        received, events = read_until(client, lambda r, e: bool(r))
        assert [p for _, _, _, p in received] == [b"sentinel"]
        assert [e[:3] for e in events] == [("oversized", topics.telemetry("pi-1"), 1)]
        assert events[0][3] > 600_000
        client.ack([received[0][0]])
        client.disconnect()  # the session stays (3.1.1, clean session off)

        client = connect()
        device.publish(topics.telemetry("pi-1"), b"sentinel 2", qos=1).wait_for_publish(10)
        received, events = read_until(client, lambda r, e: bool(r))
        assert [p for _, _, _, p in received] == [b"sentinel 2"] and events == []
    finally:
        client.close()
        device.disconnect()
        device.loop_stop()


def test_pings_do_not_time_out_while_the_caller_does_not_read(
        mosquitto: MosquittoProcess) -> None:
    """While the caller does not read (back-pressure), the PINGRESP waits unread in the socket:
    the client keeps pinging and does not declare the broker dead; once it reads again the
    answers come and the connection goes on."""
    client = HubMqttClient("127.0.0.1", mosquitto.port, client_id="hub-no-read", v5=False,
                           keepalive=1)
    try:
        assert client.connect().ok
        deadline = time.monotonic() + 3.5  # three and a half keepalives without reading
        while time.monotonic() < deadline:
            client.tick(time.monotonic(), reading=False)
            time.sleep(0.1)
        serve(client, 2.5)  # reads, and ticks with the deadline enforced
        assert client.connected
    finally:
        client.close()
