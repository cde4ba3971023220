"""The outbox on real SQLite files: atomic with what it reports, gapless seqs, receipts, quota."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.outbox import MAX_ITEM_BYTES, Outbox, enforce_quota, event_item, outbox_status
from edge_agent.store import AgentStore, SlotRecord, WindowRow, WriteBatch
from fleet_protocol import topics
from fleet_protocol.messages import EventItem, TelemetryEnvelope, WindowItem
from fleet_protocol.sketch import FeatureLayout, Sketch, SketchLayout
from fleet_protocol.wire import COMPRESS_ABOVE, decode_for_topic

ROOT = Path(__file__).resolve().parents[2]
LAYOUT = SketchLayout((FeatureLayout("f0", "numeric", edges=tuple(np.linspace(0, 1, 17))),))
SKETCH = Sketch.empty(LAYOUT).to_bytes()
FP = LAYOUT.fingerprint()
QUOTA = 10 * 1024 * 1024


def window(i: int, *, closed: bool = True, model: str = "m") -> WindowRow:
    """Window ``i`` of a 60 s series (metrics carry ``i`` so each one is told apart)."""
    return WindowRow(start=60.0 * i, end=60.0 * i + 60, model_name=model, model_version="1.0.0",
                     slot="blue", closed=closed, layout=f"{FP}/{FP}", inputs=SKETCH,
                     outputs=SKETCH, metrics={"requests": i, "i": i}, rows=i, updated_at=0.0)


def rows(store: AgentStore, where: str = "1") -> list[tuple[Any, ...]]:
    with store.reading() as conn:
        return conn.execute(f"SELECT kind, item, batch_seq FROM outbox WHERE {where} "
                            "ORDER BY id").fetchall()


def kinds(store: AgentStore) -> list[str]:
    return [r[0] for r in rows(store)]


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = AgentStore(tmp_path / "agent.db", outbox_quota_bytes=QUOTA)
    yield s
    s.close()


# --- written with what it reports -------------------------------------------------------------


def test_closed_window_gets_one_row_open_window_none(store: AgentStore) -> None:
    """Only a window that closes gets an outbox row, once, whether it arrives closed or closes
    later; writing a closed window again adds nothing."""
    store.write(WriteBatch(windows=[window(0, closed=False), window(1)]))
    assert kinds(store) == ["window"]
    store.write(WriteBatch(windows=[window(0), window(1)]))
    store.write(WriteBatch(windows=[window(0), window(1)]))
    items = [json.loads(r[1]) for r in rows(store)]
    assert [(i["kind"], i["start"]) for i in items] == [("window", 60.0), ("window", 0.0)]
    WindowItem.model_validate_json(rows(store)[0][1], strict=True)


def test_events_and_samples_go_to_the_outbox(store: AgentStore) -> None:
    """Events from the writer, record_event, save_swap_state and set_slot, and new samples,
    each get a row in the same transaction."""
    store.write(WriteBatch(events=[(1.0, "concept_drift", {"model": "m"})],
                           samples=[("b-1", 2.0, "1.0.0", "[1.0, 2.0]")]))
    store.record_event("bundle_refused", {"reason": "x" * 5000, "nan": math.nan})
    store.save_swap_state({"phase": "idle"}, [("promoted", {"cycle": 1})])
    store.set_slot(SlotRecord("blue", "m", "1.0.0", "0" * 64, "/b", 1.0),
                   event=("slot_installed", {"slot": "blue"}))
    store.write(WriteBatch(samples=[("b-1", 2.0, "1.0.0", "[1.0, 2.0]")]))  # already stored
    assert kinds(store) == ["sample", "event", "event", "event", "event"]
    refused = EventItem.model_validate_json(rows(store)[2][1])
    assert refused.event == "bundle_refused" and len(refused.detail["reason"]) == 1024
    assert refused.detail["nan"] is None
    assert store.events(["bundle_refused"])[0]["detail"]["reason"] == "x" * 5000


def test_no_outbox_without_sync(tmp_path: Path) -> None:
    """With sync off (no quota) nothing is added to the outbox."""
    s = AgentStore(tmp_path / "agent.db")
    try:
        s.write(WriteBatch(windows=[window(0)], events=[(1.0, "e", {})]))
        s.record_event("e", {})
        assert outbox_status(s).rows == 0 and s.count("windows") == 1
    finally:
        s.close()


def test_failed_transaction_leaves_neither(store: AgentStore) -> None:
    """A write that fails after its window was inserted rolls back the window and its row."""
    bad = WriteBatch(windows=[window(0)], predictions=[("boot", 0, 1)])  # type: ignore[list-item]
    with pytest.raises(Exception, match="binding"):
        store.write(bad)
    assert store.count("windows") == 0 and outbox_status(store).rows == 0


@pytest.mark.parametrize("kill_at", ["before_outbox_row", "after_commit"])
def test_killed_writer_leaves_window_and_row_together(tmp_path: Path, kill_at: str) -> None:
    """A process killed between the window insert and its outbox row commits neither; killed
    after the commit, both are there."""
    db = tmp_path / "agent.db"
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_outbox import window
        from edge_agent import outbox
        from edge_agent.store import AgentStore, WriteBatch
        store = AgentStore({str(db)!r}, outbox_quota_bytes=10**7)
        if {kill_at!r} == "before_outbox_row":
            outbox.insert = lambda *a, **k: os._exit(9)
        store.write(WriteBatch(windows=[window(0)]))
        os._exit(9)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == 9, proc.stderr.decode()
    reopened = AgentStore(db, outbox_quota_bytes=QUOTA)
    try:
        expected = 1 if kill_at == "after_commit" else 0
        assert reopened.count("windows") == expected
        assert outbox_status(reopened).rows == expected
        assert reopened.integrity_ok()
    finally:
        reopened.close()


# --- batches and seqs -------------------------------------------------------------------------


def test_seqs_are_gapless_and_survive_reopen(tmp_path: Path) -> None:
    """Batches take 1, 2, 3... in order; after a reopen (and after receipts emptied the
    outbox) the next batch takes the next seq, never one used before."""
    path = tmp_path / "agent.db"
    s = AgentStore(path, outbox_quota_bytes=QUOTA)
    s.write(WriteBatch(windows=[window(i) for i in range(7)]))
    box = Outbox(s, max_batch_items=3, max_inflight=10)
    assert [b.seq for b in iter(box.form_batch, None)] == [1, 2, 3]
    assert box.apply_receipt(3, box.stream) == 3
    s.close()
    s = AgentStore(path, outbox_quota_bytes=QUOTA)
    try:
        box = Outbox(s, max_batch_items=3, max_inflight=10)
        assert box.form_batch() is None
        s.write(WriteBatch(windows=[window(10)]))
        batch = box.form_batch()
        assert batch is not None and batch.seq == 4
        assert outbox_status(s).last_seq == 4
    finally:
        s.close()


def test_batches_bounded_by_items_bytes_and_inflight(store: AgentStore) -> None:
    """A batch holds at most max_batch_items items and max_batch_bytes of item JSON (one
    larger item goes alone); no batch is formed while max_inflight wait for a receipt."""
    store.write(WriteBatch(windows=[window(i) for i in range(10)]))
    size = max(len(r[1]) for r in rows(store))  # all within a few bytes of each other
    box = Outbox(store, max_batch_items=4, max_batch_bytes=3 * size + 520, max_inflight=2)
    first, second = box.form_batch(), box.form_batch()
    assert first is not None and second is not None
    assert (len(first.items), len(second.items)) == (3, 3)
    assert box.form_batch() is None  # two in flight
    box.apply_receipt(1, box.stream)
    third = box.form_batch()
    assert third is not None and third.seq == 3
    small = Outbox(store, max_batch_items=4, max_batch_bytes=4096, max_inflight=9)
    store.write(WriteBatch(events=[(1.0, "big", {"text": "y" * 1000, "more": ["z" * 1000] * 4})]))
    batches = list(iter(small.form_batch, None))  # the window left over, then the big event
    assert [len(b.items) for b in batches] == [1, 1]
    assert len(batches[1].items[0]) > 4096


def test_resend_repeats_seq_message_id_and_items(tmp_path: Path) -> None:
    """A formed batch reads back unchanged, also after a reopen: same seq, id and items."""
    path = tmp_path / "agent.db"
    s = AgentStore(path, outbox_quota_bytes=QUOTA)
    s.write(WriteBatch(windows=[window(i) for i in range(3)]))
    formed = Outbox(s).form_batch()
    s.write(WriteBatch(windows=[window(9)]))  # arrives later: not part of batch 1
    s.close()
    s = AgentStore(path, outbox_quota_bytes=QUOTA)
    try:
        box = Outbox(s)
        assert box.inflight() == [1]
        again = box.batch(1)
        assert again is not None and formed is not None
        assert (again.seq, again.message_id, again.items) == (1, formed.message_id,
                                                               formed.items)
        env = decode_for_topic(topics.telemetry("pi-1"), again.payload("pi-1", "0.1.0", 5.0))
        assert isinstance(env, TelemetryEnvelope)
        assert (env.seq, env.message_id, len(env.items)) == (1, formed.message_id, 3)
    finally:
        s.close()


def test_payload_is_compressed_above_the_threshold(store: AgentStore) -> None:
    """Envelopes are fleet_protocol bytes: zlib above COMPRESS_ABOVE, plain JSON below."""
    store.write(WriteBatch(windows=[window(i) for i in range(5)]))
    box = Outbox(store, max_batch_items=1, max_inflight=10)
    one = box.form_batch()
    rest = box.form_batch()
    assert one is not None and rest is not None
    assert one.payload("pi-1", "0.1.0", 1.0)[:1] == b"{"
    big = Outbox(store, max_inflight=10)
    many = big.form_batch()
    assert many is not None and len(many.items) == 3
    wire = many.payload("pi-1", "0.1.0", 1.0)
    assert wire[:1] == b"\x78" and len(json.dumps(list(many.items))) > COMPRESS_ABOVE


def test_receipt_deletes_exactly_up_to_its_seq(store: AgentStore) -> None:
    """A receipt deletes the batches up to its seq and their rows, nothing else; a stale one
    does nothing; one above the last seq formed is ignored."""
    store.write(WriteBatch(windows=[window(i) for i in range(8)]))
    box = Outbox(store, max_batch_items=2, max_inflight=3)
    assert [b.seq for b in iter(box.form_batch, None)] == [1, 2, 3]
    assert box.apply_receipt(2, box.stream) == 2
    assert box.inflight() == [3]
    assert [r[2] for r in rows(store)] == [3, 3, None, None]
    assert box.apply_receipt(1, box.stream) == 0
    assert box.apply_receipt(4, box.stream) is None
    assert box.inflight() == [3] and outbox_status(store).last_receipt_seq == 2
    assert box.apply_receipt(0, box.stream) == 0


# --- quota ------------------------------------------------------------------------------------


def test_quota_drops_samples_then_events_then_windows(tmp_path: Path) -> None:
    """Past the quota the oldest unbatched samples go first, then events, windows only when
    nothing else is left; drops are counted per kind, and the next batch reports them once."""
    s = AgentStore(tmp_path / "agent.db", outbox_quota_bytes=QUOTA)
    try:
        s.write(WriteBatch(windows=[window(i) for i in range(4)]))
        s.write(WriteBatch(events=[(float(i), f"e{i}", {}) for i in range(3)],
                           samples=[(f"b-{i}", float(i), "1.0.0", "[1]") for i in range(5)]))
        st = outbox_status(s)
        p = st.by_kind["sample"][1] // st.by_kind["sample"][0]
        w = max(len(r[1]) for r in rows(s, "kind = 'window'"))
        with s.transaction() as conn:  # 2p + 1 bytes too many: three samples must go
            assert enforce_quota(conn, st.bytes - 2 * p - 1, 5.0) == {"sample": 3}
        st = outbox_status(s)
        assert st.drops_total == {"sample": 3}
        left = [json.loads(r[1]) for r in rows(s, "kind = 'sample'")]
        assert [x["prediction_id"] for x in left] == ["b-3", "b-4"]  # the oldest went
        # now only windows may stay: all samples and events go before the first window
        s.outbox_quota_bytes = 3 * w
        s.record_event("tock", {})
        st = outbox_status(s)
        assert st.drops_total == {"sample": 5, "event": 4, "window": 1}
        assert st.drops_unreported == st.drops_total
        assert [json.loads(r[1])["start"] for r in rows(s)] == [60.0, 120.0, 180.0]

        s.outbox_quota_bytes = QUOTA
        box = Outbox(s, max_batch_items=10)
        batch = box.form_batch()
        assert batch is not None
        report = [json.loads(t) for t in batch.items if '"outbox_dropped"' in t]
        assert len(report) == 1 and len(batch.items) == 4
        assert report[0]["detail"] == {"sample": 5, "event": 4, "window": 1}
        assert outbox_status(s).drops_unreported == {}
        s.write(WriteBatch(windows=[window(50)]))
        nxt = box.form_batch()
        assert nxt is not None and not any("outbox_dropped" in t for t in nxt.items)
    finally:
        s.close()


def test_quota_never_drops_batched_rows(store: AgentStore) -> None:
    """Rows in a formed batch keep their seq's promise: the quota drops only unbatched rows."""
    store.write(WriteBatch(windows=[window(i) for i in range(3)]))
    batch = Outbox(store, max_batch_items=2).form_batch()
    assert batch is not None
    store.outbox_quota_bytes = 64
    store.write(WriteBatch(windows=[window(5)]))
    st = outbox_status(store)
    assert st.drops_total == {"window": 2} and st.rows == 2 and st.inflight == (1,)


def test_report_of_drops_alone_forms_a_batch(store: AgentStore) -> None:
    """Drops with nothing else left to send still reach the hub in a batch of their own."""
    store.outbox_quota_bytes = 1
    store.record_event("a", {})
    store.outbox_quota_bytes = QUOTA
    batch = Outbox(store).form_batch()
    assert batch is not None and len(batch.items) == 1
    assert json.loads(batch.items[0])["detail"] == {"sample": 0, "event": 1, "window": 0}


def test_unsendable_batch_keeps_its_seq(store: AgentStore) -> None:
    """A batch that cannot be encoded is replaced by one event under the same seq."""
    store.write(WriteBatch(windows=[window(0), window(1)]))
    box = Outbox(store)
    batch = box.form_batch()
    assert batch is not None
    box.replace_unsendable(batch.seq, "test")
    again = box.batch(batch.seq)
    assert again is not None and again.message_id == batch.message_id
    assert [json.loads(t)["event"] for t in again.items] == ["outbox_batch_unsendable"]
    assert outbox_status(store).drops_total == {"window": 2}


def test_event_items_always_travel() -> None:
    """Event names and details are made valid (names cut to the allowed characters, deep
    nesting as text), and an oversized item becomes a small event."""
    item = event_item(-1.0, "bad name/with spaces" * 5, {"a": {"b": {"c": {"d": 1}}}})
    parsed = EventItem.model_validate_json(item.text)
    assert parsed.ts == 0.0 and len(parsed.event) == 64 and "/" not in parsed.event
    assert isinstance(parsed.detail["a"]["b"], str)
    assert item.size == len(item.text.encode()) and item.size < MAX_ITEM_BYTES


def test_rows_lost_unsendable_or_oversized_are_reported_as_drops(store: AgentStore) -> None:
    """Rows a replaced batch loses, and an item too large to travel, join the pending drop
    counts, so the next outbox_dropped event reports them; a drop report that was inside the
    replaced batch goes back to pending instead of vanishing."""
    with store.transaction() as conn:  # two samples dropped earlier, not yet reported
        conn.execute("INSERT INTO outbox_drops VALUES ('sample', 2, 2, 0.0)")
    store.write(WriteBatch(windows=[window(0), window(1)]))
    box = Outbox(store)
    batch = box.form_batch()
    assert batch is not None and json.loads(batch.items[-1])["event"] == "outbox_dropped"
    box.replace_unsendable(batch.seq, "test")
    st = outbox_status(store)
    assert st.drops_unreported == {"window": 2, "sample": 2}
    assert st.drops_total == {"window": 2, "sample": 2}
    huge = replace(window(2), metrics={f"k{i}": "x" * 1000 for i in range(600)})
    store.write(WriteBatch(windows=[huge]))
    assert outbox_status(store).drops_unreported == {"window": 3, "sample": 2}
    box.apply_receipt(batch.seq, box.stream)
    report = box.form_batch()
    assert report is not None
    events = [json.loads(t) for t in report.items]
    assert [e["event"] for e in events] == ["outbox_item_too_large", "outbox_dropped"]
    assert events[-1]["detail"] == {"sample": 2, "event": 0, "window": 3}
    assert outbox_status(store).drops_unreported == {}
