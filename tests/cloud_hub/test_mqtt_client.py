"""The hub's MQTT client: packets parsed however the bytes arrive, against real Mosquitto (MQTT 5
and 3.1.1, keepalive, receipts queued while disconnected, TLS) and the embedded amqtt broker."""

from __future__ import annotations

import datetime
import ipaddress
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
from paho.mqtt.enums import CallbackAPIVersion

from cloud_hub.errors import MqttConnectionError
from cloud_hub.mosquitto import MosquittoProcess
from cloud_hub.mqtt_client import HubMqttClient, Received, _packet, _string, _varint
from cloud_hub.store import HubStore
from cloud_hub.worker import HubWorker
from fleet_protocol import topics
from tests.cloud_hub.test_worker import assert_exactly_once, envelope, wait_for

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
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("test ca")).issuer_name(name("test ca"))
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(name("test ca"))
            .public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


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
