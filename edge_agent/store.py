"""The agent's SQLite database: slots, telemetry windows, predictions, feedback, events, outbox.

WAL with ``synchronous=FULL``: a commit survives a power cut once it returns (FIELD-NOTES:
"Durability facts"). The writer thread commits in batches, so FULL costs little. At open the file
gets ``PRAGMA quick_check`` (through a read-only connection, which leaves the file and its WAL as
they are); a corrupt file is moved aside unchanged (``agent.db.corrupt-<time>``, with its -wal
and -shm) and a new one started, rather than crash-looping on it. A database that cannot be read
for another reason (locked, I/O) is a StoreError, never moved aside. The schema is versioned
with sqlite-utils ``Migrations``; nothing here stores raw inputs unless sampling is switched on.

With ``outbox_quota_bytes`` set (sync configured), every closed window, event and sample is also
written to the outbox (:mod:`edge_agent.outbox`) in the same transaction, and the quota is
enforced before that transaction commits.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from edge_agent import outbox
from edge_agent.errors import StoreError
from edge_agent.onnx_guard import OnnxSummary
from fleet_protocol.messages import new_stream_id

__all__ = ["AgentStore", "SlotRecord", "WindowRow", "WriteBatch"]

log = logging.getLogger(__name__)

migrations = Migrations("edge_agent")


@migrations()
def m001_initial(db: Database) -> None:
    db.table("slots").create({"slot": str, "name": str, "version": str, "sha256": str, "path": str,
                        "installed_at": float}, pk="slot")
    db.table("windows").create({
        "start": float, "end": float, "model_name": str, "model_version": str, "slot": str,
        "closed": int, "layout": str, "inputs": bytes, "outputs": bytes, "metrics": str,
        "rows": int, "updated_at": float,
    }, pk=("start", "model_name", "model_version"))
    db.table("windows").create_index(["closed", "start"])
    # One row per run of single requests or stretch of batches (edge_agent.prediction_log):
    # ids are "<boot>-<hex counter>", so a prediction id finds its row by
    # (boot, first <= k < first + n). Outputs only, no inputs.
    db.table("predictions").create({"boot": str, "first": int, "n": int, "ts": float,
                              "model_name": str, "model_version": str, "labels": str,
                              "scores": bytes}, pk=("boot", "first"))
    db.table("predictions").create_index(["ts"])
    db.table("feedback").create({"prediction_id": str, "ts": float, "label": str,
                           "model_version": str, "correct": int, "residual": float},
                          pk="prediction_id")
    db.table("samples").create({"prediction_id": str, "ts": float, "model_version": str,
                          "inputs": str}, pk="prediction_id")
    db.table("events").create({"id": int, "ts": float, "kind": str, "detail": str}, pk="id")


@migrations()
def m002_swap_state(db: Database) -> None:
    # One row: the swap machine's state (edge_agent.swap.SwapState.to_dict, versioned inside).
    db.table("swap_state").create({"id": int, "state": str, "updated_at": float}, pk="id")


@migrations()
def m003_onnx_checks(db: Database) -> None:
    # ONNX allow-list results by model sha256 (edge_agent.onnx_guard), so a restart does not
    # walk a large model's protobuf again.
    db.table("onnx_checks").create({"sha256": str, "summary": str}, pk="sha256")


@migrations()
def m004_outbox(db: Database) -> None:
    # edge_agent.outbox: items waiting for the hub's receipt, the batches (seqs) formed from
    # them, drop counters, and one row of totals that triggers keep exact.
    db.execute("CREATE TABLE outbox (id INTEGER PRIMARY KEY, kind TEXT NOT NULL, "
               "priority INTEGER NOT NULL, item TEXT NOT NULL, size INTEGER NOT NULL, "
               "created_at REAL NOT NULL, batch_seq INTEGER)")
    db.execute("CREATE INDEX outbox_batch_id ON outbox (batch_seq, id)")
    db.execute("CREATE INDEX outbox_batch_priority ON outbox (batch_seq, priority, id)")
    db.execute("CREATE TABLE outbox_batches (seq INTEGER PRIMARY KEY, message_id TEXT NOT NULL,"
               " created_at REAL NOT NULL, items INTEGER NOT NULL)")
    db.execute("CREATE TABLE outbox_drops (kind TEXT PRIMARY KEY, pending INTEGER NOT NULL, "
               "total INTEGER NOT NULL, last_at REAL)")
    db.execute("CREATE TABLE outbox_meta (id INTEGER PRIMARY KEY CHECK (id = 1), "
               "rows INTEGER NOT NULL, bytes INTEGER NOT NULL, last_seq INTEGER NOT NULL, "
               "last_receipt_seq INTEGER NOT NULL, last_receipt_at REAL)")
    db.execute("INSERT INTO outbox_meta VALUES (1, 0, 0, 0, 0, NULL)")
    db.execute("CREATE TRIGGER outbox_added AFTER INSERT ON outbox BEGIN UPDATE outbox_meta "
               "SET rows = rows + 1, bytes = bytes + new.size WHERE id = 1; END")
    db.execute("CREATE TRIGGER outbox_removed AFTER DELETE ON outbox BEGIN UPDATE outbox_meta "
               "SET rows = rows - 1, bytes = bytes - old.size WHERE id = 1; END")


@migrations()
def m005_outbox_stream(db: Database) -> None:
    # edge_agent.outbox: the outbox's stream id, random per database. A database that is reset
    # (quarantined when corrupt, or wiped) starts seqs at 1 again under a new stream, so the
    # hub never takes its seqs for resends of the old database's (DESIGN, "Delivery").
    db.execute("ALTER TABLE outbox_meta ADD COLUMN stream TEXT")
    db.execute("UPDATE outbox_meta SET stream = ? WHERE id = 1", [new_stream_id()])


@migrations()
def m006_prediction_codes(db: Database) -> None:
    # A batch of integer classes is logged by its codes (1 or 2 bytes a row) and its model's
    # label set, not as a JSON list of 1,024 label strings: the writer built that list holding
    # the GIL, a quarter of the time under sustained batch load. ``labels`` is NULL then.
    db.execute("ALTER TABLE predictions ADD COLUMN codes BLOB")
    db.execute("ALTER TABLE predictions ADD COLUMN label_set TEXT")


#: codes blob width (bytes per row) -> its little-endian dtype
_CODE_DTYPES = {1: "<u1", 2: "<u2", 4: "<u4"}


@dataclass(frozen=True)
class SlotRecord:
    slot: str
    name: str
    version: str
    sha256: str
    path: str
    installed_at: float


@dataclass(frozen=True)
class WindowRow:
    start: float
    end: float
    model_name: str
    model_version: str
    slot: str
    closed: bool
    layout: str
    inputs: bytes
    outputs: bytes
    metrics: dict[str, Any]
    rows: int
    updated_at: float


#: one logged row of predictions (a run of single requests or a stretch of batches, ids
#: first..first+n-1): (boot, first, n, ts, model_name, model_version, labels json, scores
#: float32 bytes, codes, label set json). It holds ``labels`` (a JSON list, one per
#: prediction), or ``codes`` (unsigned little-endian, 1, 2 or 4 bytes each) indexing
#: ``label_set``, or neither (a regressor: a label is the text of its float32 score)
PredictionRow = tuple[str, int, int, float, str, str, str | None, bytes, bytes | None,
                      str | None]


@dataclass
class WriteBatch:
    """Everything the writer commits in one transaction."""

    windows: list[WindowRow] = field(default_factory=list)
    #: oldest first; see PredictionRow
    predictions: list[PredictionRow] = field(default_factory=list)
    feedback: list[tuple[str, float, str, str, int | None, float | None]] = field(
        default_factory=list)
    samples: list[tuple[str, float, str, str]] = field(default_factory=list)
    events: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.windows or self.predictions or self.feedback or self.samples
                    or self.events)


_UPSERT_WINDOW = (
    "INSERT INTO windows (start, end, model_name, model_version, slot, closed, layout, inputs, "
    "outputs, metrics, rows, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (start, "
    "model_name, model_version) DO UPDATE SET end=excluded.end, slot=excluded.slot, "
    "closed=excluded.closed, layout=excluded.layout, inputs=excluded.inputs, "
    "outputs=excluded.outputs, metrics=excluded.metrics, rows=excluded.rows, "
    "updated_at=excluded.updated_at WHERE windows.closed = 0")
_INSERT_SAMPLE = ("INSERT OR IGNORE INTO samples (prediction_id, ts, model_version, inputs) "
                  "VALUES (?,?,?,?)")


#: how long a connection waits on another's lock before SQLITE_BUSY
_BUSY_TIMEOUT_S = 10.0


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                           timeout=_BUSY_TIMEOUT_S)
    conn.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT_S * 1000)}")
    return conn


def _quick_check(conn: sqlite3.Connection) -> bool:
    """``PRAGMA quick_check`` passes. SQLite's verdicts of corruption (SQLITE_CORRUPT,
    SQLITE_NOTADB) are False; an OperationalError (locked, busy, I/O, cannot open) is raised:
    it says nothing about the file, and moving a whole database aside for it loses its
    history, slots and swap state."""
    try:
        return bool(conn.execute("PRAGMA quick_check").fetchone()[0] == "ok")
    except sqlite3.OperationalError:
        raise
    except sqlite3.DatabaseError:
        return False


def _file_passes_quick_check(path: Path) -> bool:
    """Check ``path`` without changing it: through a read-only connection, whose close neither
    checkpoints the WAL into the file nor deletes the WAL (a read-write one's does, so a
    corrupt file would be rewritten and its WAL, the last commits, lost before it is moved
    aside). Where a read-only connection cannot read it (a hot rollback journal to replay),
    through a read-write one."""
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True,
                               timeout=_BUSY_TIMEOUT_S)
        try:
            return _quick_check(conn)
        finally:
            conn.close()
    except sqlite3.OperationalError as err:
        if "locked" in str(err) or "busy" in str(err):
            raise
    conn = _connect(path)
    try:
        return _quick_check(conn)
    finally:
        conn.close()


class AgentStore:
    """One SQLite file per agent; safe to share between the writer thread and readers."""

    def __init__(self, path: str | Path, *, keep_predictions: int = 1_000_000,
                 keep_windows: int = 2016, outbox_quota_bytes: int | None = None) -> None:
        self.path = Path(path)
        self.keep_predictions = keep_predictions
        self.keep_windows = keep_windows
        #: None: nothing goes to the outbox (sync is off)
        self.outbox_quota_bytes = outbox_quota_bytes
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.quarantined: Path | None = None
        try:
            conn = self._open_checked()
        except sqlite3.Error as err:
            raise StoreError(f"cannot open agent database {self.path}: {err}") from err
        self.db = Database(conn)
        try:
            migrations.apply(self.db)
        except sqlite3.Error as err:
            raise StoreError(f"cannot migrate agent database {self.path}: {err}") from err
        #: predictions the log holds (the sum of its rows' n), for keep_predictions
        self._kept = int(conn.execute("SELECT COALESCE(SUM(n), 0) FROM predictions")
                         .fetchone()[0])

    def _open_checked(self) -> sqlite3.Connection:
        if self.path.exists() and not _file_passes_quick_check(self.path):
            stamp = time.strftime("%Y%m%dT%H%M%S")
            self.quarantined = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
            n = 1
            while self.quarantined.exists():  # rename() would replace an earlier one
                self.quarantined = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
                n += 1
            self.path.rename(self.quarantined)
            for suffix in ("-wal", "-shm"):
                side = self.path.with_name(self.path.name + suffix)
                if side.exists():
                    side.rename(self.quarantined.with_name(self.quarantined.name + suffix))
            log.error("agent database %s failed quick_check; moved to %s and starting fresh",
                      self.path, self.quarantined)
        conn = _connect(self.path)
        mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
        if mode != "wal":  # SQLite keeps its journal where WAL cannot work (some network
            # file systems): still durable with FULL, but readers then wait for the writer
            log.warning("agent database %s: journal_mode is %r, not WAL (the file system "
                        "does not support it?): commits are still durable, but readers block "
                        "the writer", self.path, mode)
        conn.execute("PRAGMA synchronous = FULL")
        return conn

    def close(self) -> None:
        with self._lock:
            self.db.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """The connection inside one transaction, under the store's lock (commits on exit)."""
        with self._lock, self.db.atomic():
            yield self.db.conn

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """The connection under the store's lock, for reads."""
        with self._lock:
            yield self.db.conn

    # --- slots -----------------------------------------------------------------------------

    def slots(self) -> dict[str, SlotRecord]:
        with self._lock:
            rows = list(self.db.table("slots").rows)
        return {r["slot"]: SlotRecord(**r) for r in rows}

    def set_slot(self, record: SlotRecord, event: tuple[str, dict[str, Any]] | None = None) -> None:
        with self._lock, self.db.atomic():
            self.db.table("slots").upsert(record.__dict__, pk="slot")
            if event is not None:
                self._event(time.time(), event[0], event[1])
                self._outbox_quota()

    def delete_slot(self, slot: str) -> None:
        with self._lock, self.db.atomic():
            self.db.execute("DELETE FROM slots WHERE slot = ?", [slot])

    def onnx_checks(self) -> OnnxCheckCache:
        return OnnxCheckCache(self)

    # --- swap state --------------------------------------------------------------------------

    def load_swap_state(self) -> dict[str, Any] | None:
        with self._lock:
            row = self.db.execute("SELECT state FROM swap_state WHERE id = 1").fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def save_swap_state(self, state: dict[str, Any],
                        events: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Commit the swap state (and the events it records) before its actions run."""
        now = time.time()
        with self._lock, self.db.atomic():
            self.db.execute(
                "INSERT INTO swap_state (id, state, updated_at) VALUES (1, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET state = excluded.state, "
                "updated_at = excluded.updated_at", [json.dumps(state, sort_keys=True), now])
            for kind, detail in events:
                self._event(now, kind, detail)
            if events:
                self._outbox_quota()

    # --- writes ----------------------------------------------------------------------------

    def _event(self, ts: float, kind: str, detail: dict[str, Any]) -> None:
        self.db.execute("INSERT INTO events (ts, kind, detail) VALUES (?, ?, ?)",
                        [ts, kind, json.dumps(detail, sort_keys=True)])
        if self.outbox_quota_bytes is not None:
            outbox.insert(self.db.conn, [outbox.event_item(ts, kind, detail)], time.time())

    def _outbox_quota(self) -> None:
        """Last step of every transaction that added outbox rows."""
        if self.outbox_quota_bytes is not None:
            outbox.enforce_quota(self.db.conn, self.outbox_quota_bytes, time.time())

    def _worth_writing(self, rows: list[PredictionRow]) -> list[PredictionRow]:
        """``rows`` (oldest first) without those the retention would delete as soon as they
        are written: under heavy batch traffic a flush can hold far more than keep_predictions
        (7M predictions a second, 35 MB of log, were measured on 2 cores), and writing them
        only to delete them cost the disk and the writer's CPU."""
        total = sum(row[2] for row in rows)
        k = 0
        while k < len(rows) - 1 and total - rows[k][2] >= self.keep_predictions:
            total -= rows[k][2]
            k += 1
        return rows[k:] if k else rows

    def _trim_predictions(self, conn: sqlite3.Connection) -> None:
        """Delete the oldest logged rows while the rest still hold keep_predictions
        predictions (counted by prediction, not by row: one row holds a run of single requests
        or a stretch of batches, up to 65,536 predictions). Oldest = first inserted (rowid;
        a clock set back does not make new rows look old)."""
        excess = self._kept - self.keep_predictions
        last = None
        dropped = 0
        cur = conn.execute("SELECT rowid, n FROM predictions ORDER BY rowid")
        try:
            while chunk := cur.fetchmany(256):
                for rowid, n in chunk:
                    if dropped + n > excess:
                        break
                    dropped += n
                    last = rowid
                else:
                    continue
                break
        finally:
            cur.close()  # no read left open on the table the DELETE changes
        if last is not None:
            conn.execute("DELETE FROM predictions WHERE rowid <= ?", [last])
            self._kept -= dropped

    def record_event(self, kind: str, detail: dict[str, Any]) -> None:
        with self._lock, self.db.atomic():
            self._event(time.time(), kind, detail)
            self._outbox_quota()

    def write(self, batch: WriteBatch) -> None:
        """Commit one batch atomically (one fsync under synchronous=FULL)."""
        if not batch:
            return
        with self._lock, self.db.atomic():
            conn = self.db.conn
            sync = self.outbox_quota_bytes is not None
            if batch.windows:
                rows = [(w.start, w.end, w.model_name, w.model_version, w.slot, int(w.closed),
                         w.layout, w.inputs, w.outputs, json.dumps(w.metrics, sort_keys=True),
                         w.rows, w.updated_at) for w in batch.windows]
                if not sync:
                    conn.executemany(_UPSERT_WINDOW, rows)
                else:
                    # a window closing now (inserted closed, or an open one updated to closed)
                    # changes one row; a window closed before is left alone and changes none
                    for w, row in zip(batch.windows, rows, strict=True):
                        changed = conn.execute(_UPSERT_WINDOW, row).rowcount
                        if w.closed and changed == 1:
                            outbox.insert(conn, [outbox.window_item(w)], time.time())
            predictions = self._worth_writing(batch.predictions)
            if predictions:
                conn.executemany(
                    "INSERT OR IGNORE INTO predictions (boot, first, n, ts, model_name, "
                    "model_version, labels, scores, codes, label_set) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?)", predictions)
            if batch.feedback:
                conn.executemany(
                    "INSERT OR IGNORE INTO feedback (prediction_id, ts, label, model_version, "
                    "correct, residual) VALUES (?,?,?,?,?,?)", batch.feedback)
            if batch.samples and not sync:
                conn.executemany(_INSERT_SAMPLE, batch.samples)
            elif batch.samples:
                for sample in batch.samples:
                    if conn.execute(_INSERT_SAMPLE, sample).rowcount == 1:
                        item = outbox.sample_item(*sample)
                        if item is not None:
                            outbox.insert(conn, [item], time.time())
            for ts, kind, detail in batch.events:
                self._event(ts, kind, detail)
            if predictions:
                self._kept += sum(row[2] for row in predictions)
                if self._kept > self.keep_predictions:
                    self._trim_predictions(conn)
            if any(w.closed for w in batch.windows):
                conn.execute(
                    "DELETE FROM windows WHERE closed = 1 AND start < (SELECT start FROM windows"
                    " WHERE closed = 1 ORDER BY start DESC LIMIT 1 OFFSET ?)",
                    [self.keep_windows])
            if sync and (batch.windows or batch.samples or batch.events):
                self._outbox_quota()

    # --- reads -----------------------------------------------------------------------------

    def _window(self, r: dict[str, Any]) -> WindowRow:
        return WindowRow(
            start=r["start"], end=r["end"], model_name=r["model_name"],
            model_version=r["model_version"], slot=r["slot"], closed=bool(r["closed"]),
            layout=r["layout"], inputs=r["inputs"], outputs=r["outputs"],
            metrics=json.loads(r["metrics"]), rows=r["rows"], updated_at=r["updated_at"],
        )

    def windows(self, *, closed: bool | None = None, since: float | None = None,
                model_version: str | None = None) -> list[WindowRow]:
        where: list[str] = []
        args: list[Any] = []
        if closed is not None:
            where.append("closed = ?")
            args.append(int(closed))
        if since is not None:
            where.append("start >= ?")
            args.append(since)
        if model_version is not None:
            where.append("model_version = ?")
            args.append(model_version)
        sql = " AND ".join(where) if where else None
        with self._lock:
            rows = list(self.db.table("windows").rows_where(sql, args, order_by="start"))
        return [self._window(r) for r in rows]

    def prediction_horizon(self) -> tuple[int, float | None]:
        """How far back feedback can reach: the predictions the log holds, and the time of
        the oldest (None: none logged). The oldest is the first inserted, as for retention:
        a device without a real-time clock may log times that go back (before NTP)."""
        with self._lock:
            row = self.db.execute("SELECT ts FROM predictions ORDER BY rowid LIMIT 1").fetchone()
            return self._kept, None if row is None else float(row[0])

    def prediction(self, prediction_id: str) -> dict[str, Any] | None:
        """The prediction an id names: model, version, label and score (confidence/value)."""
        boot, _, hex_k = prediction_id.rpartition("-")
        try:
            k = int(hex_k, 16)
        except ValueError:
            return None
        with self._lock:
            row = self.db.execute(
                "SELECT first, n, model_name, model_version, labels, scores, codes, label_set "
                "FROM predictions WHERE boot = ? AND first <= ? ORDER BY first DESC LIMIT 1",
                [boot, k]).fetchone()
        if row is None or not row[0] <= k < row[0] + row[1]:
            return None
        i = k - row[0]
        score32 = np.frombuffer(row[5], dtype="<f4")[i]
        if row[6] is not None:
            code = int(np.frombuffer(row[6], dtype=_CODE_DTYPES[len(row[6]) // row[1]])[i])
            label = json.loads(row[7])[code]
        elif row[4] is not None:
            label = json.loads(row[4])[i]
        else:  # a regressor's batch: the label is the text of the float32 value
            label = str(np.float32(score32))
        score = float(score32)
        return {"model_name": row[2], "model_version": row[3], "label": label, "score": score}

    def has_feedback(self, prediction_id: str) -> bool:
        with self._lock:
            return bool(self.db.table("feedback").count_where("prediction_id = ?", [prediction_id]))

    def count(self, table: str) -> int:
        with self._lock:
            return int(self.db[table].count)

    def events(self, kinds: Sequence[str] | None = None) -> list[dict[str, Any]]:
        with self._lock:
            if kinds:
                marks = ",".join("?" for _ in kinds)
                rows = list(self.db.table("events").rows_where(f"kind IN ({marks})", list(kinds),
                                                         order_by="id"))
            else:
                rows = list(self.db.table("events").rows_where(order_by="id"))
        return [{**r, "detail": json.loads(r["detail"])} for r in rows]

    def integrity_ok(self) -> bool:
        with self._lock:
            return bool(self.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok")



class OnnxCheckCache(MutableMapping[str, OnnxSummary]):
    """ONNX check results by model sha256, read once and written through to SQLite."""

    def __init__(self, store: AgentStore) -> None:
        self._store = store
        with store._lock:
            rows = store.db.execute("SELECT sha256, summary FROM onnx_checks").fetchall()
        self._data = {sha: _summary(json.loads(text)) for sha, text in rows}

    def __getitem__(self, key: str) -> OnnxSummary:
        return self._data[key]

    def __setitem__(self, key: str, value: OnnxSummary) -> None:
        self._data[key] = value
        doc = {"opsets": value.opsets, "node_domains": sorted(value.node_domains),
               "n_nodes": value.n_nodes}
        with self._store._lock, self._store.db.atomic():
            self._store.db.execute(
                "INSERT OR REPLACE INTO onnx_checks (sha256, summary) VALUES (?, ?)",
                [key, json.dumps(doc, sort_keys=True)])

    def __delitem__(self, key: str) -> None:
        del self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def _summary(doc: dict[str, Any]) -> OnnxSummary:
    return OnnxSummary(opsets={str(k): int(v) for k, v in doc["opsets"].items()},
                       node_domains=frozenset(doc["node_domains"]), n_nodes=int(doc["n_nodes"]))
