"""The outbox: what the hub must learn, committed with what it reports, sent in numbered batches.

DESIGN, "Delivery and durability". A broker's PUBACK is not delivery (FIELD-NOTES, "Delivery
facts": paho keeps unsent QoS 1 messages in memory only, and a Mosquitto killed with SIGKILL
loses what it acknowledged), so a row leaves the outbox only when the hub's receipt names it.

Rows (table ``outbox``) are protocol items — :class:`~fleet_protocol.messages.WindowItem`,
``EventItem``, ``SampleItem`` as JSON — with a kind, a priority and a size. ``AgentStore`` inserts
them in the same transaction as the closed window, event or sample they report (see
:func:`insert`), so a committed window always has its row. The outbox keeps its own copy: the
``windows`` table's retention does not touch it.

Batches (table ``outbox_batches``) are formed by the publisher only while it is connected and
fewer than ``max_inflight`` batches wait for a receipt: the oldest unbatched rows, bounded in
items and bytes, under the next sequence number and a fresh message id, in one transaction. A
batch never changes after that, so a resend (after ``resend_after_seconds``, after a reconnect,
after a crash) repeats the same seq, message id and items, and the hub stores each (device, seq)
once. Seqs run 1, 2, 3... without gaps: one is taken only together with the rows it carries.

Quota: offline, the backlog stays unbatched and grows; past ``quota_bytes`` the oldest rows of
the lowest priority go first (samples, then events, windows only when nothing else is left,
:func:`enforce_quota`). Drops are counted per kind in ``outbox_drops``; the next batch formed
carries an ``outbox_dropped`` event with the counts since the last report, reset in the same
transaction. Rows already in a batch are never dropped: their seq is promised to the hub.

Stream: ``outbox_meta.stream`` is a random id made with the database (migration m005). Every
envelope carries it and every receipt names it, so a database that is reset (quarantined or
wiped) restarts its seqs at 1 under a new stream, and neither side confuses them with the old
database's seqs. A receipt of another stream is ignored (counted and logged by the sync).

A receipt ``up_to_seq`` deletes the batches up to it and their rows in one transaction; a receipt
above the last seq ever formed is ignored and logged (the hub cannot hold what was never sent).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from fleet_protocol.messages import (
    EventItem,
    MessageError,
    SampleItem,
    TelemetryEnvelope,
    WindowItem,
    new_message_id,
    window_item_from,
)
from fleet_protocol.wire import encode

if TYPE_CHECKING:
    import sqlite3

    from edge_agent.store import AgentStore, WindowRow

__all__ = ["KINDS", "MAX_ITEM_BYTES", "PRIORITY", "Batch", "Outbox", "OutboxItem",
           "OutboxStatus", "enforce_quota", "event_item", "insert", "outbox_status",
           "sample_item", "window_item"]

log = logging.getLogger(__name__)

#: lower goes first when the quota bites (DESIGN: sketches and metrics are kept longest)
PRIORITY: Mapping[str, int] = {"sample": 0, "event": 1, "window": 2}
KINDS = tuple(PRIORITY)
#: one item alone must still fit a telemetry message uncompressed
MAX_ITEM_BYTES = TelemetryEnvelope.MAX_WIRE_BYTES // 2
#: envelope fields around the items: ids, seq, times, version (generous)
ENVELOPE_OVERHEAD = 512
DROPPED_EVENT = "outbox_dropped"
_MAX_DETAIL_TEXT = 1024
DROP_LOG_EVERY = 60.0
_last_drop_log = -math.inf


@dataclass(frozen=True)
class OutboxItem:
    """One row to insert: a protocol item as JSON text."""

    kind: str
    text: str
    size: int
    #: the kind of an item this one replaces because it could not travel (counted as a drop)
    replaces: str | None = None

    @property
    def priority(self) -> int:
        return PRIORITY[self.kind]


def _item(model: WindowItem | EventItem | SampleItem) -> OutboxItem:
    text = model.model_dump_json()
    size = len(text.encode("utf-8"))
    kind = model.kind
    if size > MAX_ITEM_BYTES:
        log.error("outbox %s item of %d bytes is over the %d allowed; sending an event instead",
                  kind, size, MAX_ITEM_BYTES)
        event = event_item(time.time(), "outbox_item_too_large", {"kind": kind, "bytes": size})
        return OutboxItem(event.kind, event.text, event.size, replaces=kind)
    return OutboxItem(kind, text, size)


def window_item(row: WindowRow) -> OutboxItem:
    """The outbox row of a closed window (an ``outbox_item_invalid`` event if it cannot be one)."""
    try:
        item = window_item_from(model_name=row.model_name, model_version=row.model_version,
                                slot=row.slot, start=row.start, end=row.end, layout=row.layout,
                                inputs=row.inputs, outputs=row.outputs,
                                metrics=_jsonable(row.metrics), rows=row.rows)
    except MessageError as err:
        log.error("closed window %s %s at %s is not a valid WindowItem (%s); sending an event "
                  "instead", row.model_name, row.model_version, row.start, err)
        return event_item(row.end, "outbox_item_invalid", {
            "kind": "window", "model": row.model_name, "version": row.model_version,
            "start": row.start, "reason": str(err)})
    return _item(item)


def event_item(ts: float, kind: str, detail: Mapping[str, Any]) -> OutboxItem:
    """The outbox row of an event; strings are cut and non-finite numbers become null so that
    every event the agent records can travel (the local events table keeps the original)."""
    name = "".join(c if c.isascii() and (c.isalnum() or c in "_.:-") else "_" for c in kind)
    try:
        item = EventItem(ts=max(ts, 0.0), event=name[:64] or "event",
                         detail=_sanitized(dict(detail), 1))
    except ValidationError as err:
        item = EventItem(ts=max(ts, 0.0), event=name[:64] or "event",
                         detail={"unsendable_detail": str(err)[:_MAX_DETAIL_TEXT]})
    return _item(item)


def sample_item(prediction_id: str, ts: float, model_version: str, inputs: str
                ) -> OutboxItem | None:
    """The outbox row of a sampled request, or None (logged) if it cannot travel."""
    try:
        item = SampleItem(prediction_id=prediction_id, ts=ts, model_version=model_version,
                          inputs=inputs)
    except ValidationError as err:
        log.warning("sample %s is not sendable (%s); kept locally only", prediction_id,
                    str(err).splitlines()[0])
        return None
    return _item(item)


def _jsonable(value: Any) -> Any:
    """Metrics as JSON would carry them (non-finite floats as null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _sanitized(value: Any, depth: int) -> Any:
    """A JSON value within EventItem's limits: depth 3, text of 1,024 characters."""
    if isinstance(value, str):
        return value[:_MAX_DETAIL_TEXT]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict | list | tuple):
        if depth >= 3:
            return json.dumps(value, default=str)[:_MAX_DETAIL_TEXT]
        if isinstance(value, dict):
            return {str(k)[:256]: _sanitized(v, depth + 1) for k, v in list(value.items())[:64]}
        return [_sanitized(v, depth + 1) for v in list(value)[:64]]
    if value is None or isinstance(value, bool | int | float):
        return value
    return str(value)[:_MAX_DETAIL_TEXT]


# --- inside the store's transactions ------------------------------------------------------------


def insert(conn: sqlite3.Connection, items: Iterable[OutboxItem], now: float) -> int:
    """Insert unbatched rows (inside the caller's transaction); returns how many."""
    items = list(items)
    rows = [(i.kind, i.priority, i.text, i.size, now) for i in items]
    if rows:
        conn.executemany("INSERT INTO outbox (kind, priority, item, size, created_at) "
                         "VALUES (?, ?, ?, ?, ?)", rows)
    lost: dict[str, int] = {}
    for i in items:  # an oversized item travels as an event: the item itself is a drop
        if i.replaces is not None:
            lost[i.replaces] = lost.get(i.replaces, 0) + 1
    _count_drops(conn, lost, now)
    return len(rows)


def _count_drops(conn: sqlite3.Connection, dropped: Mapping[str, int], now: float) -> None:
    """Add ``dropped`` (kind -> rows) to the drop counters, pending the next report."""
    conn.executemany(
        "INSERT INTO outbox_drops (kind, pending, total, last_at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (kind) DO UPDATE SET pending = pending + excluded.pending, "
        "total = total + excluded.total, last_at = excluded.last_at",
        [(k, n, n, now) for k, n in dropped.items() if n])


def enforce_quota(conn: sqlite3.Connection, quota_bytes: int, now: float) -> dict[str, int]:
    """Drop the oldest lowest-priority unbatched rows until the outbox fits ``quota_bytes``.

    Inside the caller's transaction; counts what it dropped per kind in ``outbox_drops`` and
    returns those counts. Batched rows stay (their seq is promised to the hub).
    """
    total = conn.execute("SELECT bytes FROM outbox_meta WHERE id = 1").fetchone()[0]
    excess = total - quota_bytes
    if excess <= 0:
        return {}
    ids: list[int] = []
    dropped: dict[str, int] = {}
    cursor = conn.execute("SELECT id, kind, size FROM outbox WHERE batch_seq IS NULL "
                          "ORDER BY priority, id")
    for row_id, kind, size in cursor:
        ids.append(row_id)
        dropped[kind] = dropped.get(kind, 0) + 1
        excess -= size
        if excess <= 0:
            break
    cursor.close()
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        conn.execute(f"DELETE FROM outbox WHERE id IN ({','.join('?' * len(chunk))})", chunk)
    _count_drops(conn, dropped, now)
    global _last_drop_log
    if time.monotonic() - _last_drop_log >= DROP_LOG_EVERY:  # offline, this repeats each flush
        _last_drop_log = time.monotonic()
        log.warning("outbox over its quota of %d bytes: dropped %s (oldest, lowest priority "
                    "first; counted and reported to the hub)", quota_bytes,
                    ", ".join(f"{n} {k}" for k, n in sorted(dropped.items())))
    return dropped


# --- the publisher's side -----------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """One telemetry message: its seq, message id and items, fixed when it was formed."""

    seq: int
    message_id: str
    created_at: float
    items: tuple[str, ...]
    #: the outbox stream (see the module docstring)
    stream: str

    def envelope(self, device_id: str, agent_version: str, sent_at: float) -> TelemetryEnvelope:
        """The envelope of this batch (MessageError if it does not validate)."""
        head = json.dumps({"protocol": 1, "device_id": device_id, "stream": self.stream,
                           "message_id": self.message_id, "seq": self.seq, "sent_at": sent_at,
                           "agent_version": agent_version})
        text = head[:-1] + ',"items":[' + ",".join(self.items) + "]}"
        try:
            return TelemetryEnvelope.model_validate_json(text, strict=True)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise MessageError(f"outbox batch {self.seq} is not a valid envelope: {where}: "
                               f"{first['msg']}") from err

    def payload(self, device_id: str, agent_version: str, sent_at: float) -> bytes:
        """The wire bytes of this batch (zlib above COMPRESS_ABOVE)."""
        return encode(self.envelope(device_id, agent_version, sent_at))


@dataclass(frozen=True)
class OutboxStatus:
    """What `edgefleet agent outbox` shows."""

    rows: int
    bytes: int
    #: kind -> (rows, bytes), batched or not
    by_kind: dict[str, tuple[int, int]]
    unbatched_rows: int
    #: seqs sent (or formed) and not yet receipted, in order
    inflight: tuple[int, ...]
    last_seq: int
    last_receipt_seq: int
    last_receipt_at: float | None
    #: kind -> rows dropped by the quota since the database was made
    drops_total: dict[str, int] = field(default_factory=dict)
    #: kind -> drops not yet reported to the hub
    drops_unreported: dict[str, int] = field(default_factory=dict)
    oldest_created_at: float | None = None


class Outbox:
    """The publisher's view of the outbox in an :class:`~edge_agent.store.AgentStore`.

    One thread (the sync's publisher) calls these; each call is one short transaction on the
    store's connection, so the writer thread waits at most that long.
    """

    def __init__(self, store: AgentStore, *, max_batch_items: int = 100,
                 max_batch_bytes: int = 256 * 1024, max_inflight: int = 4,
                 clock: Callable[[], float] = time.time) -> None:
        if not 1 <= max_batch_items < 500:
            raise ValueError(f"max_batch_items {max_batch_items}: expected 1-499")
        self.store = store
        self.max_batch_items = max_batch_items
        self.max_batch_bytes = max_batch_bytes
        self.max_inflight = max_inflight
        self.clock = clock
        with store.reading() as conn:
            #: this database's outbox stream (fixed for its life)
            self.stream: str = conn.execute(
                "SELECT stream FROM outbox_meta WHERE id = 1").fetchone()[0]

    def form_batch(self) -> Batch | None:
        """Form the next batch from the oldest unbatched rows, or None (nothing to send, or
        ``max_inflight`` batches already wait for a receipt). Persisted before it returns."""
        now = self.clock()
        with self.store.transaction() as conn:
            inflight = conn.execute("SELECT COUNT(*) FROM outbox_batches").fetchone()[0]
            if inflight >= self.max_inflight:
                return None
            drops = dict(conn.execute(
                "SELECT kind, pending FROM outbox_drops WHERE pending > 0").fetchall())
            limit = self.max_batch_items - (1 if drops else 0)
            budget = self.max_batch_bytes - ENVELOPE_OVERHEAD
            ids: list[int] = []
            texts: list[str] = []
            for row_id, text, size in conn.execute(
                    "SELECT id, item, size FROM outbox WHERE batch_seq IS NULL ORDER BY id "
                    "LIMIT ?", [limit]):
                if ids and size > budget:
                    break
                ids.append(row_id)
                texts.append(text)
                budget -= size
            if not ids and not drops:
                return None
            seq = conn.execute("SELECT last_seq FROM outbox_meta WHERE id = 1").fetchone()[0] + 1
            message_id = new_message_id()
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                conn.execute(f"UPDATE outbox SET batch_seq = ? WHERE id IN "
                             f"({','.join('?' * len(chunk))})", [seq, *chunk])
            if drops:
                report = {k: drops.get(k, 0) for k in KINDS}
                item = event_item(now, DROPPED_EVENT, report)
                conn.execute("INSERT INTO outbox (kind, priority, item, size, created_at, "
                             "batch_seq) VALUES (?, ?, ?, ?, ?, ?)",
                             [item.kind, item.priority, item.text, item.size, now, seq])
                conn.execute("UPDATE outbox_drops SET pending = 0")
                texts.append(item.text)
            conn.execute("INSERT INTO outbox_batches (seq, message_id, created_at, items) "
                         "VALUES (?, ?, ?, ?)", [seq, message_id, now, len(texts)])
            conn.execute("UPDATE outbox_meta SET last_seq = ? WHERE id = 1", [seq])
        return Batch(seq, message_id, now, tuple(texts), self.stream)

    def inflight(self) -> list[int]:
        """Seqs formed and not yet receipted, oldest first."""
        with self.store.reading() as conn:
            return [r[0] for r in conn.execute("SELECT seq FROM outbox_batches ORDER BY seq")]

    def batch(self, seq: int) -> Batch | None:
        """A formed batch as it was formed (None once receipted)."""
        with self.store.reading() as conn:
            head = conn.execute("SELECT message_id, created_at FROM outbox_batches WHERE seq = ?",
                                [seq]).fetchone()
            if head is None:
                return None
            items = tuple(r[0] for r in conn.execute(
                "SELECT item FROM outbox WHERE batch_seq = ? ORDER BY id", [seq]))
        return Batch(seq, head[0], head[1], items, self.stream)

    def apply_receipt(self, up_to_seq: int, stream: str) -> int | None:
        """The hub holds every seq up to ``up_to_seq`` of ``stream``: delete those batches and
        their rows.

        Returns how many batches were deleted, or None when the receipt names another stream
        (the database before a reset) or a seq never formed here (ignored and logged).
        """
        now = self.clock()
        if stream != self.stream:
            log.warning("receipt of outbox stream %s up to seq %d ignored: this database's "
                        "stream is %s (a receipt meant for the database before a reset)",
                        stream, up_to_seq, self.stream)
            return None
        with self.store.transaction() as conn:
            last_seq = conn.execute("SELECT last_seq FROM outbox_meta WHERE id = 1").fetchone()[0]
            if up_to_seq > last_seq:
                log.warning("receipt up to seq %d ignored: the last seq sent is %d (a hub "
                            "that lost track, or a receipt meant for an earlier database)",
                            up_to_seq, last_seq)
                return None
            conn.execute("DELETE FROM outbox WHERE batch_seq IS NOT NULL AND batch_seq <= ?",
                         [up_to_seq])
            deleted = conn.execute("DELETE FROM outbox_batches WHERE seq <= ?",
                                   [up_to_seq]).rowcount
            conn.execute("UPDATE outbox_meta SET last_receipt_seq = MAX(last_receipt_seq, ?), "
                         "last_receipt_at = ? WHERE id = 1", [up_to_seq, now])
        return int(deleted)

    def replace_unsendable(self, seq: int, reason: str) -> None:
        """A formed batch that cannot be encoded (it was never sent): keep its seq, replace its
        items by one event saying why, and count the lost rows as drops, pending the next
        ``outbox_dropped`` report (logged loudly). A drop report the batch carried goes back
        to pending: the counts it held were never reported."""
        now = self.clock()
        item = event_item(now, "outbox_batch_unsendable", {"seq": seq, "reason": reason})
        with self.store.transaction() as conn:
            lost: dict[str, int] = {}
            unreported: dict[str, int] = {}
            for kind, text in conn.execute("SELECT kind, item FROM outbox WHERE batch_seq = ?",
                                           [seq]).fetchall():
                report = _drop_report(kind, text)
                if report is None:
                    lost[kind] = lost.get(kind, 0) + 1
                    continue
                for k, n in report.items():
                    unreported[k] = unreported.get(k, 0) + n
            conn.execute("DELETE FROM outbox WHERE batch_seq = ?", [seq])
            conn.execute("INSERT INTO outbox (kind, priority, item, size, created_at, batch_seq)"
                         " VALUES (?, ?, ?, ?, ?, ?)",
                         [item.kind, item.priority, item.text, item.size, now, seq])
            _count_drops(conn, lost, now)
            conn.executemany(  # counted in total already, when they were dropped
                "INSERT INTO outbox_drops (kind, pending, total, last_at) VALUES (?, ?, 0, ?) "
                "ON CONFLICT (kind) DO UPDATE SET pending = pending + excluded.pending",
                [(k, n, now) for k, n in unreported.items() if n])
        log.error("outbox batch %d cannot be sent (%s); replaced its %s by an event", seq,
                  reason, ", ".join(f"{n} {k}" for k, n in sorted(lost.items())))

    def status(self) -> OutboxStatus:
        return outbox_status(self.store)


def _drop_report(kind: str, text: str) -> dict[str, int] | None:
    """The counts of an ``outbox_dropped`` event row, or None for any other row."""
    if kind != "event":
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("event") != DROPPED_EVENT:
        return None
    detail = doc.get("detail")
    if not isinstance(detail, dict):
        return None
    return {k: int(n) for k, n in detail.items() if k in PRIORITY and isinstance(n, int)}


def outbox_status(store: AgentStore) -> OutboxStatus:
    """Counts of the outbox in ``store`` (works on a stopped agent's database)."""
    with store.reading() as conn:
        meta = conn.execute("SELECT rows, bytes, last_seq, last_receipt_seq, last_receipt_at "
                            "FROM outbox_meta WHERE id = 1").fetchone()
        by_kind = {k: (n, b) for k, n, b in conn.execute(
            "SELECT kind, COUNT(*), COALESCE(SUM(size), 0) FROM outbox GROUP BY kind")}
        unbatched = conn.execute(
            "SELECT COUNT(*) FROM outbox WHERE batch_seq IS NULL").fetchone()[0]
        oldest = conn.execute("SELECT MIN(created_at) FROM outbox").fetchone()[0]
        inflight = tuple(r[0] for r in conn.execute(
            "SELECT seq FROM outbox_batches ORDER BY seq"))
        drops = conn.execute("SELECT kind, total, pending FROM outbox_drops").fetchall()
    return OutboxStatus(
        rows=meta[0], bytes=meta[1], by_kind=by_kind, unbatched_rows=unbatched,
        inflight=inflight, last_seq=meta[2], last_receipt_seq=meta[3], last_receipt_at=meta[4],
        drops_total={k: t for k, t, _ in drops if t},
        drops_unreported={k: p for k, _, p in drops if p}, oldest_created_at=oldest)

