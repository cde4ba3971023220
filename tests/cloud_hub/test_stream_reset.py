"""The outbox and the hub's ingestion together, without a broker: a device database reset
mid-stream (outbox streams), and a refused envelope in the middle of a stream (markers)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import sqlalchemy as sa

from cloud_hub import tables
from cloud_hub.store import HubStore
from edge_agent.outbox import Outbox
from edge_agent.store import AgentStore, WriteBatch
from fleet_protocol import messages as msgs
from fleet_protocol import topics, wire
from tests.cloud_hub import fleet
from tests.edge_agent.test_outbox import QUOTA, window

DEVICE = "pi-1"
INFLIGHT = 4


def exchange(box: Outbox, hub: HubStore, now: float = 1.0) -> int:
    """One round: form up to ``INFLIGHT`` batches, send them all (unreceipted ones again),
    apply every receipt the hub answers, as the sync does (receipts of another stream are
    ignored by the outbox). The number of batches sent."""
    while box.form_batch() is not None:
        pass
    sent = [box.batch(seq) for seq in box.inflight()]
    payloads = [(topics.telemetry(DEVICE), b.payload(DEVICE, "0.1.0", now)) for b in sent if b]
    if not payloads:
        return 0
    result = hub.ingest(payloads, now=now)
    for (device, stream), up_to in result.receipts.items():
        assert device == DEVICE
        receipt = wire.decode(wire.encode(msgs.Receipt(device_id=device, stream=stream,
                                                       up_to_seq=up_to, ts=now)), msgs.Receipt)
        box.apply_receipt(receipt.up_to_seq, receipt.stream)
    return len(payloads)


def drain(box: Outbox, hub: HubStore) -> None:
    for _ in range(100):
        if exchange(box, hub) == 0 and not box.inflight():
            return
    raise AssertionError(f"the outbox does not drain: {box.status()}")


def hub_windows(hub: HubStore) -> list[tuple[str, int]]:
    """(stream, metrics["i"]) of every window the hub holds."""
    w = tables.windows
    rows = hub.run_read(lambda c: c.execute(sa.select(w.c.stream, w.c.metrics)
                                            .order_by(w.c.id)).all(), what="windows")
    return [(stream, json.loads(m)["i"]) for stream, m in rows]


@pytest.mark.parametrize("held", [10, 2], ids=["hub-held-many", "hub-held-few"])
def test_a_device_database_reset_mid_stream_loses_nothing(tmp_path: Path, held: int,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    """A device whose database is wiped restarts seqs at 1 under a new outbox stream: every
    window of the new database reaches the hub and nothing is deleted unstored, whether the
    hub held more seqs of the old database than the device keeps in flight or fewer."""
    hub = HubStore(path=tmp_path / "hub.db")
    old = AgentStore(tmp_path / "agent.db", outbox_quota_bytes=QUOTA)
    old_box = Outbox(old, max_batch_items=1, max_inflight=INFLIGHT)
    old.write(WriteBatch(windows=[window(i) for i in range(held)]))
    drain(old_box, hub)
    old.write(WriteBatch(windows=[window(100)]))  # written, never sent: lost with the reset
    old.close()
    for side in tmp_path.glob("agent.db*"):
        side.unlink()  # the operator wipes the data dir

    new = AgentStore(tmp_path / "agent.db", outbox_quota_bytes=QUOTA)
    box = Outbox(new, max_batch_items=1, max_inflight=INFLIGHT)
    assert box.stream != old_box.stream
    fresh = list(range(1000, 1012))
    with caplog.at_level(logging.ERROR, logger="cloud_hub.ingest"):
        for i in fresh:  # windows close while the sync runs: a few rounds of delivery
            new.write(WriteBatch(windows=[window(i)]))
            if i % 3 == 0:
                exchange(box, hub)
        drain(box, hub)
    assert "device database reset? " in caplog.text and box.stream in caplog.text
    assert box.status().rows == 0
    stored = hub_windows(hub)
    assert [i for s, i in stored if s == box.stream] == fresh
    assert [i for s, i in stored if s == old_box.stream] == list(range(held))
    device = hub.device(DEVICE)
    assert (device.stream, device.up_to_seq, device.conflicts) == (box.stream, len(fresh), 0)
    new.close()
    hub.close()


def test_a_refused_envelope_leaves_a_marker_and_the_stream_goes_on(store: HubStore) -> None:
    """Seq 1, a refused seq 2 (an item with an unknown field), seq 3: the receipt says 3, the
    refusal is counted, and seq 2 is kept as a marker holding no items."""
    bad = json.loads(wire.encode(fleet.envelope(DEVICE, 2, [fleet.event()])))
    bad["items"][0]["unknown"] = 1
    r = store.ingest([fleet.telemetry(DEVICE, 1), (topics.telemetry(DEVICE),
                                                   json.dumps(bad).encode()),
                      fleet.telemetry(DEVICE, 3)], now=1.0)
    assert r.receipts == {(DEVICE, fleet.STREAM): 3}
    assert (r.stored, r.refused, r.rejected) == (2, 1, 1)
    device = store.device(DEVICE)
    assert (device.up_to_seq, device.refused, device.messages) == (3, 1, 2)
    e = tables.envelopes
    marker = store.run_read(lambda c: c.execute(sa.select(e.c.n_items, e.c.refused)
                                                .where(e.c.seq == 2)).one(), what="marker")
    assert marker.n_items == 0 and "unknown" in marker.refused
    again = store.ingest([(topics.telemetry(DEVICE), json.dumps(bad).encode())], now=2.0)
    assert (again.duplicates, again.refused, again.receipts) == (1, 0, {(DEVICE, fleet.STREAM): 3})
    assert store.counters().rejections == {"invalid": 2}
