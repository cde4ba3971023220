"""Ingestion on SQLite and PostgreSQL: exactly once, receipts, conflicts, every refusal."""

from __future__ import annotations

import json
import logging
import zlib

import numpy as np
import pytest
import sqlalchemy as sa

from cloud_hub import tables
from cloud_hub.ingest import REJECT_KINDS
from cloud_hub.store import HubStore
from fleet_protocol import messages as msgs
from fleet_protocol import wire
from tests.cloud_hub import fleet


def count(store: HubStore, table: sa.Table) -> int:
    return int(store.run_read(lambda c: c.execute(sa.select(sa.func.count())
                                                  .select_from(table)).scalar_one(), what="count"))


def test_each_seq_is_stored_once_and_every_resend_is_receipted(store: HubStore) -> None:
    """A resent envelope is counted as a duplicate, not stored again, and receipted again."""
    rng = np.random.default_rng(0)
    batch = [fleet.telemetry("pi-1", s, [fleet.window("pi-1", 300.0 * s, 50, rng)[0]])
             for s in (1, 2, 3)]
    first = store.ingest(batch, now=100.0)
    key = ("pi-1", fleet.STREAM)
    assert (first.stored, first.duplicates, first.receipts) == (3, 0, {key: 3})
    again = store.ingest([batch[1], batch[1]], now=101.0)
    assert (again.stored, again.duplicates, again.receipts) == (0, 2, {key: 3})
    assert count(store, tables.envelopes) == 3
    assert count(store, tables.windows) == 3
    c = store.counters()
    assert (c.messages, c.duplicates, c.conflicts, c.rejected) == (3, 2, 0, 0)


def test_out_of_order_seqs_advance_up_to_seq_only_over_contiguous_ones(store: HubStore) -> None:
    """Seq 1, 3, 5 receipt 1; filling 2 receipts 3; filling 4 receipts 5."""
    r = store.ingest([fleet.telemetry("pi-1", s) for s in (5, 1, 3)], now=1.0)
    assert r.receipts == {("pi-1", fleet.STREAM): 1} and r.stored == 3
    assert store.device("pi-1").max_seq == 5
    key = ("pi-1", fleet.STREAM)
    assert store.ingest([fleet.telemetry("pi-1", 2)], now=2.0).receipts == {key: 3}
    assert store.ingest([fleet.telemetry("pi-1", 4)], now=3.0).receipts == {key: 5}
    d = store.device("pi-1")
    assert (d.up_to_seq, d.max_seq, d.messages) == (5, 5, 5)


def test_a_gap_then_its_fill_in_one_batch(store: HubStore) -> None:
    """Envelopes of several devices, each out of order, in one batch."""
    batch = [fleet.telemetry(d, s) for s in (3, 1, 2) for d in ("a", "b")]
    batch.append(fleet.telemetry("c", 2))
    r = store.ingest(batch, now=1.0)
    assert r.receipts == {(d, fleet.STREAM): n for d, n in (("a", 3), ("b", 3), ("c", 0))}


def test_same_seq_with_another_message_id_is_a_conflict(
        store: HubStore, caplog: pytest.LogCaptureFixture) -> None:
    """Counted, logged loudly, kept aside, never stored over the original, never receipted."""
    original = fleet.telemetry("pi-1", 1)
    store.ingest([original], now=1.0)
    clash = fleet.telemetry("pi-1", 1, [fleet.event(name="other")])
    with caplog.at_level(logging.ERROR, logger="cloud_hub.ingest"):
        r = store.ingest([clash], now=2.0)
    assert (r.stored, r.duplicates, r.conflicts, r.receipts) == (0, 0, 1, {})
    assert "two devices sharing one id?" in caplog.text and "pi-1" in caplog.text
    assert count(store, tables.conflicts) == 1
    events = store.run_read(lambda c: c.execute(sa.select(tables.events.c.event)).scalars()
                            .all(), what="events")
    assert events == ["swap.promoted"]
    assert store.counters().conflicts == 1
    # a batch holding both the resend and the clash: the resend still gets its receipt
    r = store.ingest([clash, original], now=3.0)
    assert (r.conflicts, r.duplicates, r.receipts) == (1, 1, {("pi-1", fleet.STREAM): 1})


def _bad_sketch_envelope(rng: np.random.Generator) -> tuple[str, bytes]:
    good, _ = fleet.window("pi-1", 0.0, 10, rng)
    # header and fingerprint intact (the model's own check passes), one byte too many
    bad = good.model_copy(update={"inputs": good.inputs + b"\x00"})
    return fleet.wire(fleet.envelope("pi-1", 2, [good, bad]))


def _rejected(rng: np.random.Generator) -> dict[str, tuple[str, bytes]]:
    env = json.loads(wire.encode(fleet.envelope("pi-1", 3, [fleet.event()])))
    topic = fleet.telemetry("pi-1", 1)[0]
    extra = {**env, "colour": "red"}
    newer = {**env, "protocol": 2}
    return {
        "oversized": (topic, b"{" + b" " * (msgs.TelemetryEnvelope.MAX_WIRE_BYTES + 1)),
        "zip bomb": (topic, zlib.compress(b"{" + b" " * (8 * 1024 * 1024))),
        "not JSON": (topic, b"{this is not json"),
        "not bytes of JSON or zlib": (topic, b"hello"),
        "wrong protocol": (topic, json.dumps(newer).encode()),
        "other device in the envelope": ("edgefleet/v1/pi-2/telemetry", wire.encode(
            fleet.envelope("pi-1", 4, [fleet.event()]))),
        "unknown kind": ("edgefleet/v1/pi-1/bogus", b"{}"),
        "not our topic": ("somewhere/else", b"{}"),
        "hub-bound kind": ("edgefleet/v1/pi-1/receipt", b"{}"),
        "bad sketch": _bad_sketch_envelope(rng),
        "extra field": (topic, json.dumps(extra).encode()),
    }


EXPECTED_KIND = {
    "oversized": ("oversized", "pi-1"), "zip bomb": ("oversized", "pi-1"),
    "not JSON": ("malformed", "pi-1"), "not bytes of JSON or zlib": ("malformed", "pi-1"),
    "wrong protocol": ("protocol", "pi-1"), "other device in the envelope": ("device_id", "pi-2"),
    "unknown kind": ("topic", None), "not our topic": ("topic", None),
    "hub-bound kind": ("topic", "pi-1"), "bad sketch": ("sketch", "pi-1"),
    "extra field": ("invalid", "pi-1"),
}


def test_every_refusal_is_counted_with_its_device_and_nothing_of_it_is_written(
        store: HubStore, caplog: pytest.LogCaptureFixture) -> None:
    """Each malformed, oversized, foreign or wrong-version payload is one rejection of its
    class, with the topic's device id; the valid message of the same batch is stored."""
    bad = _rejected(np.random.default_rng(1))
    valid = fleet.telemetry("pi-9", 1)
    with caplog.at_level(logging.DEBUG, logger="cloud_hub.ingest"):
        r = store.ingest([*bad.values(), valid], now=5.0)
    # the bad sketch (seq 2) and the extra field (seq 3) still name their key: kept as markers
    # without items, so pi-1's stream is not stuck behind them (seq 1 is still missing)
    assert r.stored == 1 and r.refused == 2
    assert r.receipts == {("pi-9", fleet.STREAM): 1, ("pi-1", fleet.STREAM): 0}
    got = {name: (rej.kind, rej.device_id) for name, rej in zip(bad, r.rejections, strict=True)}
    assert got == EXPECTED_KIND
    assert all(rej.reason for rej in r.rejections)
    assert "device=pi-2" in caplog.text
    assert count(store, tables.envelopes) == 3
    assert count(store, tables.windows) == 0
    assert count(store, tables.rejections) == len(bad)
    assert [(d.device_id, d.refused) for d in store.devices()] == [("pi-1", 2), ("pi-9", 0)]
    kinds = store.counters().rejections
    assert sum(kinds.values()) == len(bad) and set(kinds) <= set(REJECT_KINDS)
    assert kinds["topic"] == 3 and kinds["oversized"] == 2


def test_a_batch_of_only_refusals_writes_only_rejections(store: HubStore) -> None:
    r = store.ingest([("edgefleet/v1/x/telemetry", b"nope")], now=1.0)
    assert r.rejected == 1 and r.receipts == {}
    assert count(store, tables.rejections) == 1 and count(store, tables.devices) == 0


def test_state_and_last_will_keep_the_registry(store: HubStore) -> None:
    """Online state fills the registry; the will marks offline and keeps slots, phase, health
    and tags; an older state is ignored; first/last seen follow every valid message."""
    store.ingest([fleet.state("pi-1", ts=10.0, tags={"site": "a"}, phase="shadow")], now=100.0)
    d = store.device("pi-1")
    assert (d.online, d.swap_phase, d.device_tags, d.first_seen, d.last_seen) == (
        True, "shadow", {"site": "a"}, 100.0, 100.0)
    assert d.versions() == {"blue": "toy 1.0.0"} and d.health == {"ok": True}
    store.ingest([fleet.state("pi-1", online=False, ts=20.0)], now=200.0)
    d = store.device("pi-1")
    assert (d.online, d.swap_phase, d.device_tags, d.state_ts) == (False, "shadow",
                                                                   {"site": "a"}, 20.0)
    assert d.versions() == {"blue": "toy 1.0.0"} and (d.first_seen, d.last_seen) == (100, 200)
    store.ingest([fleet.state("pi-1", ts=15.0, tags={"site": "old"})], now=300.0)
    d = store.device("pi-1")
    assert (d.online, d.device_tags, d.last_seen) == (False, {"site": "a"}, 300.0)
    # online again, then its will, in one batch
    store.ingest([fleet.state("pi-1", ts=30.0, tags={"site": "b"}, phase="idle"),
                  fleet.state("pi-1", online=False, ts=30.0)], now=400.0)
    d = store.device("pi-1")
    assert (d.online, d.swap_phase, d.device_tags) == (False, "idle", {"site": "b"})


def test_acks_are_stored(store: HubStore) -> None:
    ack = msgs.Ack(device_id="pi-1", command_id="cmd-1", status="refused", reason="expired",
                   ts=3.0)
    r = store.ingest([fleet.wire(ack)], now=4.0)
    assert r.acks == 1 and r.receipts == {}
    rows = store.run_read(lambda c: c.execute(sa.select(tables.acks)).all(), what="acks")
    assert [(a.device_id, a.command_id, a.status, a.reason) for a in rows] == [
        ("pi-1", "cmd-1", "refused", "expired")]


def test_items_land_in_their_tables(store: HubStore) -> None:
    rng = np.random.default_rng(2)
    item, sent = fleet.window("pi-1", 3600.0, 40, rng)
    sample = msgs.SampleItem(prediction_id="p-1", ts=5.0, model_version="1.0.0",
                             inputs='{"temp": 3}')
    store.ingest([fleet.telemetry("pi-1", 1, [item, fleet.event(), sample])], now=9.0)
    w = store.run_read(lambda c: c.execute(sa.select(tables.windows)).one(), what="window")
    assert (w.device_id, w.seq, w.start, w.rows, w.layout) == ("pi-1", 1, 3600.0, 40,
                                                               sent.layout)
    assert bytes(w.inputs) == sent.inputs.to_bytes() and json.loads(w.metrics) == {
        "requests": 40}
    assert count(store, tables.events) == 1 and count(store, tables.samples) == 1
    assert store.windows_by_device(model_name="toy") == {"pi-1": 1}
    assert store.rows_by_device(model_name="toy", model_version="1.0.0") == {"pi-1": 40}
    assert store.rows_by_device(model_name="other") == {}
    env = store.run_read(lambda c: c.execute(sa.select(tables.envelopes)).one(), what="env")
    assert (env.n_items, env.received_at) == (3, 9.0)


def test_one_bad_sketch_among_many_refuses_only_its_envelope(store: HubStore) -> None:
    """Sketches are checked a batch at a time; a bad one is still pinned on its envelope."""
    rng = np.random.default_rng(4)
    batch = [fleet.telemetry(f"pi-{d}", 1, [fleet.window(f"pi-{d}", 0.0, 30, rng)[0]
                                            for _ in range(3)]) for d in range(5)]
    good, _ = fleet.window("pi-9", 0.0, 30, rng)
    truncated = good.model_copy(update={"outputs": good.outputs[:-1]})
    overlong = good.model_copy(update={"inputs": good.inputs[:13] + b"\x80\x00"
                                       + good.inputs[14:]})
    batch.insert(2, fleet.telemetry("pi-9", 1, [good, truncated, overlong]))
    r = store.ingest(batch, now=1.0)
    assert r.stored == 5 and r.refused == 1  # pi-9's seq 1: a marker, receipted
    assert r.receipts == {(f"pi-{d}", fleet.STREAM): 1 for d in (0, 1, 2, 3, 4, 9)}
    (rej,) = r.rejections
    assert (rej.device_id, rej.kind) == ("pi-9", "sketch")
    assert rej.reason.startswith("items.1.outputs: ") and "seq 1: refused whole" in rej.reason
    assert count(store, tables.windows) == 15
