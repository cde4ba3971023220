"""Ingestion: a batch of (topic, payload) from the broker, validated, stored once, receipted.

Two steps. :func:`decode_batch` is pure: each payload goes through
``fleet_protocol.wire.decode_for_topic`` (size before parsing, strict models, protocol
version, the envelope's device equal to the topic's; a telemetry envelope of windows first
through :mod:`cloud_hub.envelope_fast`, which returns the model's result or leaves the
envelope to the model) and every window's two sketches through
:mod:`cloud_hub.sketch_check` (self-describing header, canonical varints, no trailing bytes). A
message that fails becomes a :class:`Rejection` — counted, logged with its device id, stored in
``rejections`` — never an exception, and never half written: a bad sketch refuses its whole
envelope before anything is written.

Then :func:`ingest` writes the valid messages of the whole batch in one transaction (batching
is what makes ingestion fast), retried on transient errors:

1. every device of the batch gets its registry row (insert if new) and is locked
   (``SELECT ... FOR UPDATE`` in device order on PostgreSQL; SQLite has one writer at a time),
   so two hub workers never interleave the seq bookkeeping of one device; then each of its
   outbox streams in the batch gets its ``streams`` row. A device's seqs run per stream: a
   device whose database is reset starts a new stream at seq 1 (logged: "device database
   reset?"), and the registry shows its newest stream;
2. envelopes go in with ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` the (device, stream,
   seq) that were new; only those get their items (windows, events, samples) stored. A key
   already stored under the same ``message_id`` is a duplicate (a resend): counted, receipted
   again. Under another ``message_id`` it is a conflict — two devices sharing an id — counted,
   logged loudly, kept in ``conflicts``, never stored. A refused envelope that still names its
   key (:data:`MARKED_KINDS`) is stored as a marker: no items, the reason in ``refused``,
   counted per device; its seq counts as delivered (its items are lost, and said so), else the
   device would resend it forever behind the gap;
3. ``up_to_seq`` advances over the contiguous stored seqs of each stream (``max_seq``
   remembers seqs stored past a gap, so an in-order stream costs no extra query); envelopes
   may arrive in any order;
4. windows mark their hourly drift rollup bucket dirty (see :mod:`cloud_hub.fleet_drift`).

The result's ``receipts`` map each (device, stream) that sent telemetry to its ``up_to_seq``,
including streams whose envelopes were all duplicates. A stream whose telemetry in the batch was
only conflicts gets no receipt: the hub stored none of it, and a receipt would let the device
delete it.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, get_args

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cloud_hub import ingest_sql, tables
from cloud_hub.envelope_fast import decode_envelope
from cloud_hub.ingest_sql import IngestSql
from cloud_hub.sketch_check import bad_sketches
from fleet_protocol import topics
from fleet_protocol.errors import ProtocolError
from fleet_protocol.messages import (
    MESSAGE_TYPES,
    Ack,
    BaseMessage,
    EventItem,
    MessageError,
    SampleItem,
    StateMessage,
    TelemetryEnvelope,
    WindowItem,
)
from fleet_protocol.wire import decode_for_topic, envelope_key

if TYPE_CHECKING:
    from cloud_hub.store import HubStore

__all__ = ["REJECT_KINDS", "IngestResult", "PendingIngest", "RejectKind", "Rejection",
           "begin_ingest", "decode_batch", "ingest"]

log = logging.getLogger(__name__)

RejectKind = Literal["topic", "oversized", "malformed", "protocol", "device_id", "invalid",
                     "sketch", "unstorable"]
#: topic: not edgefleet/v1/<device>/<device→hub kind>; oversized: over the size limit;
#: malformed: not JSON/zlib; protocol: another protocol version; device_id: the envelope names
#: another device than its topic; invalid: fails the schema; sketch: a sketch that does not
#: decode; unstorable: valid, but the database refused it every time (see cloud_hub.worker)
REJECT_KINDS: tuple[RejectKind, ...] = get_args(RejectKind)
#: refusals of a telemetry envelope that leave a marker under its key (when it names one):
#: its seq is answered as delivered and its items counted lost, or the device would resend it
#: forever behind a gap. Not "protocol" (a newer agent: upgrade the hub instead of dropping
#: its data) nor "device_id" (an envelope speaking for another device is not trusted at all).
MARKED_KINDS: frozenset[RejectKind] = frozenset({"invalid", "sketch", "unstorable"})
_MAX_TOPIC_CHARS = 512
_MAX_REASON_CHARS = 2000
_HOUR = 3600


@dataclass(frozen=True)
class Rejection:
    """A message the hub refused: who sent it (None if the topic names no device), why.

    ``key``: (stream, seq, message_id) of a refused telemetry envelope that still names them
    (see :func:`fleet_protocol.wire.envelope_key`): the hub stores a marker under that key
    so the device's stream is not stuck at the gap."""

    device_id: str | None
    topic: str
    kind: RejectKind
    reason: str
    size: int
    key: tuple[str, int, str] | None = None


@dataclass(frozen=True)
class IngestResult:
    """What one batch did. ``receipts``: (device, stream) -> up_to_seq to publish on the
    device's receipt topic. ``refused``: refused envelopes kept as markers (items lost)."""

    receipts: dict[tuple[str, str], int] = field(default_factory=dict)
    stored: int = 0
    duplicates: int = 0
    conflicts: int = 0
    refused: int = 0
    states: int = 0
    acks: int = 0
    rejections: tuple[Rejection, ...] = ()

    @property
    def rejected(self) -> int:
        return len(self.rejections)


# --- step 1: decode (pure) -----------------------------------------------------------------


def _classify(err: MessageError) -> RejectKind:
    if err.field == "protocol":
        return "protocol"
    if err.field == "device_id":
        return "device_id"
    if err.field in (None, "(root)"):
        return "oversized" if "allowed" in str(err) and "bytes" in str(err) else "malformed"
    return "invalid"


def _decode_one(topic: str, payload: bytes) -> BaseMessage | Rejection:
    size = len(payload) if isinstance(payload, bytes | bytearray) else -1
    try:
        device, kind = topics.parse(topic)
    except ProtocolError as err:
        return Rejection(None, str(topic)[:_MAX_TOPIC_CHARS], "topic", str(err), size)
    if kind not in topics.DEVICE_KINDS:
        return Rejection(device, topic, "topic", f"topic {topic!r}: {kind!r} messages go from "
                         "the hub to devices; the hub does not ingest them", size)
    limit = MESSAGE_TYPES[kind].MAX_WIRE_BYTES
    if size > limit:  # decode checks it too; checked here to classify it without parsing
        return Rejection(device, topic, "oversized", f"{kind} payload of {size} bytes is over "
                         f"the {limit} bytes allowed; refused unread", size)
    try:
        return decode_for_topic(topic, payload, parsed=(device, kind),
                                fast=decode_envelope if kind == "telemetry" else None)
    except MessageError as err:
        why = _classify(err)
        key = envelope_key(payload) if why in MARKED_KINDS and kind == "telemetry" else None
        return Rejection(device, topic, why, str(err), size, key)


def decode_batch(messages: Sequence[tuple[str, bytes]]
                 ) -> tuple[list[BaseMessage], list[Rejection]]:
    """Split a batch into valid messages and rejections, each in batch order; never raises.

    An envelope with one sketch that does not decode is refused whole.
    """
    outcomes: list[BaseMessage | Rejection] = [_decode_one(t, p) for t, p in messages]
    sketches: list[tuple[bytes, str]] = []
    where: list[tuple[int, int, str]] = []  # (message index, item index, "inputs")
    for m, out in enumerate(outcomes):
        if isinstance(out, TelemetryEnvelope):
            for i, item in enumerate(out.items):
                if isinstance(item, WindowItem):
                    fingerprint_in, _, fingerprint_out = item.layout.partition("/")
                    sketches += [(item.inputs, fingerprint_in), (item.outputs, fingerprint_out)]
                    where += [(m, i, "inputs"), (m, i, "outputs")]
    for k, reason in sorted(bad_sketches(sketches).items()):
        m, i, which = where[k]
        field_name = f"items.{i}.{which}"
        env = outcomes[m]
        if isinstance(env, TelemetryEnvelope):  # else: an earlier sketch refused it already
            topic, payload = messages[m]
            outcomes[m] = Rejection(
                env.device_id, topic, "sketch", f"{field_name}: {reason} (envelope seq "
                f"{env.seq}: refused whole, nothing of it stored)", len(payload),
                (env.stream, env.seq, env.message_id))
    valid = [o for o in outcomes if not isinstance(o, Rejection)]
    return valid, [o for o in outcomes if isinstance(o, Rejection)]


# --- step 2: write (one transaction) -------------------------------------------------------


@dataclass
class _Stream:
    """One (device, outbox stream) row and what the batch changes in it."""

    up_to_seq: int
    max_seq: int
    new_seqs: list[int] = field(default_factory=list)
    telemetry: bool = False
    receipt: bool = False


@dataclass
class _Device:
    """A locked registry row and what the batch changes in it."""

    stream: str | None
    up_to_seq: int
    max_seq: int
    state_ts: float | None
    streams: dict[str, _Stream] = field(default_factory=dict)
    stored: int = 0
    duplicates: int = 0
    conflicts: int = 0
    refused: int = 0
    #: the newest state applied in this batch, and the newest online one (slots, phase...)
    state: StateMessage | None = None
    online_state: StateMessage | None = None


class _Entry(NamedTuple):
    """One envelope row to store: a valid envelope, or a refused one's marker (no items)."""

    device_id: str
    stream: str
    seq: int
    message_id: str
    sent_at: float
    agent_version: str
    n_items: int
    refused: str | None
    envelope: TelemetryEnvelope | None

    @property
    def key(self) -> tuple[str, str, int]:
        return self.device_id, self.stream, self.seq


def _entries(envs: list[TelemetryEnvelope], rejected: list[Rejection]) -> list[_Entry]:
    out = [_Entry(m.device_id, m.stream, m.seq, m.message_id, m.sent_at, m.agent_version,
                  len(m.items), None, m) for m in envs]
    for r in rejected:
        if r.key is not None and r.device_id is not None:
            stream, seq, message_id = r.key
            out.append(_Entry(r.device_id, stream, seq, message_id, 0.0, "", 0,
                              f"{r.kind}: {r.reason}"[:_MAX_REASON_CHARS], None))
    return out


def _lock_devices(sql: IngestSql, conn: Connection, ids: list[str],
                  now: float) -> dict[str, _Device]:
    if not ids:
        return {}
    sql.insert_devices(conn, [(i, now, now, False, "{}", "{}", "{}", "{}", 0, 0, 0, 0, 0, 0)
                              for i in ids])
    return {r[0]: _Device(r[1], int(r[2]), int(r[3]), r[4]) for r in sql.lock_devices(conn, ids)}


def _load_streams(sql: IngestSql, conn: Connection, devs: dict[str, _Device],
                  keys: list[tuple[str, str]], now: float) -> None:
    """The stream rows of ``keys`` into ``devs`` (under the devices' row locks, so no other
    writer adds a stream of these devices meanwhile); a stream new to a device that had others
    is logged: its database was reset (or two devices share an id)."""
    if not keys:
        return
    wanted = set(keys)
    for device_id, stream, up, top in sql.select_streams(conn, sorted({d for d, _ in keys})):
        if (device_id, stream) in wanted:
            devs[device_id].streams[stream] = _Stream(int(up), int(top))
    new = [(d, k) for d, k in keys if k not in devs[d].streams]
    sql.insert_streams(conn, [(d, k, 0, 0, now, now) for d, k in new])
    for device_id, stream in new:
        devs[device_id].streams[stream] = _Stream(0, 0)
    for device_id, stream in sorted(new):
        dev = devs[device_id]
        if dev.stream is not None and dev.stream != stream:
            log.error("device=%s: new outbox stream %s after stream %s (up_to_seq %d): device "
                      "database reset? its seqs start again from 1 under the new stream (two "
                      "devices sharing one id would look the same)", device_id, stream,
                      dev.stream, dev.up_to_seq)
        else:
            log.info("device=%s: first outbox stream %s", device_id, stream)
        dev.stream = stream  # the newest stream is the one the registry shows
        dev.up_to_seq, dev.max_seq = 0, 0


def _store_envelopes(sql: IngestSql, conn: Connection, entries: list[_Entry],
                     now: float, worker: str) -> set[tuple[str, str, int]]:
    """Insert the envelope rows (first of each key in the batch); the keys that were new."""
    return sql.insert_envelopes(conn, [
        (m.device_id, m.stream, m.seq, m.message_id, m.sent_at, now, m.n_items,
         m.agent_version, worker, m.refused) for m in entries])


def _stored_ids(conn: Connection, keys: list[tuple[str, str, int]]
                ) -> dict[tuple[str, str, int], str]:
    e = tables.envelopes
    out: dict[tuple[str, str, int], str] = {}
    for clause in tables.where_keys([e.c.device_id, e.c.stream, e.c.seq], keys):
        for r in conn.execute(sa.select(e.c.device_id, e.c.stream, e.c.seq, e.c.message_id)
                              .where(clause)).all():
            out[(r.device_id, r.stream, int(r.seq))] = r.message_id
    return out


def _store_items(sql: IngestSql, conn: Connection, envs: list[TelemetryEnvelope]) -> None:
    win_rows: list[tuple[Any, ...]] = []
    event_rows: list[dict[str, Any]] = []
    sample_rows: list[dict[str, Any]] = []
    dirty: set[tuple[str, str, str, str, int]] = set()
    for m in envs:
        for item in m.items:
            if isinstance(item, WindowItem):
                win_rows.append((
                    m.device_id, m.stream, m.seq, item.model_name, item.model_version,
                    item.slot, item.start, item.end, item.layout, item.rows, item.inputs,
                    item.outputs, tables.dump_json(item.metrics)))
                dirty.add((item.model_name, item.model_version, item.layout, m.device_id,
                           int(item.start // _HOUR)))
            elif isinstance(item, EventItem):
                event_rows.append({"device_id": m.device_id, "stream": m.stream, "seq": m.seq,
                                   "ts": item.ts, "event": item.event,
                                   "detail": tables.dump_json(item.detail)})
            elif isinstance(item, SampleItem):
                sample_rows.append({"device_id": m.device_id, "stream": m.stream, "seq": m.seq,
                                    "prediction_id": item.prediction_id, "ts": item.ts,
                                    "model_version": item.model_version, "inputs": item.inputs})
    sql.insert_windows(conn, win_rows)
    for table, rows in ((tables.events, event_rows), (tables.samples, sample_rows)):
        if rows:
            conn.execute(table.insert(), rows)
    # ON CONFLICT DO UPDATE, not DO NOTHING: the no-op update locks a mark a concurrent rollup
    # refresh may be claiming, so the refresh cannot drop it while this window is still
    # uncommitted (cloud_hub.fleet_drift). Sorted: every writer locks in one order.
    sql.mark_dirty(conn, sorted(dirty))


def _advance(conn: Connection, device_id: str, stream: str, st: _Stream) -> None:
    """Move up_to_seq over the contiguous stored seqs (and max_seq to the highest stored)."""
    if not st.new_seqs:
        return
    seqs = set(st.new_seqs)
    if st.max_seq > st.up_to_seq and st.up_to_seq + 1 in seqs:
        e = tables.envelopes  # seqs stored earlier beyond a gap this batch may close
        seqs.update(int(s) for s in conn.execute(
            sa.select(e.c.seq).where(e.c.device_id == device_id, e.c.stream == stream,
                                     e.c.seq > st.up_to_seq, e.c.seq <= st.max_seq)).scalars())
    up = st.up_to_seq
    while up + 1 in seqs:
        up += 1
    st.up_to_seq = up
    st.max_seq = max(st.max_seq, max(st.new_seqs))


def _apply_state(dev: _Device, msg: StateMessage) -> bool:
    """Keep the newest state (by its ts; an equal ts is applied: a re-delivered retained one)."""
    if dev.state_ts is not None and msg.ts < dev.state_ts:
        return False
    dev.state_ts = msg.ts
    dev.state = msg
    if msg.online:
        dev.online_state = msg
    return True


def _update_devices(sql: IngestSql, conn: Connection, devs: dict[str, _Device],
                    now: float) -> None:
    d = tables.devices
    for dev in devs.values():  # the registry shows the newest stream's progress
        current = dev.streams.get(dev.stream or "")
        if current is not None:
            dev.up_to_seq, dev.max_seq = current.up_to_seq, current.max_seq
    sql.update_devices(conn, [(now, v.stream, v.up_to_seq, v.max_seq, v.stored, v.duplicates,
                               v.conflicts, v.refused, i) for i, v in devs.items()])
    sql.update_streams(conn, [(v.up_to_seq, v.max_seq, now, i, k)
                              for i, dev in devs.items() for k, v in dev.streams.items()])
    for device_id, dev in devs.items():
        s = dev.state
        if s is None:
            continue
        values: dict[str, Any] = {"online": s.online, "state_ts": s.ts,
                                  "agent_version": s.agent_version}
        full = dev.online_state  # a last will carries no slots, phase, health or tags
        if full is not None:
            values.update(slots=tables.dump_json(full.slots.model_dump(mode="json")),
                          swap_phase=full.swap_phase, health=tables.dump_json(full.health),
                          device_tags=tables.dump_json(full.tags))
        conn.execute(d.update().where(d.c.device_id == device_id).values(**values))


def _write(conn: Connection, valid: list[BaseMessage],
           rejected: list[Rejection], now: float, worker: str) -> IngestResult:
    sql = ingest_sql.for_dialect(conn.dialect.name)
    envs = [m for m in valid if isinstance(m, TelemetryEnvelope)]
    entries = _entries(envs, rejected)
    devs = _lock_devices(sql, conn, sorted({m.device_id for m in valid}
                                             | {e.device_id for e in entries}), now)
    # in first-seen order: when a batch holds two new streams of a device, the later one shows
    _load_streams(sql, conn, devs, list(dict.fromkeys((e.device_id, e.stream)
                                                       for e in entries)), now)
    firsts: dict[tuple[str, str, int], _Entry] = {}
    for m in entries:
        firsts.setdefault(m.key, m)
        devs[m.device_id].streams[m.stream].telemetry = True
    new = _store_envelopes(sql, conn, list(firsts.values()), now, worker) if entries \
        else set()
    stored_ids = {k: firsts[k].message_id for k in new}
    stored_ids.update(_stored_ids(conn, [k for k in firsts if k not in new]))
    counts = {"stored": 0, "duplicates": 0, "conflicts": 0, "refused": 0}
    conflict_rows: list[dict[str, Any]] = []
    taken: set[tuple[str, str, int]] = set()
    for m in entries:
        key = m.key
        dev = devs[m.device_id]
        st = dev.streams[m.stream]
        if key in new and key not in taken:
            taken.add(key)
            if firsts[key].refused is None:
                dev.stored += 1
            else:
                dev.refused += 1
                log.error("REFUSED device=%s stream=%s seq=%d message_id=%s: kept as a marker "
                          "without its items, so the stream goes on (%s)", m.device_id,
                          m.stream, m.seq, m.message_id, (firsts[key].refused or "")[:300])
            st.new_seqs.append(m.seq)
            st.receipt = True
        elif stored_ids.get(key) == m.message_id:
            dev.duplicates += 1
            st.receipt = True
        else:
            dev.conflicts += 1
            conflict_rows.append({"ts": now, "device_id": m.device_id, "stream": m.stream,
                                  "seq": m.seq, "message_id": m.message_id,
                                  "stored_message_id": stored_ids.get(key, "")})
            log.error("CONFLICT device=%s stream=%s seq=%d message_id=%s but the hub stored "
                      "it as message_id=%s: not stored (two devices sharing one id?)",
                      m.device_id, m.stream, m.seq, m.message_id, stored_ids.get(key))
    _store_items(sql, conn, [env for k in sorted(new)
                               if (env := firsts[k].envelope) is not None])
    ack_rows: list[dict[str, Any]] = []
    for msg in valid:
        if isinstance(msg, StateMessage):
            _apply_state(devs[msg.device_id], msg)
        elif isinstance(msg, Ack):
            ack_rows.append({"device_id": msg.device_id, "command_id": msg.command_id,
                             "status": msg.status, "reason": msg.reason, "ts": msg.ts,
                             "received_at": now})
    for device_id, dev in devs.items():
        for stream, st in dev.streams.items():
            _advance(conn, device_id, stream, st)
        counts["stored"] += dev.stored
        counts["duplicates"] += dev.duplicates
        counts["conflicts"] += dev.conflicts
        counts["refused"] += dev.refused
    if devs:
        _update_devices(sql, conn, devs, now)
    if ack_rows:
        conn.execute(tables.acks.insert(), ack_rows)
    if conflict_rows:
        conn.execute(tables.conflicts.insert(), conflict_rows)
    if rejected:
        conn.execute(tables.rejections.insert(), [
            {"ts": now, "device_id": r.device_id, "topic": r.topic[:_MAX_TOPIC_CHARS],
             "kind": r.kind, "reason": r.reason[:_MAX_REASON_CHARS], "size": r.size,
             "worker": worker} for r in rejected])
    return IngestResult(
        receipts={(i, k): st.up_to_seq for i, v in sorted(devs.items())
                  for k, st in sorted(v.streams.items()) if st.telemetry and st.receipt},
        states=sum(isinstance(m, StateMessage) for m in valid),
        acks=len(ack_rows), rejections=tuple(rejected), **counts)


def _log_batch(worker: str, n: int, result: IngestResult, t0: float) -> None:
    log.info("ingest worker=%s messages=%d stored=%d duplicates=%d conflicts=%d states=%d "
             "acks=%d rejected=%d devices=%d ms=%.1f", worker or "-", n, result.stored,
             result.duplicates, result.conflicts, result.states, result.acks, result.rejected,
             len(result.receipts), (time.perf_counter() - t0) * 1000)


def _log_rejected(rejected: list[Rejection]) -> None:
    for r in rejected:  # debug: the worker logs rejections with a rate limit (a flood is cheap)
        log.debug("rejected device=%s topic=%r kind=%s size=%d: %s", r.device_id,
                  r.topic[:200], r.kind, r.size, r.reason)


def ingest(store: HubStore, messages: Sequence[tuple[str, bytes]], *, now: float,
           worker: str = "") -> IngestResult:
    """Validate and store one batch (see the module docstring); HubStoreError only when the
    database fails on every retry (then nothing of the batch is stored: do not ack it)."""
    t0 = time.perf_counter()
    valid, rejected = decode_batch(messages)
    _log_rejected(rejected)
    if not valid and not rejected:
        return IngestResult()
    result = store.run_write(lambda conn: _write(conn, valid, rejected, now, worker),
                             what=f"ingesting a batch of {len(messages)} message(s)")
    _log_batch(worker, len(messages), result, t0)
    return result


class PendingIngest:
    """A batch written in a transaction that is still open: :meth:`commit` it (from any
    thread), or :meth:`rollback`. See :func:`begin_ingest`."""

    def __init__(self, transaction: AbstractContextManager[Connection] | None,
                 result: IngestResult, n: int, worker: str, t0: float) -> None:
        self._transaction = transaction
        self.result, self._n, self._worker, self._t0 = result, n, worker, t0

    def commit(self) -> IngestResult:
        """Commit (the fsync); the database's errors as they come (SQLAlchemy's: nothing of the
        batch is stored then, and it may be tried again from the start)."""
        transaction, self._transaction = self._transaction, None
        if transaction is not None:
            transaction.__exit__(None, None, None)
        _log_batch(self._worker, self._n, self.result, self._t0)
        return self.result

    def rollback(self) -> None:
        transaction, self._transaction = self._transaction, None
        if transaction is not None:
            err = RuntimeError("rolled back")
            transaction.__exit__(type(err), err, None)


def begin_ingest(store: HubStore, messages: Sequence[tuple[str, bytes]], *, now: float,
                 worker: str = "", decoded: tuple[list[BaseMessage], list[Rejection]]
                 ) -> PendingIngest:
    """:func:`ingest` in two steps, for a caller that commits on another thread (the hub
    worker decodes the next batch while this one's fsync runs): ``decoded`` is
    :func:`decode_batch` of ``messages``; the batch is written in a write transaction left
    open, no retries (on an error nothing is written: fall back to :func:`ingest`)."""
    t0 = time.perf_counter()
    valid, rejected = decoded
    _log_rejected(rejected)
    if not valid and not rejected:
        return PendingIngest(None, IngestResult(), len(messages), worker, t0)
    transaction = store.write()
    conn = transaction.__enter__()
    try:
        result = _write(conn, valid, rejected, now, worker)
    except BaseException:
        transaction.__exit__(*sys.exc_info())
        raise
    return PendingIngest(transaction, result, len(messages), worker, t0)


def record_unstorable(store: HubStore, topic: str, payload: bytes, reason: str, *, now: float,
                      worker: str = "") -> IngestResult:
    """Record a message the database refused every time while it took others (see
    cloud_hub.worker): counted as a rejection of kind "unstorable", with a marker for a
    telemetry envelope that still names its stream and seq (so its device's receipts pass it).
    HubStoreError when even that cannot be written (then the database is down: do not ack)."""
    try:
        device, kind = topics.parse(topic)
    except ProtocolError:
        device, kind = None, None
    key = envelope_key(payload) if kind == "telemetry" else None
    size = len(payload) if isinstance(payload, bytes | bytearray) else -1
    rejection = Rejection(device, str(topic)[:_MAX_TOPIC_CHARS], "unstorable",
                          f"the database refused it on every try: {reason}"[:1000], size, key)
    log.error("UNSTORABLE device=%s topic=%.200r size=%d: %s", device, topic, size, reason)
    return store.run_write(lambda conn: _write(conn, [], [rejection], now, worker),
                           what="recording an unstorable message")
