"""The sync adapter against a real Mosquitto and a tiny fake hub: nothing lost, nothing doubled.

The fake hub does what DESIGN asks of the real one, no more: it stores each (device, seq) once
and answers with a Receipt naming the highest seq it holds without gaps. Duplicates on the wire
are allowed; totals deduplicated by seq must be exact.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edge_agent.config import AgentConfig, SyncConfig, load_config
from edge_agent.errors import ConfigError
from edge_agent.outbox import Outbox, outbox_status
from edge_agent.store import AgentStore, WriteBatch
from edge_agent.sync import Backoff, Sync, SyncSettings, full_jitter
from fleet_protocol import topics
from fleet_protocol.messages import Receipt, StateMessage, TelemetryEnvelope, UnsignedCommand
from fleet_protocol.wire import decode_for_topic, encode
from tests.conftest import make_classification_data
from tests.edge_agent.test_outbox import window
from tests.tls_certs import make_certs

ROOT = Path(__file__).resolve().parents[2]
DEVICE = "pi-7"


def wait_for(cond: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``cond`` until it is truthy; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class FakeHub:
    """Stores each (device, seq) once and answers receipts: the hub's delivery contract."""

    def __init__(self, port: int, *, answer: bool = True) -> None:
        self.answer = answer
        self.lock = threading.Lock()
        self.stored: dict[str, dict[int, TelemetryEnvelope]] = defaultdict(dict)
        self.wire = 0
        self.mismatched: list[int] = []  # a resend whose id or items differ from the first
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fake-hub",
                                  protocol=MQTTProtocolVersion.MQTTv5)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        # paho annotates whole seconds but waits any float: sub-second retries keep tests fast
        self.client.reconnect_delay_set(cast(int, 0.05), cast(int, 0.2))
        self.client.connect_async("127.0.0.1", port)
        self.client.loop_start()

    def _on_connect(self, client: mqtt.Client, *_: Any) -> None:
        client.subscribe("edgefleet/v1/+/telemetry", qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: Any) -> None:
        env = decode_for_topic(message.topic, message.payload)
        assert isinstance(env, TelemetryEnvelope)
        with self.lock:
            self.wire += 1
            seqs = self.stored[env.device_id]
            first = seqs.setdefault(env.seq, env)
            if (first.message_id, first.items) != (env.message_id, env.items):
                self.mismatched.append(env.seq)
            up_to = self.contiguous(env.device_id)
        if self.answer:
            receipt = Receipt(device_id=env.device_id, stream=env.stream, up_to_seq=up_to,
                              ts=time.time())
            client.publish(topics.receipt(env.device_id), encode(receipt), qos=1)

    def contiguous(self, device: str) -> int:
        seqs = self.stored[device]
        n = 0
        while n + 1 in seqs:
            n += 1
        return n

    def windows(self, device: str = DEVICE) -> list[tuple[str, float]]:
        """Window items stored, deduplicated by seq: (model, start) in seq order."""
        with self.lock:
            envs = [self.stored[device][s] for s in sorted(self.stored[device])]
        return [(i.model_name, i.start) for e in envs for i in e.items if i.kind == "window"]

    def items(self, device: str = DEVICE) -> list[Any]:
        with self.lock:
            return [i for s in sorted(self.stored[device]) for i in self.stored[device][s].items]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class StateWatch:
    """Collects (retained flag, StateMessage) on one device's state topic."""

    def __init__(self, port: int, device: str = DEVICE) -> None:
        self.seen: list[tuple[bool, StateMessage]] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        self.client.on_connect = lambda c, *_: c.subscribe(topics.state(device), qos=1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: Any) -> None:
        msg = decode_for_topic(message.topic, message.payload)
        assert isinstance(msg, StateMessage)
        self.seen.append((bool(message.retain), msg))

    def last(self) -> StateMessage | None:
        return self.seen[-1][1] if self.seen else None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained_state(port: int, device: str = DEVICE, timeout: float = 10.0) -> StateMessage:
    """What a new subscriber gets first: the retained state."""
    watch = StateWatch(port, device)
    try:
        wait_for(lambda: watch.seen, timeout, "the retained state")
        retained, msg = watch.seen[0]
        assert retained
        return msg
    finally:
        watch.close()


def online(device: str = DEVICE, phase: str = "idle") -> StateMessage:
    return StateMessage(device_id=device, online=True, agent_version="0.1.0", swap_phase=phase,
                        ts=time.time())


def settings(port: int, **kw: Any) -> SyncSettings:
    fast: dict[str, Any] = dict(device_id=DEVICE, host="127.0.0.1", port=port,
                                max_batch_items=5, max_inflight=3, resend_after_seconds=0.5,
                                backoff_base_seconds=0.05, backoff_cap_seconds=0.4,
                                poll_seconds=0.05, connect_timeout_seconds=3.0)
    fast.update(kw)
    return SyncSettings(**fast)


@pytest.fixture
def hub(mosquitto: Any) -> Iterator[FakeHub]:
    h = FakeHub(mosquitto.port)
    yield h
    h.close()


def start_sync(store: AgentStore, s: SyncSettings, state: Callable[[], StateMessage] = online,
               **kw: Any) -> Sync:
    outbox = Outbox(store, max_batch_items=s.max_batch_items, max_inflight=s.max_inflight)
    return Sync(s, outbox, state, rng=random.Random(7), **kw).start()


def drained(store: AgentStore) -> bool:
    return outbox_status(store).rows == 0


# --- backoff ----------------------------------------------------------------------------------


def test_full_jitter_spreads_reconnects() -> None:
    """Delays are uniform over [0, min(cap, base*2**n)]: a fleet reconnecting after an outage
    spreads out instead of stampeding (seeded, so the figures are exact every run)."""
    rng = random.Random(2024)
    for attempt in range(8):
        ceiling = min(30.0, 0.5 * 2**attempt)
        delays = [full_jitter(attempt, 0.5, 30.0, rng) for _ in range(2000)]
        assert 0 <= min(delays) < 0.02 * ceiling and 0.98 * ceiling < max(delays) <= ceiling
        assert statistics.mean(delays) == pytest.approx(ceiling / 2, rel=0.06)
        assert statistics.pstdev(delays) == pytest.approx(ceiling / 12**0.5, rel=0.06)
        counts = np.histogram(delays, bins=10, range=(0, ceiling))[0]
        assert counts.min() > 150  # every tenth of the interval gets its share (200 expected)
    assert full_jitter(10_000, 1.0, 60.0, rng) <= 60.0  # no overflow far out


def test_backoff_grows_and_resets() -> None:
    """Attempt n draws from [0, base*2**n] up to the cap; a success starts over at attempt 0."""
    b = Backoff(0.1, 1.0, random.Random(1))
    assert [b.next() <= c for c in (0.1, 0.2, 0.4, 0.8, 1.0, 1.0)] == [True] * 6
    assert b.attempt == 6
    b.reset()
    assert b.attempt == 0 and b.next() <= 0.1
    with pytest.raises(ValueError):
        Backoff(2.0, 1.0)


# --- config -----------------------------------------------------------------------------------


def _config(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> AgentConfig:
    p = tmp_path / "agent.toml"
    p.write_text(f'device_id = "{DEVICE}"\ndata_dir = "{tmp_path}"\ntrusted_keys = ["/k"]\n'
                 + text)
    return load_config(p, environ=environ or {})


def test_sync_config_tls_user_password_and_tags(tmp_path: Path) -> None:
    """[sync] with TLS files and a password file resolves to settings; tags are validated;
    the password never shows in the config's repr; env overrides keep secrets as text."""
    (tmp_path / "pw").write_text("s3cret\n")
    cfg = _config(tmp_path, 'tags = {site = "a", line = "l-2"}\n[sync]\n'
                  'broker_url = "mqtts://broker.example:8884"\nusername = "pi-7"\n'
                  f'password_file = "{tmp_path / "pw"}"\nca_certs = "/etc/ca.pem"\n'
                  'certfile = "/etc/c.pem"\nkeyfile = "/etc/k.pem"\nmax_inflight = 2\n')
    s = SyncSettings.from_config(cfg)
    assert (s.host, s.port, s.tls, s.username, s.password) == ("broker.example", 8884, True,
                                                                "pi-7", "s3cret")
    assert (s.ca_certs, s.certfile, s.keyfile, s.max_inflight) == ("/etc/ca.pem", "/etc/c.pem",
                                                                   "/etc/k.pem", 2)
    assert cfg.tags == {"site": "a", "line": "l-2"} and "s3cret" not in repr(s)
    plain = _config(tmp_path, '[sync]\nbroker_url = "mqtt://h"\n',
                    {"EDGEFLEET_AGENT_SYNC__PASSWORD": "1234",
                     "EDGEFLEET_AGENT_SYNC__USERNAME": "007"})
    assert plain.sync.enabled and plain.sync.port == 1883 and not plain.sync.tls
    assert (plain.sync.username, plain.sync.password_text()) == ("007", "1234")
    assert "1234" not in repr(plain)
    assert not _config(tmp_path, "").sync.enabled
    assert _config(tmp_path, '[sync]\nbroker_url = "mqtt://h"\nenabled = false\n'
                   ).sync.enabled is False


@pytest.mark.parametrize(("text", "expected"), [
    ('[sync]\nenabled = true\n', "sync.broker_url is not set"),
    ('[sync]\nbroker_url = "http://h"\n', "config key sync.broker_url = 'http://h'"),
    ('[sync]\nbroker_url = "mqtt://h:99999"\n', "sync.broker_url = 'mqtt://h:99999'"),
    ('[sync]\nbroker_url = "mqtt://u:p@h"\n', "sync.password_file"),
    ('[sync]\nbroker_url = "mqtt://h"\nca_certs = "/ca"\n', "is not mqtts://"),
    ('[sync]\nbroker_url = "mqtts://h"\ncertfile = "/c"\n', "go together"),
    ('[sync]\nbroker_url = "mqtt://h"\npassword = "x"\npassword_file = "/p"\n', "not both"),
    ('[sync]\nbroker_url = "mqtt://h"\nmax_inflight = 0\n', "sync.max_inflight = 0"),
    ('[sync]\nbroker_url = "mqtt://h"\nbackoff_cap_seconds = 0.5\n', "below"),
    ('[sync]\nbroker_url = "mqtt://h"\nquota_bytes = 1048576\nmax_inflight = 4\n'
     'max_batch_bytes = 262144\n', "sync.quota_bytes = 1048576 is below 2 x sync.max_inflight "
     "(4) x sync.max_batch_bytes (262144) = 2097152"),
    ('tags = {Site = "a"}\n', "config key tags.Site"),
    ('tags = {site = "a b"}\n', "config key tags.site = 'a b'"),
])
def test_bad_sync_config_names_key_and_value(tmp_path: Path, text: str, expected: str) -> None:
    """Each bad [sync] key or tag is refused naming the key (and the value, never a
    password)."""
    with pytest.raises(ConfigError) as info:
        _config(tmp_path, text)
    assert expected in str(info.value)
    assert "'x'" not in str(info.value)


def test_unreadable_password_file_and_tls_files_are_config_errors(tmp_path: Path,
                                                                  store: AgentStore) -> None:
    """A password file that cannot be read, or TLS files that cannot be loaded, are config
    errors naming the key."""
    cfg = _config(tmp_path, f'[sync]\nbroker_url = "mqtt://h"\npassword_file = '
                  f'"{tmp_path / "missing"}"\n')
    with pytest.raises(ConfigError, match=r"sync\.password_file"):
        SyncSettings.from_config(cfg)
    tls = SyncSettings(device_id=DEVICE, host="h", port=8883, tls=True,
                       ca_certs=str(tmp_path / "missing-ca.pem"))
    with pytest.raises(ConfigError, match=r"sync\.ca_certs"):
        Sync(tls, Outbox(store), online)


class SilentBroker:
    """Accepts TCP connections, reads each CONNECT's protocol level, never answers (what amqtt
    0.12 does with an MQTT 5 CONNECT)."""

    def __init__(self) -> None:
        import socket

        self.levels: list[int] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.port = self.server.getsockname()[1]
        self.conns: list[Any] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            self.conns.append(conn)
            conn.settimeout(5)
            data = conn.recv(64)
            # fixed header 0x10, remaining length (1-4 bytes, the last below 0x80), then
            # "\0\4MQTT" and the protocol level
            at = 1 + next(i for i in range(1, 5) if data[i] < 0x80)
            if data[:1] == b"\x10" and data[at:at + 6] == b"\x00\x04MQTT":
                self.levels.append(data[at + 6])

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for c in self.conns:
            c.close()
        self.server.close()


@pytest.mark.parametrize(("pinned", "expected"), [(None, [5, 4, 4]), (5, [5, 5, 5])])
def test_unanswered_mqtt5_connect_falls_back_to_311(store: AgentStore, pinned: int | None,
                                                    expected: list[int]) -> None:
    """A broker that leaves a version-5 CONNECT unanswered gets 3.1.1 from the next attempt
    on (unless the version is pinned); every unanswered CONNECT is a failed attempt."""
    broker = SilentBroker()
    sync = start_sync(store, settings(broker.port, connect_timeout_seconds=0.3,
                                      mqtt_version=pinned))
    try:
        wait_for(lambda: len(broker.levels) >= 3, what="three CONNECT attempts")
    finally:
        sync.stop()
        broker.close()
    assert broker.levels[:3] == expected
    assert sync.stats.connect_failures >= 2 and sync.stats.connects == 0


# --- delivery ---------------------------------------------------------------------------------


def test_offline_then_reconnect_every_window_once(mosquitto: Any, hub: FakeHub,
                                                  store: AgentStore) -> None:
    """Windows written while the broker is down stay unbatched; after it returns every one
    reaches the hub, each seq stored once, and the outbox empties on the receipts."""
    store.write(WriteBatch(windows=[window(i) for i in range(12)]))
    sync = start_sync(store, settings(mosquitto.port))
    try:
        wait_for(lambda: drained(store), what="the first windows to be receipted")
        mosquitto.stop()
        wait_for(lambda: not sync.connected, what="the sync to notice the broker is gone")
        for i in range(12, 40):
            store.write(WriteBatch(windows=[window(i)]))
        wait_for(lambda: sync.stats.connect_failures >= 3, what="failed reconnects")
        st = outbox_status(store)
        assert st.unbatched_rows == 28 and st.inflight == ()  # no batch formed offline
        mosquitto.start()
        wait_for(lambda: drained(store), what="the backlog to be receipted")
    finally:
        sync.stop()
    got = hub.windows()
    assert sorted(got) == sorted(("m", 60.0 * i) for i in range(40)) and len(got) == 40
    assert sorted(hub.stored[DEVICE]) == list(range(1, len(hub.stored[DEVICE]) + 1))
    assert hub.mismatched == []
    stats = sync.stats
    assert stats.connects >= 2 and stats.receipts >= 1
    assert all(d <= 0.4 for d in stats.delays) and len(set(stats.delays)) == len(stats.delays)


def test_broker_sigkill_mid_stream_loses_nothing(mosquitto: Any, hub: FakeHub,
                                                 store: AgentStore) -> None:
    """A broker SIGKILLed while windows stream (its PUBACKs lost with it) and restarted:
    every window reaches the hub once by seq; resends repeat seq, id and items."""
    sync = start_sync(store, settings(mosquitto.port, max_batch_items=3))
    written = 0
    try:
        sync.wait_connected(10)
        for i in range(150):
            store.write(WriteBatch(windows=[window(i)]))
            sync.notify()
            written += 1
            if i == 60:
                wait_for(lambda: hub.wire > 5, what="some messages in flight")
                mosquitto.kill()
            if i == 100:
                mosquitto.start()
            time.sleep(0.002)  # a paced producer, not synchronisation
        wait_for(lambda: drained(store), 60, what="everything to be receipted")
    finally:
        sync.stop()
    got = hub.windows()
    assert len(got) == written and len(set(got)) == written
    assert hub.mismatched == []
    assert sync.stats.connects >= 2


def test_online_state_retained_and_offline_on_clean_stop(mosquitto: Any,
                                                         store: AgentStore) -> None:
    """On connect the online state is published retained; it is published again when the
    phase changes (only then); a clean stop publishes the offline state retained."""
    phase = ["idle"]
    sync = start_sync(store, settings(mosquitto.port), lambda: online(phase=phase[0]))
    watch = StateWatch(mosquitto.port)
    try:
        wait_for(lambda: watch.last() is not None, what="the online state")
        first = retained_state(mosquitto.port)
        assert first.online and first.swap_phase == "idle"
        phase[0] = "staged"
        wait_for(lambda: (watch.last() or first).swap_phase == "staged", what="new phase")
        time.sleep(0.3)  # several publisher steps: nothing changed, nothing published
        assert [m.swap_phase for _, m in watch.seen] in (["idle", "staged"], ["staged"])
        stopped_at = time.time()
    finally:
        sync.stop()
    wait_for(lambda: (watch.last() or first).online is False, what="the offline state")
    watch.close()
    offline = retained_state(mosquitto.port)
    assert not offline.online and offline.ts >= stopped_at - 0.01  # ours, not the will


def test_bad_receipts_are_counted_and_ignored(mosquitto: Any, store: AgentStore) -> None:
    """Garbage, another device's receipt, a receipt for a seq never sent and one of another
    outbox stream (the database before a reset) are refused or ignored and counted; a hub
    command reaches the hook; the sync keeps working."""
    commands: list[Any] = []
    sync = start_sync(store, settings(mosquitto.port), on_command=commands.append)
    sender = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    sender.connect("127.0.0.1", mosquitto.port)
    sender.loop_start()
    try:
        sync.wait_connected(10)
        wait_for(lambda: sync.stats.subscribed == 2, what="receipt and cmd subscriptions")
        rt = topics.receipt(DEVICE)
        stream = sync.outbox.stream
        foreign = encode(Receipt(device_id="other", stream=stream, up_to_seq=1, ts=1.0))
        for payload in (b"not json", b"\x78\x9c garbage", foreign):
            sender.publish(rt, payload, qos=1)
        sender.publish(rt, encode(Receipt(device_id=DEVICE, stream=stream, up_to_seq=99,
                                          ts=1.0)), qos=1)
        sender.publish(rt, encode(Receipt(device_id=DEVICE, stream="f" * 16, up_to_seq=0,
                                          ts=1.0)), qos=1)
        cmd = UnsignedCommand(device_id=DEVICE, command_id="c-1", key_id="0" * 16, seq=1,
                              issued_at=1.0, expires_at=2.0, kind="promote").signed(b"\0" * 64)
        sender.publish(topics.cmd(DEVICE), encode(cmd), qos=1)
        wait_for(lambda: sync.stats.bad_messages == 3 and sync.stats.ignored_receipts == 2
                 and commands, what="the bad receipts to be counted")
        assert commands[0].command_id == "c-1"
        hub = FakeHub(mosquitto.port)
        try:
            store.write(WriteBatch(windows=[window(1)]))
            sync.notify()
            wait_for(lambda: drained(store), what="delivery after the bad receipts")
        finally:
            hub.close()
    finally:
        sender.disconnect()
        sender.loop_stop()
        sync.stop()


def test_wrong_password_retries_with_backoff_right_password_delivers(
        tmp_path: Path, store: AgentStore, caplog: pytest.LogCaptureFixture) -> None:
    """A broker with a password file refuses a wrong password: the sync logs why, once at
    error level, and keeps retrying with backoff; the right password connects and delivers."""
    from cloud_hub.mosquitto import MosquittoProcess

    pwfile = tmp_path / "passwd"
    for i, (user, pw) in enumerate((("pi-7", "right"), ("hub", "hubpw"))):
        subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if i == 0 else []), str(pwfile),
                        user, pw], check=True, capture_output=True)
    # run as root, Mosquitto drops to its own user, which cannot read pytest's 0700 folders
    stay = "user root" if os.geteuid() == 0 else ""
    broker = MosquittoProcess(tmp_path / "mq", allow_anonymous=False,
                              extra_conf=f"password_file {pwfile}\n{stay}")
    broker.start()
    try:
        caplog.set_level(logging.INFO, logger="edge_agent.sync")
        bad = start_sync(store, settings(broker.port, username="pi-7", password="wrong"))
        try:
            wait_for(lambda: bad.stats.connect_failures >= 4, what="repeated refusals")
            assert not bad.connected and bad.stats.connects == 0
        finally:
            bad.stop()
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        refusals = [r.getMessage() for r in caplog.records if "refused the conn" in r.getMessage()]
        assert len(refusals) >= 4 and len(errors) < len(refusals)  # repeats are not errors
        assert errors[0] == refusals[0] and "sync.password" in errors[0]

        hub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        hub.username_pw_set("hub", "hubpw")
        received: list[bytes | bytearray] = []
        hub.on_connect = lambda c, *_: c.subscribe("edgefleet/v1/+/telemetry", qos=1)
        hub.on_message = lambda c, u, m: received.append(m.payload)
        hub.connect("127.0.0.1", broker.port)
        hub.loop_start()
        good = start_sync(store, settings(broker.port, username="pi-7", password="right"))
        try:
            store.write(WriteBatch(windows=[window(0)]))
            good.notify()
            wait_for(lambda: received, what="a message through the authenticated broker")
            assert good.connected
        finally:
            good.stop()
            hub.disconnect()
            hub.loop_stop()
    finally:
        broker.kill()


def test_tls_with_client_certificate(tmp_path: Path, store: AgentStore) -> None:
    """mqtts:// with a CA and a client certificate connects to a TLS listener that requires
    one, and delivers."""
    from cloud_hub.mosquitto import MosquittoProcess, free_port

    files = make_certs(tmp_path, client_cn=DEVICE)
    port = free_port()
    stay = "user root" if os.geteuid() == 0 else ""  # see the password test
    broker = MosquittoProcess(tmp_path / "mq", extra_conf="\n".join([
        stay, f"listener {port} 127.0.0.1", f"cafile {files['ca']}",
        f"certfile {files['server']}", f"keyfile {files['server_key']}",
        "require_certificate true"]))
    broker.start()
    hub = FakeHub(broker.port)
    try:
        s = settings(port, tls=True, ca_certs=str(files["ca"]), certfile=str(files["client"]),
                     keyfile=str(files["client_key"]), host="localhost")
        sync = start_sync(store, s)
        try:
            store.write(WriteBatch(windows=[window(0)]))
            sync.notify()
            wait_for(lambda: drained(store), what="delivery over TLS")
        finally:
            sync.stop()
        assert hub.windows() == [("m", 0.0)]
    finally:
        hub.close()
        broker.kill()


# --- the agent --------------------------------------------------------------------------------


def test_agent_sends_closed_windows_and_its_state(tmp_path: Path, keypair: Any,
                                                  small_bundle: Any, mosquitto: Any,
                                                  hub: FakeHub) -> None:
    """An Agent configured with [sync] sends each closed window (with the rows it served) and
    its install event; its retained state names the serving slot and its tags."""
    from edge_agent.agent import Agent
    from edge_agent.config import TelemetryConfig

    now = [1_000_000.0]
    config = AgentConfig(
        device_id=DEVICE, data_dir=tmp_path / "data", trusted_keys=(keypair.public_path,),
        bundle=small_bundle.path, tags={"site": "a"},
        telemetry=TelemetryConfig(window_seconds=60, flush_interval_seconds=0.05),
        sync=SyncConfig(broker_url=mosquitto.url, poll_seconds=0.05, resend_after_seconds=1,
                        backoff_base_seconds=0.05, backoff_cap_seconds=0.5))
    X, _ = make_classification_data(n=600, d=6, seed=11)
    agent = Agent(config, clock=lambda: now[0])
    try:
        assert agent.sync is not None
        for minute in range(3):
            for x in X[minute * 10:(minute + 1) * 10]:
                agent.predict({f"f{i}": float(x[i]) for i in range(6)})
            now[0] += 60
        agent.flush()
        wait_for(lambda: len(hub.windows()) == 3, what="three closed windows at the hub")
        state = retained_state(mosquitto.port)
        assert state.online and state.tags == {"site": "a"} and state.swap_phase == "idle"
        assert state.slots.blue is not None and state.slots.blue.version == "1.2.0"
        wait_for(lambda: drained(agent.store), what="receipts for everything")
    finally:
        agent.close()
    windows = [i for i in hub.items() if i.kind == "window"]
    assert [w.rows for w in windows] == [10, 10, 10]
    assert "slot_installed" in [i.event for i in hub.items() if i.kind == "event"]
    assert not retained_state(mosquitto.port).online


def test_agent_run_standalone_will_and_clean_stop(tmp_path: Path, keypair: Any,
                                                  small_bundle: Any, mosquitto: Any,
                                                  hub: FakeHub) -> None:
    """`edgefleet agent run` with a [sync] section syncs on its own; killed with SIGKILL its
    last will marks it offline (retained); restarted it goes on with the next seq; SIGTERM
    publishes the offline state itself; `agent outbox` reports what it sent."""
    from cloud_hub.mosquitto import free_port

    http = free_port()
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'device_id = "{DEVICE}"\ndata_dir = "{tmp_path / "data"}"\n'
        f'trusted_keys = ["{keypair.public_path}"]\nbundle = "{small_bundle.path}"\n'
        'tags = {site = "b"}\n'
        f"[http]\nport = {http}\n[telemetry]\nwindow_seconds = 1\nflush_interval_seconds = 0.1\n"
        f'[sync]\nbroker_url = "{mosquitto.url}"\npoll_seconds = 0.1\n'
        "backoff_base_seconds = 0.1\nbackoff_cap_seconds = 1\nresend_after_seconds = 2\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run() -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "edgefleet", "agent", "run", "-c",
                                 str(cfg)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def predict(n: int) -> None:
        import urllib.request

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready",
                                            timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                return False

        wait_for(ready, 60, "the agent's HTTP API")
        X, _ = make_classification_data(n=600, d=6, seed=11)
        for x in X[:n]:
            body = json.dumps({"inputs": {f"f{i}": float(x[i]) for i in range(6)}}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{http}/v1/predict", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=10) as resp:
                assert resp.status == 200

    watch = StateWatch(mosquitto.port)
    proc = run()
    try:
        wait_for(lambda: (watch.last() or online()).slots.blue is not None, 120,
                 "the agent's online state")
        predict(20)
        wait_for(lambda: hub.windows(), 30, "a closed window from the agent")
        proc.kill()
        proc.communicate(timeout=30)
        wait_for(lambda: watch.last() is not None and not watch.last().online, 30,  # type: ignore[union-attr]
                 "the last will")
        will = retained_state(mosquitto.port)
        assert not will.online

        proc = run()
        wait_for(lambda: (watch.last() or will).online, 120, "the restarted agent online")
        predict(5)
        sent_before = hub.contiguous(DEVICE)
        wait_for(lambda: hub.contiguous(DEVICE) > sent_before, 30, "more telemetry")
        stopping = time.time()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert f"syncing to {mosquitto.url}" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        watch.close()
    final = retained_state(mosquitto.port)
    assert not final.online and final.ts >= stopping - 0.01
    seqs = sorted(hub.stored[DEVICE])
    assert seqs == list(range(1, len(seqs) + 1)) and hub.mismatched == []
    rows = sum(w.rows for w in hub.items() if w.kind == "window")
    assert 0 < rows <= 25
    out = subprocess.run([sys.executable, "-m", "edgefleet", "agent", "outbox", "-c", str(cfg)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"broker      {mosquitto.url}" in out.stdout
    assert "receipt     up to seq" in out.stdout and "dropped     none" in out.stdout


def test_unanswered_resends_back_off_to_a_cap() -> None:
    from edge_agent.sync import RESEND_BACKOFF_CAP, resend_wait

    waits = [resend_wait(30.0, k) for k in range(8)]
    assert waits[:5] == [30.0, 60.0, 120.0, 240.0, 480.0]
    assert max(waits) == 30.0 * RESEND_BACKOFF_CAP and waits == sorted(waits)
