"""The store itself: SQLite settings, schema version, PostgreSQL URLs, retries, the registry
and selectors, and two workers ingesting one fleet at the same time."""

from __future__ import annotations

import random
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from cloud_hub import tables
from cloud_hub.errors import DeviceNotFound, HubStoreError, SelectorError
from cloud_hub.ingest import IngestResult
from cloud_hub.store import HubStore, normalise_url, open_store
from cloud_hub.tags import parse_selector, parse_tags
from tests.cloud_hub import fleet


def test_sqlite_is_created_with_wal_full_sync_and_a_schema_version(tmp_path: Path) -> None:
    """No set-up: the folder and file are created; reopening is a no-op."""
    db = tmp_path / "deep" / "hub.db"
    with HubStore(path=db) as store:
        store.ingest([fleet.telemetry("pi-1", 1)], now=1.0)
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10_000
    with open_store(str(db)) as store:
        assert store.counters().messages == 1
        version = store.run_read(lambda c: c.execute(sa.select(tables.meta.c.value).where(
            tables.meta.c.key == "schema_version")).scalar(), what="meta")
        assert version == str(tables.SCHEMA_VERSION)


def test_a_sqlite_older_than_the_hub_sql_needs_is_refused_at_open(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub's SQL needs SQLite 3.35 (RETURNING; UPDATE ... FROM: 3.33): an older library
    is refused when the store opens, naming the version found and the one needed, before
    anything is created (not with the first batch ingested)."""
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 34, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.34.1")
    with pytest.raises(HubStoreError, match=r"version 3\.34\.1, and the hub needs 3\.35\.0"):
        HubStore(path=tmp_path / "deep" / "hub.db")
    assert not (tmp_path / "deep").exists()
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 35, 0))
    HubStore(path=tmp_path / "deep" / "hub.db").close()


def test_a_database_of_another_schema_version_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "hub.db"
    HubStore(path=db).close()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.close()
    with pytest.raises(HubStoreError, match="schema version 99, this build knows 2"):
        HubStore(path=db)


def test_database_urls() -> None:
    assert normalise_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalise_url("postgres://u@h:5/db") == "postgresql+psycopg://u@h:5/db"
    assert normalise_url("sqlite:///x.db") == "sqlite:///x.db"
    with pytest.raises(HubStoreError, match="'mysql' is not supported"):
        normalise_url("mysql://u@h/db")


def test_postgres_store_opens_twice(pg_database: str) -> None:
    """create_all is idempotent (and serialised by an advisory lock)."""
    with HubStore(pg_database) as a, HubStore(pg_database) as b:
        a.ingest([fleet.telemetry("pi-1", 1)], now=1.0)
        assert b.counters().messages == 1
        assert "postgresql+psycopg" in b.describe()


def test_a_batch_that_keeps_failing_raises_and_stores_nothing(tmp_path: Path) -> None:
    """Another writer holds the lock past every retry: HubStoreError, nothing written; once it
    lets go the same batch goes in."""
    db = tmp_path / "hub.db"
    with HubStore(path=db, busy_timeout=0.02) as store:
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        batch = [fleet.telemetry("pi-1", 1)]
        with pytest.raises(HubStoreError, match=r"failed 5 times.*nothing of it was stored"):
            store.ingest(batch, now=1.0)
        other.execute("ROLLBACK")
        other.close()
        assert store.counters().messages == 0
        assert store.ingest(batch, now=2.0).receipts == {("pi-1", fleet.STREAM): 1}


def test_selectors_parse_and_name_the_bad_part() -> None:
    sel = parse_selector(" site=a , cohort=bright")
    assert str(sel) == "cohort=bright,site=a"
    assert sel.matches({"site": "a", "cohort": "bright", "x": "y"})
    assert not sel.matches({"site": "a"})
    assert parse_selector(None).matches({}) and parse_selector("").matches({"a": "b"})
    for text, part in (("site", "'site' is not key=value"), ("Site=a", "key 'Site'"),
                       ("site=a b", "value 'a b'"), ("site=a,,x=y", "empty part"),
                       ("site=a,site=b", "site=a and site=b")):
        with pytest.raises(SelectorError, match=part):
            parse_selector(text)
    assert parse_tags(["site=a", "cohort="]) == {"site": "a", "cohort": None}


def test_operator_tags_override_device_tags_in_selectors(store: HubStore) -> None:
    store.ingest([fleet.state("pi-1", tags={"site": "a", "cohort": "x"}),
                  fleet.state("pi-2", tags={"site": "a"}), fleet.state("pi-3")], now=1.0)
    assert [d.device_id for d in store.devices("site=a")] == ["pi-1", "pi-2"]
    record = store.set_tags("pi-2", {"site": "b", "line": "3"})
    assert record.tags == {"site": "b", "line": "3"} and record.device_tags == {"site": "a"}
    assert [d.device_id for d in store.devices("site=a")] == ["pi-1"]
    assert [d.device_id for d in store.devices("site=b,line=3")] == ["pi-2"]
    assert store.set_tags("pi-2", {"site": None}).tags == {"site": "a", "line": "3"}
    with pytest.raises(DeviceNotFound, match="no device 'ghost'"):
        store.set_tags("ghost", {"site": "a"})
    with pytest.raises(SelectorError, match="key 'BAD'"):
        store.set_tags("pi-1", {"BAD": "a"})


def _worker(store: HubStore, batches: list[list[tuple[str, bytes]]], name: str,
            start: threading.Barrier, out: list[IngestResult]) -> None:
    start.wait()
    for i, batch in enumerate(batches):
        out.append(store.ingest(batch, now=float(i), worker=name))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_workers_ingesting_one_fleet_count_exactly(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Two stores (own connections, own threads) get the same devices' envelopes shuffled and
    resent: every (device, seq) stored once, every resend counted, up_to_seq exact."""
    url = (f"sqlite:///{tmp_path / 'hub.db'}" if backend == "sqlite"
           else request.getfixturevalue("pg_database"))
    rng = np.random.default_rng(3)
    shuffle = random.Random(3)
    n_devices, n_seqs = 6, 40
    originals = [fleet.telemetry(f"pi-{d}", s, [fleet.window(f"pi-{d}", 300.0 * s, 20,
                                                             rng)[0]])
                 for d in range(n_devices) for s in range(1, n_seqs + 1)]
    resends = [m for m in originals if shuffle.random() < 0.3]
    stream = originals + resends
    shuffle.shuffle(stream)
    halves = [stream[0::2], stream[1::2]]
    results: list[list[IngestResult]] = [[], []]
    stores = [HubStore(url), HubStore(url)]
    barrier = threading.Barrier(2)
    try:
        threads = [threading.Thread(target=_worker, args=(
            stores[i], [halves[i][j:j + 9] for j in range(0, len(halves[i]), 9)], f"w{i}",
            barrier, results[i])) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        every = results[0] + results[1]
        assert sum(r.stored for r in every) == len(originals)
        assert sum(r.duplicates for r in every) == len(resends)
        c = stores[0].counters()
        assert (c.messages, c.duplicates, c.conflicts) == (len(originals), len(resends), 0)
        assert {d.device_id: d.up_to_seq for d in stores[1].devices()} == {
            f"pi-{d}": n_seqs for d in range(n_devices)}
        n_windows = stores[0].run_read(lambda c: c.execute(
            sa.select(sa.func.count()).select_from(tables.windows)).scalar(), what="count")
        assert n_windows == len(originals)
        workers: dict[str, int] = stores[0].run_read(lambda c: dict(c.execute(
            sa.select(tables.envelopes.c.worker, sa.func.count())
            .group_by(tables.envelopes.c.worker)).all()), what="split")
        assert set(workers) == {"w0", "w1"} and sum(workers.values()) == len(originals)
    finally:
        for s in stores:
            s.close()
