"""The hub worker against a real Mosquitto (and the embedded amqtt broker) and real stores.

A test client plays the devices (:class:`FleetSim`): it publishes envelopes, reads receipts and,
where the scenario needs it, resends whatever no receipt names yet, as the agent's outbox does.
Nothing waits on a fixed sleep: every wait is a condition with a deadline.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, cast

import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from cloud_hub.errors import HubStoreError, MqttConnectionError
from cloud_hub.mosquitto import MosquittoProcess, free_port
from cloud_hub.store import HubStore
from cloud_hub.tables import events
from cloud_hub.worker import (
    GC_YOUNG_THRESHOLD,
    MAX_PACKET_SIZE,
    BrokerAddress,
    HubWorker,
    _RateLimit,
    _Received,
    parse_broker_url,
    settle_heap,
)
from fleet_protocol import messages, topics, wire

ROOT = Path(__file__).resolve().parents[2]
_ID_NAMESPACE = uuid.UUID("5f1c8a9e-0000-4000-8000-00000000ed9e")


# --- the simulated fleet -------------------------------------------------------------------


def message_id(device: str, seq: int) -> str:
    """The same id for every resend of (device, seq), as the outbox keeps it."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"{device}/{seq}"))


def envelope(device: str, seq: int, **overrides: Any) -> bytes:
    """Wire bytes of a valid telemetry envelope: one event naming its seq."""
    fields: dict[str, Any] = {
        "device_id": device, "stream": "5eed5eed5eed5eed", "message_id": message_id(device, seq),
        "seq": seq,
        "sent_at": 1_700_000_000.0 + seq, "agent_version": "0.1.0",
        "items": (messages.EventItem(ts=1_700_000_000.0 + seq, event="test",
                                     detail={"seq": seq}),),
    }
    fields.update(overrides)
    return wire.encode(messages.TelemetryEnvelope(**fields))


def wait_for(cond: Callable[[], bool], timeout: float, what: str,
             tick: Callable[[], object] | None = None) -> None:
    """Return once ``cond()`` holds; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not cond():
        if tick is not None:
            tick()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class FleetSim:
    """Devices behind one paho client: publish envelopes, record receipts, resend the rest."""

    def __init__(self, url: str, devices: Iterable[str], *,
                 protocol: MQTTProtocolVersion = mqtt.MQTTv5,
                 client_id: str = "fleet-sim", username: str | None = None,
                 password: str | None = None) -> None:
        self.devices = list(devices)
        self.receipts = dict.fromkeys(self.devices, 0)
        self.sent = dict.fromkeys(self.devices, 0)
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.last_resend = 0.0
        self.resends = 0
        address = parse_broker_url(url)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=protocol)
        if username is not None:
            self.client.username_pw_set(username, password)
        # paho annotates whole seconds but waits any float: sub-second retries keep tests fast
        self.client.reconnect_delay_set(cast(int, 0.05), cast(int, 0.5))
        self.client.max_inflight_messages_set(1000)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(address.host, address.port, keepalive=30)
        self.client.loop_start()
        wait_for(self.subscribed.is_set, 10, "the simulated fleet to subscribe to receipts")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if not rc.is_failure:
            client.subscribe(f"{topics.PROTOCOL}/+/receipt", qos=1)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        receipt = wire.decode(msg.payload, messages.Receipt)
        assert msg.topic == topics.receipt(receipt.device_id)
        with self.lock:
            self.receipts[receipt.device_id] = max(self.receipts.get(receipt.device_id, 0),
                                                   receipt.up_to_seq)

    def publish(self, device: str, seq: int) -> None:
        self.client.publish(topics.telemetry(device), envelope(device, seq), qos=1)
        with self.lock:
            self.sent[device] = max(self.sent[device], seq)

    def publish_range(self, seqs: Iterable[int], pause: float = 0.0) -> None:
        for seq in seqs:
            for device in self.devices:
                self.publish(device, seq)
            if pause:
                time.sleep(pause)  # load shaping: spread the stream over time, not a wait

    def resend_unreceipted(self, every: float = 1.0) -> None:
        """Resend every seq above the device's receipt, at most once per ``every`` seconds."""
        if time.monotonic() - self.last_resend < every:
            return
        self.last_resend = time.monotonic()
        with self.lock:
            todo = [(d, s) for d in self.devices
                    for s in range(self.receipts[d] + 1, self.sent[d] + 1)]
        self.resends += len(todo)
        for device, seq in todo:
            self.client.publish(topics.telemetry(device), envelope(device, seq), qos=1)

    def all_receipted(self, n: int) -> bool:
        with self.lock:
            return all(self.receipts[d] >= n for d in self.devices)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def fleet_factory() -> Iterator[Callable[..., FleetSim]]:
    made: list[FleetSim] = []

    def make(url: str, devices: Iterable[str], **kw: Any) -> FleetSim:
        sim = FleetSim(url, devices, **kw)
        made.append(sim)
        return sim

    yield make
    for sim in made:
        sim.close()


@pytest.fixture
def workers() -> Iterator[list[HubWorker]]:
    """Workers appended here are stopped after the test, whatever happens."""
    started: list[HubWorker] = []
    yield started
    for w in started:
        w.stop()


def start_worker(started: list[HubWorker], store: Any, url: str, **kw: Any) -> HubWorker:
    kw.setdefault("client_id", f"hub-test-{len(started)}")
    kw.setdefault("reconnect_min", 0.05)
    kw.setdefault("reconnect_max", 0.5)
    worker = HubWorker(store, broker_url=url, **kw)
    started.append(worker)
    worker.start()
    assert worker.wait_subscribed(15), f"worker {worker.client_id} never subscribed"
    return worker


def stored_counts(store: HubStore) -> dict[tuple[str, int], int]:
    """(device, seq) -> how many event rows the hub holds for it (one per envelope here)."""
    rows = store.run_read(lambda c: c.execute(
        sa.select(events.c.device_id, events.c.seq, sa.func.count())
        .group_by(events.c.device_id, events.c.seq)).all(), what="counting events")
    return {(str(d), int(s)): int(n) for d, s, n in rows}


def assert_exactly_once(store: HubStore, devices: Iterable[str], n: int) -> None:
    devices = list(devices)
    counts = stored_counts(store)
    expected = {(d, s): 1 for d in devices for s in range(1, n + 1)}
    missing = sorted(set(expected) - set(counts))
    doubled = sorted(k for k, v in counts.items() if v > 1)
    assert not missing, f"lost {len(missing)} envelopes, e.g. {missing[:5]}"
    assert not doubled, f"stored twice: {doubled[:5]}"
    assert counts == expected
    assert store.counters().messages == len(devices) * n
    for d in devices:
        assert store.device(d).up_to_seq == n


# --- pure pieces -----------------------------------------------------------------------------


def test_broker_urls_parse_with_defaults_and_refuse_nonsense() -> None:
    """mqtt:// and mqtts:// with their default ports; credentials in a URL (which ends up in
    logs) and anything else are refused, without echoing the password."""
    assert parse_broker_url("mqtt://10.0.0.5") == parse_broker_url("mqtt://10.0.0.5:1883")
    assert parse_broker_url("mqtts://broker.example") == BrokerAddress("broker.example", 8883,
                                                                        True)
    for bad in ("http://x:1883", "mqtt://", "mqtt://h:99999", "mqtt://h/path", "broker:1883",
                "mqtt://hub:s3cret@h"):
        with pytest.raises(ValueError, match="broker URL") as err:
            parse_broker_url(bad)
        assert "s3cret" not in str(err.value)


def test_rejection_log_is_rate_limited() -> None:
    """A burst passes, then one line per period; what was held back is counted."""
    now = [0.0]
    limit = _RateLimit(burst=3, every=1.0, clock=lambda: now[0])
    assert [limit.allow() for _ in range(10)] == [True] * 3 + [False] * 7
    assert limit.take_suppressed() == 7 and limit.take_suppressed() == 0
    now[0] += 1.0
    assert limit.allow() and not limit.allow()


def test_reconnect_backoff_is_jittered_and_capped() -> None:
    """Each wait is uniform in [d/2, d] with d doubling from reconnect_min up to reconnect_max,
    so workers that lost the broker together do not come back in step."""
    w = HubWorker(HubStoreStub(), broker_url="mqtt://127.0.0.1:1", reconnect_min=0.5,
                  reconnect_max=8.0, seed=1)
    for attempt, d in [(0, 0.5), (1, 1.0), (3, 4.0), (4, 8.0), (30, 8.0)]:
        waits = [w._backoff(attempt) for _ in range(200)]
        assert all(d / 2 <= x <= d for x in waits)
        assert max(waits) - min(waits) > d / 4  # spread, not one value
    with pytest.raises(ValueError, match="mqtt_version"):
        HubWorker(HubStoreStub(), broker_url="mqtt://h", mqtt_version=4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not mqtts"):
        HubWorker(HubStoreStub(), broker_url="mqtt://h", ca_certs="/etc/ssl/ca.pem")


class HubStoreStub:
    def ingest(self, messages: Any, *, now: float, worker: str = "") -> Any:
        raise AssertionError("not used")


def test_a_suback_without_qos1_on_every_filter_fails_the_subscription() -> None:
    """Each filter must be granted QoS 1 exactly, one code per filter: QoS 0 (ack after commit
    would silently stop applying), a refusal, or a missing or extra code is a failed
    subscription, naming the filter; only a full grant counts as subscribed."""
    w = HubWorker(HubStoreStub(), broker_url="mqtt://127.0.0.1:1", mqtt_version=5)
    w._subscribe_mid = 7
    state = "$share/hub/edgefleet/v1/+/state"
    for codes, says in (([1, 0, 1], f"{state} (reason code 0x00: granted QoS 0)"),
                        ([1, 0x87, 1], f"{state} (reason code 0x87: refused)"),
                        ([1, 2, 1], f"{state} (reason code 0x02: granted QoS 2)"),
                        ([1, 1], "3 filters"), ([1, 1, 1, 1], "with 4 reason codes")):
        with pytest.raises(MqttConnectionError) as err:
            w._event(("suback", 7, codes))
        assert says in str(err.value)
        assert not w._subscribed.is_set()
    w._event(("suback", 8, [0, 0, 0]))  # not the answer to our SUBSCRIBE
    w._event(("suback", 7, [1, 1, 1]))
    assert w._subscribed.is_set()


def test_a_broker_that_grants_qos0_is_not_taken_as_a_subscription(
        tmp_path: Path, workers: list[HubWorker], caplog: pytest.LogCaptureFixture) -> None:
    """Mosquitto with max_qos 0 grants QoS 0 for the hub's QoS 1 SUBSCRIBE: the worker never
    counts itself subscribed, logs an error naming the filter, and reconnects with a backoff
    that grows (a CONNACK alone does not reset it)."""
    caplog.set_level(logging.ERROR, logger="cloud_hub.worker")
    broker = MosquittoProcess(tmp_path / "broker", extra_conf="max_qos 0")
    broker.start()
    try:
        with HubStore(path=tmp_path / "hub.db") as store:
            worker = HubWorker(store, broker_url=broker.url, client_id="hub-qos0",
                               reconnect_min=0.05, reconnect_max=0.4)
            workers.append(worker.start())
            started = time.monotonic()
            wait_for(lambda: worker.stats()["connects"] >= 3, 30, "three connections")
            assert not worker.wait_subscribed(1.0)
            elapsed = time.monotonic() - started
            # a reset per CONNACK would reconnect every 25-50 ms; growing, it waits up to 0.4 s
            assert worker.stats()["connects"] <= 3 + elapsed / 0.1
    finally:
        for w in workers:
            w.stop()
        broker.kill()
    lines = [r.getMessage() for r in caplog.records if r.name == "cloud_hub.worker"]
    assert any("did not grant QoS 1 for $share/hub/edgefleet/v1/+/telemetry (reason code "
               "0x00: granted QoS 0)" in line for line in lines), lines


def test_a_receipt_that_cannot_be_encoded_holds_back_neither_acks_nor_receipts() -> None:
    """After a commit the batch's acks are queued whatever happens to its receipts; a receipt
    that fails to encode is counted (receipt_errors) and the others still go out."""
    w = HubWorker(HubStoreStub(), broker_url="mqtt://127.0.0.1:1")
    topic = topics.telemetry("pi-1")
    batch = [_Received(3, 11, 1, topic, b""), _Received(3, 12, 1, topic, b""),
             _Received(3, 0, 0, topic, b"")]
    w._after_commit(batch, {("pi-1", "5eed5eed5eed5eed"): 2, ("not/a device", "x"): 1,
                            ("pi-2", "5eed5eed5eed5eed"): 4})
    acks = [mid for by_generation, _ in w._outbox for mid in by_generation.get(3, [])]
    sent = [t for _, receipts in w._outbox for t, _ in receipts]
    assert acks == [11, 12]
    assert sent == [topics.receipt("pi-1"), topics.receipt("pi-2")]
    assert w.stats()["receipt_errors"] == 1 and w.stats()["receipts_sent"] == 2


class BlockingStore:
    """A store whose ingest blocks until released (a database that hangs), then fails."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def ingest(self, messages: Any, *, now: float, worker: str = "") -> Any:
        self.entered.set()
        self.release.wait(60)
        raise HubStoreError("released (test)")


def test_start_refuses_while_the_threads_of_a_timed_out_stop_still_run() -> None:
    """A stop() whose ingest thread does not end in time keeps its threads and stop flags:
    start() refuses with an error saying so (it would run a second pipeline beside it), a
    second stop() waits for them, and then start() runs exactly one set of threads."""
    store = BlockingStore()
    w = HubWorker(store, broker_url=f"mqtt://127.0.0.1:{free_port()}", mqtt_version=5,
                  client_id="hub-stuck", reconnect_min=0.05, reconnect_max=0.1)

    def threads(kind: str) -> int:
        return sum(t.name == f"hub-{kind}-hub-stuck" and t.is_alive()
                   for t in threading.enumerate())

    w.start()
    try:
        assert w._inbox.put_many([_Received(0, 0, 0, topics.telemetry("pi-1"), b"x")], 1.0)
        wait_for(store.entered.is_set, 10, "the ingest thread to block in the store")
        w.stop(timeout=0.3)
        assert threads("ingest") == 1
        with pytest.raises(RuntimeError, match=r"still running.*call stop\(\) again"):
            w.start()
        assert threads("ingest") == 1
        store.release.set()
        w.stop(timeout=10)
        assert threads("ingest") == 0 and threads("mqtt") == 0
        w.start()
        assert threads("ingest") == 1 and threads("mqtt") == 1
    finally:
        store.release.set()
        w.stop()
    assert threads("ingest") == 0 and threads("mqtt") == 0


# --- Mosquitto + the real store ----------------------------------------------------------


def test_envelopes_are_stored_once_and_receipted(mosquitto: MosquittoProcess, tmp_path: Path,
                                                 workers: list[HubWorker],
                                                 fleet_factory: Callable[..., FleetSim]) -> None:
    """Envelopes from three devices are stored once each and every device gets a receipt for
    its last seq; resent envelopes are counted as duplicates and receipted again."""
    with HubStore(path=tmp_path / "hub.db") as store:
        worker = start_worker(workers, store, mosquitto.url)
        assert worker.filters == topics.hub_subscriptions("hub")  # MQTT 5: shared
        devices = ["pi-1", "pi-2", "pi-3"]
        fleet = fleet_factory(mosquitto.url, devices)
        fleet.publish_range(range(1, 21))
        wait_for(lambda: fleet.all_receipted(20), 30, "receipts up to seq 20")
        for seq in (3, 7, 20):
            fleet.publish("pi-2", seq)
        wait_for(lambda: worker.stats()["duplicates"] == 3, 30, "three duplicates counted")
        assert_exactly_once(store, devices, 20)
        stats = worker.stats()
        assert stats["received"] == 63 and stats["stored"] == 60 and stats["rejected"] == 0
        assert stats["receipts_sent"] >= 3 and stats["connected"] == 1
        assert store.counters().duplicates == 3


def test_on_batch_sees_each_stored_batch_after_its_counts_and_cannot_stop_ingestion(
        mosquitto: MosquittoProcess, tmp_path: Path, workers: list[HubWorker],
        fleet_factory: Callable[..., FleetSim], caplog: pytest.LogCaptureFixture) -> None:
    """The on_batch observer gets every stored batch's result once its counts are in stats();
    an observer that raises is logged, and the worker goes on storing and receipting."""
    seen: list[tuple[int, int]] = []  # (result.stored, stats()["stored"] at the call)
    lock = threading.Lock()

    def observe(result: Any) -> None:
        with lock:
            seen.append((result.stored, worker.stats()["stored"]))
            if len(seen) == 1:
                raise RuntimeError("observer bug (test)")

    caplog.set_level(logging.ERROR, logger="cloud_hub.worker")
    with HubStore(path=tmp_path / "hub.db") as store:
        worker = start_worker(workers, store, mosquitto.url, on_batch=observe)
        fleet = fleet_factory(mosquitto.url, ["pi-1", "pi-2"])
        fleet.publish_range(range(1, 11))
        wait_for(lambda: fleet.all_receipted(10), 30, "receipts up to seq 10")
        wait_for(lambda: sum(n for n, _ in seen) == 20, 30, "every batch observed")
        assert_exactly_once(store, ["pi-1", "pi-2"], 10)
    running = 0
    for stored, counted in seen:
        running += stored
        assert counted >= running  # the counts were in stats() before the observer ran
    assert any("on_batch observer failed" in r.getMessage() for r in caplog.records)


def test_settle_heap_raises_the_young_collection_threshold() -> None:
    """settle_heap() leaves the collector's first threshold at GC_YOUNG_THRESHOLD (a young
    collection every ~26 messages walked the batch being decoded again and again) and the
    other two as they were."""
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, before[1], before[2])
        settle_heap()
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, before[1], before[2])
        assert GC_YOUNG_THRESHOLD >= 50_000
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


class FailingStore:
    """The real store, except that ingest raises HubStoreError while ``failing`` is set."""

    def __init__(self, store: HubStore) -> None:
        self.store = store
        self.failing = True
        self.calls = 0

    def ingest(self, batch: Any, *, now: float, worker: str = "") -> Any:
        self.calls += 1
        if self.failing:
            raise HubStoreError("database is down (test)")
        return self.store.ingest(batch, now=now, worker=worker)


def test_nothing_is_acked_before_it_is_stored(mosquitto: MosquittoProcess, tmp_path: Path,
                                              workers: list[HubWorker],
                                              fleet_factory: Callable[..., FleetSim]) -> None:
    """While the store fails, the worker retries and acknowledges nothing; stopped in that
    state, its messages stay in the broker's session and reach the next worker under the same
    client id — with no resend by the devices."""
    with HubStore(path=tmp_path / "hub.db") as store:
        failing = FailingStore(store)
        first = start_worker(workers, failing, mosquitto.url, client_id="hub-acks")
        fleet = fleet_factory(mosquitto.url, ["pi-1", "pi-2"])
        fleet.publish_range(range(1, 11))
        wait_for(lambda: first.stats()["received"] == 20 and failing.calls >= 2, 30,
                 "the worker to receive everything and fail to store it twice")
        assert first.stats()["store_errors"] >= 2 and first.stats()["stored"] == 0
        assert fleet.receipts == {"pi-1": 0, "pi-2": 0}  # no receipt without a commit
        first.stop(keep_session=True)  # as a crash leaves it: the session stays
        assert store.counters().messages == 0

        second = start_worker(workers, store, mosquitto.url, client_id="hub-acks")
        wait_for(lambda: fleet.all_receipted(10), 30,
                 "the broker to deliver the unacknowledged messages again")
        assert fleet.resends == 0
        assert_exactly_once(store, ["pi-1", "pi-2"], 10)
        assert second.stats()["stored"] == 20


class PoisonStore:
    """The real store, except that any batch holding ``poison`` fails, as a message the
    database refuses (not an outage: every other write goes through)."""

    def __init__(self, store: HubStore, poison: bytes) -> None:
        self.store = store
        self.poison = poison
        self.failures = 0

    def ingest(self, batch: Any, *, now: float, worker: str = "") -> Any:
        if any(payload == self.poison for _, payload in batch):
            self.failures += 1
            raise HubStoreError("value violates a constraint (test)")
        return self.store.ingest(batch, now=now, worker=worker)

    def record_unstorable(self, *args: Any, **kwargs: Any) -> Any:
        return self.store.record_unstorable(*args, **kwargs)


def test_a_message_the_database_refuses_is_isolated_recorded_and_passed(
        mosquitto: MosquittoProcess, tmp_path: Path, workers: list[HubWorker],
        fleet_factory: Callable[..., FleetSim]) -> None:
    """One message that makes every batch holding it fail does not wedge the worker: batches
    split until it is alone, it is recorded as "unstorable" (a marker, so its device's receipts
    pass its seq) and acknowledged; everything else is stored once."""
    with HubStore(path=tmp_path / "hub.db") as store:
        poisoned = PoisonStore(store, envelope("pi-2", 5))
        worker = start_worker(workers, poisoned, mosquitto.url, client_id="hub-poison",
                              batch_max=50, batch_wait=0.2)
        fleet = fleet_factory(mosquitto.url, ["pi-1", "pi-2"])
        fleet.publish_range(range(1, 11))
        wait_for(lambda: fleet.all_receipted(10), 60, "every seq receipted, seq 5 of pi-2 too")
        assert poisoned.failures >= 2
        counters = store.counters()
        assert counters.rejections.get("unstorable") == 1
        assert counters.messages == 19
        counts = stored_counts(store)
        assert ("pi-2", 5) not in counts and all(n == 1 for n in counts.values())
        assert len(counts) == 19
        assert worker.stats()["rejected"] == 1


def test_store_recovering_mid_stream_loses_nothing(mosquitto: MosquittoProcess, tmp_path: Path,
                                                   workers: list[HubWorker],
                                                   fleet_factory: Callable[..., FleetSim]
                                                   ) -> None:
    """A store that fails for a while and comes back: the held batch is retried and stored."""
    with HubStore(path=tmp_path / "hub.db") as store:
        failing = FailingStore(store)
        worker = start_worker(workers, failing, mosquitto.url)
        fleet = fleet_factory(mosquitto.url, ["pi-1"])
        fleet.publish_range(range(1, 6))
        wait_for(lambda: failing.calls >= 2, 30, "two failed ingest attempts")
        failing.failing = False
        fleet.publish_range(range(6, 11))
        wait_for(lambda: fleet.all_receipted(10), 30, "receipts up to 10 after the recovery")
        assert_exactly_once(store, ["pi-1"], 10)
        assert worker.stats()["store_errors"] >= 2


class FlakyCommitStore:
    """The real store, except that the first ``failures`` commits of batches written ahead
    fail (and roll back), as a commit the database refuses (disk full, I/O error) does."""

    def __init__(self, store: HubStore, failures: int) -> None:
        self.store = store
        self.failures = failures
        self.ingests = 0

    def decode(self, messages: Any) -> Any:
        return self.store.decode(messages)

    def begin_ingest(self, messages: Any, **kw: Any) -> Any:
        pending = self.store.begin_ingest(messages, **kw)
        if self.failures <= 0:
            return pending
        self.failures -= 1

        class Refused:
            def commit(self) -> Any:
                pending.rollback()
                raise sa.exc.OperationalError("COMMIT", {}, Exception("disk I/O error (test)"))

        return Refused()

    def ingest(self, messages: Any, **kw: Any) -> Any:
        self.ingests += 1
        return self.store.ingest(messages, **kw)


def test_a_failed_commit_acks_nothing_and_the_batch_is_stored_on_the_plain_path(
        mosquitto: MosquittoProcess, tmp_path: Path, workers: list[HubWorker],
        fleet_factory: Callable[..., FleetSim]) -> None:
    """A batch whose commit fails (written ahead, committed on the commit thread) is neither
    receipted nor acked then; it is stored again through the plain path (with its retries),
    exactly once, and its receipts follow."""
    with HubStore(path=tmp_path / "hub.db") as store:
        flaky = FlakyCommitStore(store, failures=1)
        start_worker(workers, flaky, mosquitto.url, batch_wait=0.2)
        fleet = fleet_factory(mosquitto.url, ["pi-1", "pi-2"])
        fleet.publish_range(range(1, 11))
        wait_for(lambda: fleet.all_receipted(10), 30, "receipts up to 10")
        assert flaky.failures == 0 and flaky.ingests == 1  # the failed batch, stored again
        fleet.publish_range(range(11, 21))  # written ahead again
        wait_for(lambda: fleet.all_receipted(20), 30, "receipts up to 20")
        assert flaky.ingests == 1 and fleet.resends == 0
        assert_exactly_once(store, ["pi-1", "pi-2"], 20)


def test_broker_killed_and_restarted_worker_reconnects(mosquitto: MosquittoProcess,
                                                       tmp_path: Path, workers: list[HubWorker],
                                                       fleet_factory: Callable[..., FleetSim]
                                                       ) -> None:
    """Mosquitto killed with SIGKILL mid-stream (its queues lost) and started again: the worker
    reconnects by itself and goes on; the devices resend what was never receipted, and every
    envelope is stored exactly once."""
    devices = [f"pi-{i}" for i in range(4)]
    with HubStore(path=tmp_path / "hub.db") as store:
        worker = start_worker(workers, store, mosquitto.url)
        fleet = fleet_factory(mosquitto.url, devices)
        publisher = threading.Thread(target=fleet.publish_range,
                                     args=(range(1, 101),), kwargs={"pause": 0.005})
        publisher.start()
        wait_for(lambda: store.counters().messages >= 40, 30, "the first envelopes stored")
        mosquitto.kill()
        publisher.join(30)  # paho keeps what it could not send, and sends it on reconnect
        mosquitto.start()
        wait_for(lambda: worker.stats()["connects"] >= 2 and worker.wait_subscribed(0), 30,
                 "the worker to reconnect and subscribe again")
        fleet.publish_range(range(101, 121))
        wait_for(lambda: fleet.all_receipted(120), 60, "receipts up to 120 after the restart",
                 tick=fleet.resend_unreceipted)
        assert_exactly_once(store, devices, 120)
        assert worker.connected


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_two_workers_split_a_shared_subscription(db: str, mosquitto: MosquittoProcess,
                                                 tmp_path: Path, workers: list[HubWorker],
                                                 fleet_factory: Callable[..., FleetSim],
                                                 request: pytest.FixtureRequest) -> None:
    """Two workers of one group on one broker and one database: each gets 40-60% of the
    messages of one publisher, and the totals are exact."""
    url = (str(tmp_path / "hub.db") if db == "sqlite"
           else request.getfixturevalue("pg_database"))
    stores = [HubStore(url) if db == "postgresql" else HubStore(path=url) for _ in range(2)]
    try:
        pair = [start_worker(workers, s, mosquitto.url, client_id=f"hub-split-{i}")
                for i, s in enumerate(stores)]
        devices = [f"dev-{i:02d}" for i in range(20)]
        fleet = fleet_factory(mosquitto.url, devices)
        n = 50
        fleet.publish_range(range(1, n + 1))
        wait_for(lambda: fleet.all_receipted(n), 90, f"receipts up to {n} from 20 devices")
        assert_exactly_once(stores[0], devices, n)
        total = len(devices) * n
        received = [w.stats()["received"] for w in pair]
        stored = [w.stats()["stored"] for w in pair]
        assert sum(stored) == total and sum(received) == total, (received, stored)
        for r in received:
            assert 0.4 * total <= r <= 0.6 * total, f"split {received} is not 40-60%"
    finally:
        for w in workers:
            w.stop()
        for s in stores:
            s.close()


def test_a_worker_that_stops_hands_its_share_to_the_others(mosquitto: MosquittoProcess,
                                                           tmp_path: Path,
                                                           workers: list[HubWorker],
                                                           fleet_factory: Callable[..., FleetSim]
                                                           ) -> None:
    """A shared worker's clean stop unsubscribes and ends its session, so Mosquitto routes the
    whole fleet to the remaining worker instead of queueing half of it for the one that left
    (which it does for a crashed worker's session: no receipt gap waits on its return)."""
    with HubStore(path=tmp_path / "hub.db") as s1, HubStore(path=tmp_path / "hub.db") as s2:
        stay = start_worker(workers, s1, mosquitto.url, client_id="hub-stay")
        leave = start_worker(workers, s2, mosquitto.url, client_id="hub-leave")
        fleet = fleet_factory(mosquitto.url, ["pi-1", "pi-2"])
        fleet.publish_range(range(1, 11))
        wait_for(lambda: fleet.all_receipted(10), 30, "receipts from both workers")
        assert leave.stats()["received"] > 0
        leave.stop()
        fleet.publish_range(range(11, 31))
        wait_for(lambda: fleet.all_receipted(30), 30, "the remaining worker to take it all")
        assert fleet.resends == 0
        assert_exactly_once(s1, ["pi-1", "pi-2"], 30)
        assert stay.stats()["received"] + leave.stats()["received"] == 60


def test_bad_payloads_are_rejected_and_the_worker_goes_on(mosquitto: MosquittoProcess,
                                                          tmp_path: Path,
                                                          workers: list[HubWorker],
                                                          fleet_factory: Callable[..., FleetSim],
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    """Malformed, oversized, zip-bomb, wrong-version, wrong-device and wrong-kind payloads are
    rejected and counted (in the worker and the store), logged at a bounded rate with their
    device id, and the worker keeps storing good envelopes afterwards."""
    bad: list[tuple[str, bytes]] = [
        (topics.telemetry("pi-1"), b"{not json"),
        (topics.telemetry("pi-1"), b"\x00binary"),
        (topics.telemetry("pi-1"), b"{" + b" " * messages.TelemetryEnvelope.MAX_WIRE_BYTES),
        (topics.telemetry("pi-1"), zlib.compress(b"{" + b" " * 50_000_000)),
        (topics.telemetry("pi-1"), envelope("pi-1", 1).replace(b'"protocol":1', b'"protocol":2')),
        (topics.telemetry("pi-1"), envelope("pi-2", 1)),  # speaks for another device
        (topics.state("pi-1"), envelope("pi-1", 1)),  # an envelope on the state topic
        (topics.telemetry("pi-1"), envelope("pi-1", 1)[:-1] + b',"extra":1}'),
    ]
    assert bad[4][1] != envelope("pi-1", 1)
    caplog.set_level(logging.WARNING, logger="cloud_hub.worker")
    with HubStore(path=tmp_path / "hub.db") as store:
        worker = start_worker(workers, store, mosquitto.url, log_burst=3, log_every=3600)
        fleet = fleet_factory(mosquitto.url, ["pi-1"])
        fleet.publish("pi-1", 1)
        wait_for(lambda: fleet.all_receipted(1), 30, "the first good envelope receipted")
        for topic, payload in bad:
            fleet.client.publish(topic, payload, qos=1)
        fleet.publish_range(range(2, 6))
        wait_for(lambda: fleet.all_receipted(5) and worker.stats()["rejected"] == len(bad), 30,
                 "good envelopes receipted after the bad ones")
        assert_exactly_once(store, ["pi-1"], 5)
        counters = store.counters()
        assert counters.rejected == len(bad)
        assert {"malformed", "oversized", "protocol", "device_id"} <= set(counters.rejections)
        assert worker.connected and worker.stats()["store_errors"] == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "cloud_hub.worker"
             and "rejected" in r.getMessage()]
    assert len(lines) == 3, lines  # the burst, then silence (a flood cannot fill the disk)
    assert all("device pi-1" in line for line in lines)


def test_an_oversized_message_is_skipped_counted_and_logged(
        tmp_path: Path, workers: list[HubWorker], fleet_factory: Callable[..., FleetSim],
        caplog: pytest.LogCaptureFixture) -> None:
    """Over MQTT 3.1.1 (no way to tell the broker the limit), a message over MAX_PACKET_SIZE
    is skipped as it arrives, never reaching the store: counted as received and rejected,
    logged as "oversized" with its device, acknowledged; the envelopes after it are stored."""
    caplog.set_level(logging.WARNING, logger="cloud_hub.worker")
    broker = MosquittoProcess(tmp_path / "broker", max_packet_size=None)  # lets it through
    broker.start()
    try:
        with HubStore(path=tmp_path / "hub.db") as store:
            worker = start_worker(workers, store, broker.url, mqtt_version=311)
            fleet = fleet_factory(broker.url, ["pi-1"], protocol=mqtt.MQTTv311)
            fleet.publish("pi-1", 1)
            fleet.client.publish(topics.telemetry("pi-1"), b"{" + b" " * MAX_PACKET_SIZE,
                                 qos=1)
            fleet.publish_range(range(2, 4))
            wait_for(lambda: fleet.all_receipted(3) and worker.stats()["rejected"] == 1, 30,
                     "the envelopes around the oversized message receipted")
            assert_exactly_once(store, ["pi-1"], 3)
            stats = worker.stats()
            assert stats["received"] == 4 and stats["stored"] == 3
            assert store.counters().rejected == 0  # it never reached the store
    finally:
        for w in workers:
            w.stop()
        broker.kill()
    lines = [r.getMessage() for r in caplog.records if "(oversized)" in r.getMessage()]
    assert len(lines) == 1
    assert "from device pi-1 on 'edgefleet/v1/pi-1/telemetry'" in lines[0]
    assert f"maximum packet size of {MAX_PACKET_SIZE} bytes: skipped unread and " \
        "acknowledged" in lines[0]


def test_back_pressure_keeps_the_connection(mosquitto: MosquittoProcess, tmp_path: Path,
                                            workers: list[HubWorker],
                                            fleet_factory: Callable[..., FleetSim]) -> None:
    """With the database down and the inbox full (MQTT 3.1.1: the broker sends up to its own
    in-flight limit), the network thread stops reading; its pings' answers wait unread, and
    that is not taken for a dead broker: one connection through four keepalives, and when the
    database is back everything is stored and receipted on it."""
    with HubStore(path=tmp_path / "hub.db") as store:
        failing = FailingStore(store)
        worker = start_worker(workers, failing, mosquitto.url, client_id="hub-pressure",
                              mqtt_version=311, keepalive=1, inflight=1, batch_max=1)
        fleet = fleet_factory(mosquitto.url, ["pi-1"], protocol=mqtt.MQTTv311)
        fleet.publish_range(range(1, 11), pause=0.05)  # one read each: the inbox fills
        wait_for(lambda: failing.calls >= 1 and len(worker._inbox) >= worker._inbox.maxsize,
                 10, "the inbox to fill while the store fails")
        deadline = time.monotonic() + 4.0  # four keepalives
        while time.monotonic() < deadline:
            stats = worker.stats()
            assert stats["connects"] == 1 and stats["connected"] == 1
            assert stats["received"] < 10  # still back-pressured
            time.sleep(0.05)
        failing.failing = False
        wait_for(lambda: fleet.all_receipted(10), 30, "receipts once the store is back")
        assert_exactly_once(store, ["pi-1"], 10)
        assert worker.stats()["connects"] == 1


def test_a_receipt_the_broker_refuses_is_counted_and_logged(
        tmp_path: Path, workers: list[HubWorker], fleet_factory: Callable[..., FleetSim],
        caplog: pytest.LogCaptureFixture) -> None:
    """An ACL that does not let the hub publish receipts: each refused receipt (MQTT 5 PUBACK
    "not authorized") is counted in receipts_refused and logged with its topic and reason, at
    a bounded rate; the envelopes are stored all the same."""
    caplog.set_level(logging.ERROR, logger="cloud_hub.worker")
    acl = tmp_path / "acl"
    acl.write_text("".join(f"topic readwrite edgefleet/v1/+/{kind}\n"
                           for kind in topics.DEVICE_KINDS), encoding="utf-8")
    broker = MosquittoProcess(tmp_path / "broker", extra_conf=f"acl_file {acl}")
    broker.start()
    devices = [f"pi-{i}" for i in range(8)]
    try:
        with HubStore(path=tmp_path / "hub.db") as store:
            worker = start_worker(workers, store, broker.url, client_id="hub-no-receipts")
            fleet = fleet_factory(broker.url, devices)
            fleet.publish_range(range(1, 3))
            wait_for(lambda: worker.stats()["receipts_refused"] >= len(devices), 30,
                     "a refused receipt for every device")
            assert_exactly_once(store, devices, 2)
            assert fleet.receipts == dict.fromkeys(devices, 0)
            wait_for(lambda: worker._client.unacknowledged == 0, 10, "no receipt held")
            refused = worker.stats()["receipts_refused"]
    finally:
        for w in workers:
            w.stop()
        broker.kill()
    lines = [r.getMessage() for r in caplog.records if "refused a receipt" in r.getMessage()]
    assert 1 <= len(lines) <= 6 and len(lines) < refused  # a burst of 5, then 1 per 10 s
    assert "on 'edgefleet/v1/pi-" in lines[0] and "reason code 0x87 not authorized" in lines[0]


# --- a hub process killed with SIGKILL ------------------------------------------------------


class HubProcess:
    """`edgefleet hub serve` in a child process, its stderr in a file."""

    def __init__(self, tmp_path: Path, args: list[str]) -> None:
        self.args = args
        self.log = tmp_path / "hub-serve.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with self.log.open("ab") as out:
            out.write(f"--- start {self.starts}\n".encode())
            out.flush()
            self.proc = subprocess.Popen([sys.executable, "-m", "edgefleet", "hub", "serve",
                                          *self.args], stdout=out, stderr=out, env=env)
        wait_for(lambda: self.text().count("hub: subscribed") >= self.starts, 60,
                 "`edgefleet hub serve` to subscribe", tick=self.check_alive)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"hub exited with {self.proc.returncode}: {self.text()[-2000:]}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


def test_hub_killed_mid_stream_loses_and_doubles_nothing(mosquitto: MosquittoProcess,
                                                         tmp_path: Path,
                                                         fleet_factory: Callable[..., FleetSim]
                                                         ) -> None:
    """`edgefleet hub serve` killed with SIGKILL while a fleet publishes, and started again:
    the broker hands the restarted hub what it never acknowledged and what came while it was
    down, so every envelope is stored exactly once with no resend by the devices; a second
    kill with the devices resending ends the same way."""
    db = tmp_path / "hub.db"
    hub = HubProcess(tmp_path, ["--db", f"sqlite:///{db}", "--broker", mosquitto.url,
                                "--client-id", "hub-kill"])
    devices = [f"pi-{i}" for i in range(4)]
    hub.start()
    try:
        with HubStore(path=db) as store:
            fleet = fleet_factory(mosquitto.url, devices)
            publisher = threading.Thread(target=fleet.publish_range, args=(range(1, 151),),
                                         kwargs={"pause": 0.004})
            publisher.start()
            wait_for(lambda: store.counters().messages >= 100, 60, "100 envelopes stored")
            hub.kill()
            stored_at_kill = store.counters().messages
            publisher.join(60)
            assert stored_at_kill < 600, "the kill came after the stream ended"
            hub.start()
            wait_for(lambda: fleet.all_receipted(150), 60,
                     "the restarted hub to store everything the broker kept for it")
            assert fleet.resends == 0
            assert_exactly_once(store, devices, 150)

            # again, now with the devices resending what is not receipted
            publisher = threading.Thread(target=fleet.publish_range, args=(range(151, 301),),
                                         kwargs={"pause": 0.004})
            publisher.start()
            wait_for(lambda: store.counters().messages >= 700, 60, "100 more envelopes stored")
            hub.kill()
            publisher.join(60)
            hub.start()
            wait_for(lambda: fleet.all_receipted(300), 60, "receipts up to 300",
                     tick=fleet.resend_unreceipted)
            assert_exactly_once(store, devices, 300)
        assert hub.terminate() == 0
        assert "hub: worker hub-kill:" in hub.text()  # a clean stop reports its counters
    finally:
        if hub.proc is not None and hub.proc.poll() is None:
            hub.kill()


# --- the embedded broker (amqtt) -------------------------------------------------------------


def test_embedded_broker_round_trip() -> None:
    """A real paho client publishes and receives through the embedded broker (MQTT 3.1.1)."""
    from cloud_hub.embedded_broker import EmbeddedBroker

    got: list[tuple[str, bytes]] = []
    with EmbeddedBroker() as broker:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="rt",
                             protocol=mqtt.MQTTv311)
        subscribed = threading.Event()
        client.on_subscribe = lambda *a: subscribed.set()
        client.on_message = lambda c, u, m: got.append((m.topic, bytes(m.payload)))
        client.connect(broker.host, broker.port)
        client.loop_start()
        try:
            client.subscribe("edgefleet/v1/+/telemetry", qos=1)
            wait_for(subscribed.is_set, 10, "SUBACK from the embedded broker")
            client.publish("edgefleet/v1/pi-1/telemetry", b"hello", qos=1).wait_for_publish(10)
            wait_for(lambda: bool(got), 10, "the message back")
        finally:
            client.disconnect()
            client.loop_stop()
    assert got == [("edgefleet/v1/pi-1/telemetry", b"hello")]
    assert not broker.running


def test_embedded_broker_end_to_end(tmp_path: Path, workers: list[HubWorker],
                                    fleet_factory: Callable[..., FleetSim]) -> None:
    """Device envelope → embedded broker → worker → store → receipt back to the device. The
    worker's "auto" protocol falls back to MQTT 3.1.1 and to plain (unshared) filters, and its
    session outlives a restart of the worker (the broker queues for it meanwhile)."""
    from cloud_hub.embedded_broker import EmbeddedBroker

    with EmbeddedBroker() as broker, HubStore(path=tmp_path / "hub.db") as store:
        worker = start_worker(workers, store, broker.url, client_id="hub-embedded")
        assert worker.filters == ("edgefleet/v1/+/telemetry", "edgefleet/v1/+/state",
                                  "edgefleet/v1/+/ack")
        fleet = fleet_factory(broker.url, ["pi-1", "pi-2"], protocol=mqtt.MQTTv311)
        fleet.publish_range(range(1, 11))
        wait_for(lambda: fleet.all_receipted(10), 30, "receipts through the embedded broker")
        worker.stop()
        fleet.publish_range(range(11, 16))  # queued in the worker's session while it is away
        start_worker(workers, store, broker.url, client_id="hub-embedded")
        wait_for(lambda: fleet.all_receipted(15), 30, "messages queued while the hub was down")
        assert_exactly_once(store, ["pi-1", "pi-2"], 15)
        assert fleet.resends == 0
        for w in workers:
            w.stop()
        fleet.close()
