"""Ingestion's driver SQL (cloud_hub.ingest_sql) names the schema's columns, cuts batches into
its few statement sizes, and stores batches larger than one statement on both dialects."""

from __future__ import annotations

import numpy as np
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st

from cloud_hub import ingest_sql, tables
from cloud_hub.store import HubStore
from tests.cloud_hub import fleet


def test_statements_name_the_tables_columns() -> None:
    """Every column the driver SQL writes exists in the SQLAlchemy schema, and every column a
    new row needs (not nullable, no default) is written."""
    for table, columns in ((tables.envelopes, ingest_sql.ENVELOPE_COLUMNS),
                           (tables.windows, ingest_sql.WINDOW_COLUMNS),
                           (tables.devices, ingest_sql.DEVICE_INSERT_COLUMNS),
                           (tables.streams, ingest_sql.STREAM_COLUMNS),
                           (tables.rollup_dirty, ingest_sql.DIRTY_COLUMNS)):
        assert set(columns) <= set(table.c.keys()), table.name
        needed = {c.name for c in table.c if not c.nullable and c.default is None
                  and not (c.primary_key and c.autoincrement is True)
                  and not (c.primary_key and isinstance(c.type, sa.Integer)
                           and c.autoincrement == "auto" and len(table.primary_key) == 1)}
        assert needed <= set(columns), (table.name, needed - set(columns))


@given(st.integers(0, 3000))
def test_batches_are_cut_into_a_few_statement_sizes_in_order(n: int) -> None:
    rows = list(range(n))
    chunks = list(ingest_sql._chunks(rows))
    assert [r for c in chunks for r in c] == rows
    assert all(len(c) in ingest_sql._CHUNKS for c in chunks)


def test_a_batch_larger_than_a_statement_is_stored_once(store: HubStore) -> None:
    """600 envelopes with a window each (several multi-row statements per table), then the
    same batch again with 100 new ones: stored, duplicates, receipts, windows and rollup marks
    all count each envelope once."""
    rng = np.random.default_rng(3)
    devices = [f"pi-{i:02d}" for i in range(40)]
    item, _ = fleet.window("pi-00", 0.0, 20, rng)

    def batch(seqs: range) -> list[tuple[str, bytes]]:
        return [fleet.telemetry(d, s, [item.model_copy(update={"start": 3600.0 * s,
                                                                 "end": 3600.0 * s + 300})])
                for s in seqs for d in devices]

    sent = batch(range(1, 16))
    first = store.ingest(sent, now=1.0)
    assert (first.stored, first.duplicates) == (600, 0)
    assert first.receipts == {(d, fleet.STREAM): 15 for d in devices}
    again = store.ingest(sent + batch(range(16, 19)), now=2.0)  # resent, and 120 new
    assert (again.stored, again.duplicates) == (120, 600)
    assert again.receipts == {(d, fleet.STREAM): 18 for d in devices}

    def count(table: sa.Table) -> int:
        return int(store.run_read(lambda c: c.execute(
            sa.select(sa.func.count()).select_from(table)).scalar_one(), what="count"))

    assert count(tables.envelopes) == count(tables.windows) == 720
    assert count(tables.rollup_dirty) == 720  # one hour bucket per window and device
    c = store.counters()
    assert (c.devices, c.messages, c.duplicates) == (40, 720, 600)
    assert [d.up_to_seq for d in store.devices()] == [18] * 40
