"""Ingestion: a batch of (topic, payload) from the broker, validated, stored once, receipted.

Two steps. :func:`decode_batch` is pure: each payload goes through
``fleet_protocol.messages.decode_for_topic`` (size before parsing, strict models, protocol
version, the envelope's device equal to the topic's) and every window's two sketches through
``fleet_protocol.codec`` (self-describing header, canonical varints, no trailing bytes). A
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
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cloud_hub import store as tables
from fleet_protocol import codec, topics
from fleet_protocol.errors import CodecError, ProtocolError
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
    decode_for_topic,
    envelope_key,
)

if TYPE_CHECKING:
    from cloud_hub.store import HubStore

__all__ = ["REJECT_KINDS", "IngestResult", "RejectKind", "Rejection", "decode_batch", "ingest"]

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
_CHUNK = 400  # rows per multi-VALUES statement (SQLite allows 32,766 parameters)
_MAX_TOPIC_CHARS = 512
_MAX_REASON_CHARS = 2000
_HOUR = 3600


@dataclass(frozen=True)
class Rejection:
    """A message the hub refused: who sent it (None if the topic names no device), why.

    ``key``: (stream, seq, message_id) of a refused telemetry envelope that still names them
    (see :func:`fleet_protocol.messages.envelope_key`): the hub stores a marker under that key
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


def _header(data: bytes) -> tuple[int, int, int] | None:
    """The three lengths a sketch header declares (None if they do not parse: the single
    decode then says why). Plain Python: a few bytes, called once per sketch."""
    pos, out = codec.HEADER_BYTES, []
    for _ in range(3):
        value = shift = 0
        for _byte in range(9):
            if pos >= len(data):
                return None
            b = data[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        else:
            return None
        out.append(value)
    return out[0], out[1], out[2]


def check_sketch(data: bytes, fingerprint: str) -> None:
    """CodecError unless ``data`` decodes as a sketch of layout ``fingerprint`` by its own
    header (the hub may not know the bundle; the header says the lengths)."""
    dims, _ = codec.decode_uvarints(data, 3, codec.HEADER_BYTES, "header")
    codec.decode_sketch(data, fingerprint, *(int(d) for d in dims))


def bad_sketches(sketches: Sequence[tuple[bytes, str]]) -> dict[int, str]:
    """The sketches among (bytes, layout fingerprint) that :func:`check_sketch` refuses, by
    index, with why. Sketches of one layout and lengths are checked together by
    ``codec.decode_counts_batch`` (a few numpy passes for the whole batch instead of a few per
    sketch); a group that fails is checked one by one to name the culprits."""
    groups: dict[tuple[str, tuple[int, int, int] | None], list[int]] = defaultdict(list)
    for i, (data, fingerprint) in enumerate(sketches):
        groups[(fingerprint, _header(data))].append(i)
    bad: dict[int, str] = {}
    for (fingerprint, dims), members in groups.items():
        if dims is not None:
            try:
                codec.decode_counts_batch([sketches[i][0] for i in members], fingerprint,
                                          *dims)
                continue
            except CodecError:
                pass
        for i in members:
            try:
                check_sketch(sketches[i][0], fingerprint)
            except CodecError as err:
                bad[i] = str(err)
    return bad


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
        return decode_for_topic(topic, payload)
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
    where: list[tuple[int, str]] = []  # (message index, "items.<i>.inputs")
    for m, out in enumerate(outcomes):
        if isinstance(out, TelemetryEnvelope):
            for i, item in enumerate(out.items):
                if isinstance(item, WindowItem):
                    sketches += [(item.inputs, item.input_fingerprint),
                                 (item.outputs, item.output_fingerprint)]
                    where += [(m, f"items.{i}.inputs"), (m, f"items.{i}.outputs")]
    for k, reason in sorted(bad_sketches(sketches).items()):
        m, field_name = where[k]
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


@dataclass(frozen=True)
class _Entry:
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


def _chunks(rows: Sequence[Any], size: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for i in range(0, len(rows), size):
        yield rows[i:i + size]


def _lock_devices(store: HubStore, conn: Connection, ids: list[str],
                  now: float) -> dict[str, _Device]:
    d = tables.devices
    if not ids:
        return {}
    # executemany of one statement: compiled once (multi-VALUES statements built per batch
    # cost more in SQLAlchemy than the database spends on them)
    conn.execute(store.insert(d).on_conflict_do_nothing(index_elements=["device_id"]), [
        {"device_id": i, "first_seen": now, "last_seen": now, "online": False,
         "slots": "{}", "health": "{}", "device_tags": "{}", "operator_tags": "{}",
         "up_to_seq": 0, "max_seq": 0, "messages": 0, "duplicates": 0, "conflicts": 0,
         "refused": 0} for i in ids])
    out: dict[str, _Device] = {}
    for chunk in _chunks(ids):
        rows = conn.execute(sa.select(d.c.device_id, d.c.stream, d.c.up_to_seq, d.c.max_seq,
                                      d.c.state_ts)
                            .where(d.c.device_id.in_(chunk)).order_by(d.c.device_id)
                            .with_for_update())
        for r in rows:
            out[r.device_id] = _Device(r.stream, int(r.up_to_seq), int(r.max_seq), r.state_ts)
    return out


def _load_streams(store: HubStore, conn: Connection, devs: dict[str, _Device],
                  keys: list[tuple[str, str]], now: float) -> None:
    """The stream rows of ``keys`` into ``devs`` (under the devices' row locks); a stream new
    to a device that had others is logged: its database was reset (or two devices share an
    id)."""
    if not keys:
        return
    st = tables.streams
    new = {(r.device_id, r.stream) for r in conn.execute(
        store.insert(st).on_conflict_do_nothing(index_elements=["device_id", "stream"])
        .returning(st.c.device_id, st.c.stream),
        [{"device_id": dev, "stream": stream, "up_to_seq": 0, "max_seq": 0,
          "first_seen": now, "last_seen": now} for dev, stream in keys])}
    for clause in tables.where_keys([st.c.device_id, st.c.stream], keys):
        for r in conn.execute(sa.select(st.c.device_id, st.c.stream, st.c.up_to_seq,
                                        st.c.max_seq).where(clause)):
            devs[r.device_id].streams[r.stream] = _Stream(int(r.up_to_seq), int(r.max_seq))
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


def _store_envelopes(store: HubStore, conn: Connection, entries: list[_Entry],
                     now: float, worker: str) -> set[tuple[str, str, int]]:
    """Insert the envelope rows (first of each key in the batch); the keys that were new."""
    e = tables.envelopes
    rows = [{"device_id": m.device_id, "stream": m.stream, "seq": m.seq,
             "message_id": m.message_id, "sent_at": m.sent_at, "received_at": now,
             "n_items": m.n_items, "agent_version": m.agent_version, "worker": worker,
             "refused": m.refused} for m in entries]
    result = conn.execute(store.insert(e).on_conflict_do_nothing(
        index_elements=["device_id", "stream", "seq"])
        .returning(e.c.device_id, e.c.stream, e.c.seq), rows)
    return {(r.device_id, r.stream, int(r.seq)) for r in result}


def _stored_ids(conn: Connection, keys: list[tuple[str, str, int]]
                ) -> dict[tuple[str, str, int], str]:
    e = tables.envelopes
    out: dict[tuple[str, str, int], str] = {}
    for clause in tables.where_keys([e.c.device_id, e.c.stream, e.c.seq], keys):
        for r in conn.execute(sa.select(e.c.device_id, e.c.stream, e.c.seq, e.c.message_id)
                              .where(clause)).all():
            out[(r.device_id, r.stream, int(r.seq))] = r.message_id
    return out


def _store_items(store: HubStore, conn: Connection, envs: list[TelemetryEnvelope]) -> None:
    win_rows: list[dict[str, Any]] = []
    event_rows: list[dict[str, Any]] = []
    sample_rows: list[dict[str, Any]] = []
    dirty: set[tuple[str, str, str, str, int]] = set()
    for m in envs:
        for item in m.items:
            if isinstance(item, WindowItem):
                win_rows.append({
                    "device_id": m.device_id, "stream": m.stream, "seq": m.seq,
                    "model_name": item.model_name,
                    "model_version": item.model_version, "slot": item.slot,
                    "start": item.start, "end": item.end, "layout": item.layout,
                    "rows": item.rows, "inputs": item.inputs, "outputs": item.outputs,
                    "metrics": tables.dump_json(item.metrics)})
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
    for table, rows in ((tables.windows, win_rows), (tables.events, event_rows),
                        (tables.samples, sample_rows)):
        if rows:
            conn.execute(table.insert(), rows)
    if dirty:
        # ON CONFLICT DO UPDATE, not DO NOTHING: the no-op update locks a mark a concurrent
        # rollup refresh may be claiming, so the refresh cannot drop it while this window is
        # still uncommitted (cloud_hub.fleet_drift). Sorted: every writer locks in one order.
        stmt = store.insert(tables.rollup_dirty)
        conn.execute(stmt.on_conflict_do_update(
            index_elements=["model_name", "model_version", "layout", "device_id", "hour"],
            set_={"hour": stmt.excluded.hour}),
            [{"model_name": a, "model_version": b, "layout": c, "device_id": dev, "hour": h}
             for a, b, c, dev, h in sorted(dirty)])


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


def _greatest(conn: Connection, column: Any, value: Any) -> Any:
    return (sa.func.max(column, value) if conn.dialect.name == "sqlite"
            else sa.func.greatest(column, value))


def _update_devices(conn: Connection, devs: dict[str, _Device], now: float) -> None:
    d = tables.devices
    for dev in devs.values():  # the registry shows the newest stream's progress
        current = dev.streams.get(dev.stream or "")
        if current is not None:
            dev.up_to_seq, dev.max_seq = current.up_to_seq, current.max_seq
    conn.execute(
        d.update().where(d.c.device_id == sa.bindparam("b_device"))
        .values(last_seen=_greatest(conn, d.c.last_seen, sa.bindparam("b_now")),
                stream=sa.bindparam("b_stream"),
                up_to_seq=sa.bindparam("b_up"), max_seq=sa.bindparam("b_max"),
                messages=d.c.messages + sa.bindparam("b_stored"),
                duplicates=d.c.duplicates + sa.bindparam("b_dups"),
                conflicts=d.c.conflicts + sa.bindparam("b_conflicts"),
                refused=d.c.refused + sa.bindparam("b_refused")),
        [{"b_device": i, "b_now": now, "b_stream": v.stream, "b_up": v.up_to_seq,
          "b_max": v.max_seq, "b_stored": v.stored, "b_dups": v.duplicates,
          "b_conflicts": v.conflicts, "b_refused": v.refused}
         for i, v in devs.items()])
    st = tables.streams
    stream_rows = [{"b_device": i, "b_stream": k, "b_up": v.up_to_seq, "b_max": v.max_seq,
                    "b_now": now} for i, dev in devs.items() for k, v in dev.streams.items()]
    if stream_rows:
        conn.execute(
            st.update().where(st.c.device_id == sa.bindparam("b_device"),
                              st.c.stream == sa.bindparam("b_stream"))
            .values(up_to_seq=sa.bindparam("b_up"), max_seq=sa.bindparam("b_max"),
                    last_seen=_greatest(conn, st.c.last_seen, sa.bindparam("b_now"))),
            stream_rows)
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


def _write(store: HubStore, conn: Connection, valid: list[BaseMessage],
           rejected: list[Rejection], now: float, worker: str) -> IngestResult:
    envs = [m for m in valid if isinstance(m, TelemetryEnvelope)]
    entries = _entries(envs, rejected)
    devs = _lock_devices(store, conn, sorted({m.device_id for m in valid}
                                             | {e.device_id for e in entries}), now)
    # in first-seen order: when a batch holds two new streams of a device, the later one shows
    _load_streams(store, conn, devs, list(dict.fromkeys((e.device_id, e.stream)
                                                       for e in entries)), now)
    firsts: dict[tuple[str, str, int], _Entry] = {}
    for m in entries:
        firsts.setdefault(m.key, m)
        devs[m.device_id].streams[m.stream].telemetry = True
    new = _store_envelopes(store, conn, list(firsts.values()), now, worker) if entries \
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
    _store_items(store, conn, [env for k in sorted(new)
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
        _update_devices(conn, devs, now)
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


def ingest(store: HubStore, messages: Sequence[tuple[str, bytes]], *, now: float,
           worker: str = "") -> IngestResult:
    """Validate and store one batch (see the module docstring); HubStoreError only when the
    database fails on every retry (then nothing of the batch is stored: do not ack it)."""
    t0 = time.perf_counter()
    valid, rejected = decode_batch(messages)
    for r in rejected:  # debug: the worker logs rejections with a rate limit (a flood is cheap)
        log.debug("rejected device=%s topic=%r kind=%s size=%d: %s", r.device_id,
                    r.topic[:200], r.kind, r.size, r.reason)
    if not valid and not rejected:
        return IngestResult()
    result = store.run_write(lambda conn: _write(store, conn, valid, rejected, now, worker),
                             what=f"ingesting a batch of {len(messages)} message(s)")
    log.info("ingest worker=%s messages=%d stored=%d duplicates=%d conflicts=%d states=%d "
             "acks=%d rejected=%d devices=%d ms=%.1f", worker or "-", len(messages),
             result.stored, result.duplicates, result.conflicts, result.states, result.acks,
             result.rejected, len(result.receipts), (time.perf_counter() - t0) * 1000)
    return result


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
    return store.run_write(lambda conn: _write(store, conn, [], [rejection], now, worker),
                           what="recording an unstorable message")
