"""The hub's tables: one schema in SQLAlchemy Core for SQLite and PostgreSQL.

What the tables hold: ``meta`` (the ``schema_version`` row), ``devices`` (the registry, with
per-device counters, updated under a row lock), ``streams`` (per device and outbox stream:
up_to_seq and max_seq; a device whose database is reset starts a new stream), ``envelopes`` (one
row per stored (device, stream, seq), refused ones as markers without items), ``windows``,
``events``, ``samples``, ``acks``, ``rejections``, ``conflicts``, ``bundles``, and the drift
rollups of :mod:`cloud_hub.fleet_drift` (``rollups``: summed counts per device and aligned span
of hours; ``rollup_dirty``: the hours ingestion changed since). JSON columns hold canonical JSON
text (:func:`dump_json`). :mod:`cloud_hub.store` creates them and owns the connections;
:mod:`cloud_hub.ingest` writes them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Double,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

__all__ = ["SCHEMA_VERSION", "acks", "bundles", "conflicts", "devices", "dump_json",
           "envelopes", "events", "meta", "metadata", "rejections", "rollup_dirty", "rollups",
           "samples", "streams", "where_keys", "windows"]

#: 2: outbox streams (the ``streams`` table; envelopes keyed by (device, stream, seq); refused
#: envelope markers). A version-1 database is refused at open: there was none deployed.
SCHEMA_VERSION = 2

_Id = BigInteger().with_variant(Integer, "sqlite")  # INTEGER PRIMARY KEY is the rowid
_DEVICE = String(128)
_STREAM = String(16)
_TEXT_JSON = Text  # canonical JSON text: portable, and compared byte for byte in tests

metadata = MetaData()

meta = Table(
    "meta", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

devices = Table(
    "devices", metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("device_id", _DEVICE, nullable=False, unique=True),
    Column("first_seen", Double, nullable=False),
    Column("last_seen", Double, nullable=False),
    Column("online", Boolean, nullable=False, default=False),
    Column("state_ts", Double, nullable=True),
    Column("agent_version", String(64), nullable=True),
    Column("slots", _TEXT_JSON, nullable=False, default="{}"),
    Column("swap_phase", String(32), nullable=True),
    Column("health", _TEXT_JSON, nullable=False, default="{}"),
    Column("device_tags", _TEXT_JSON, nullable=False, default="{}"),
    Column("operator_tags", _TEXT_JSON, nullable=False, default="{}"),
    #: the device's newest outbox stream (for display; ``streams`` holds every one)
    Column("stream", _STREAM, nullable=True),
    #: up_to_seq and max_seq of that stream (see ``streams``)
    Column("up_to_seq", BigInteger, nullable=False, default=0),
    Column("max_seq", BigInteger, nullable=False, default=0),
    Column("messages", BigInteger, nullable=False, default=0),
    Column("duplicates", BigInteger, nullable=False, default=0),
    Column("conflicts", BigInteger, nullable=False, default=0),
    #: envelopes refused and kept as markers (their items are lost; see cloud_hub.ingest)
    Column("refused", BigInteger, nullable=False, default=0),
)

#: one row per outbox stream of a device (a new one each time its database is reset)
streams = Table(
    "streams", metadata,
    Column("device_id", _DEVICE, primary_key=True),
    Column("stream", _STREAM, primary_key=True),
    #: highest seq stored with every seq below it (what receipts say)
    Column("up_to_seq", BigInteger, nullable=False, default=0),
    #: highest seq stored at all (above up_to_seq while a gap is open)
    Column("max_seq", BigInteger, nullable=False, default=0),
    Column("first_seen", Double, nullable=False),
    Column("last_seen", Double, nullable=False),
)

envelopes = Table(
    "envelopes", metadata,
    Column("device_id", _DEVICE, primary_key=True),
    Column("stream", _STREAM, primary_key=True),
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("message_id", String(36), nullable=False),
    Column("sent_at", Double, nullable=False),
    Column("received_at", Double, nullable=False),
    Column("n_items", Integer, nullable=False),
    Column("agent_version", String(64), nullable=False),
    Column("worker", String(128), nullable=False, default=""),
    #: why the hub refused this envelope (a marker holding no items), None when stored
    Column("refused", Text, nullable=True),
)

windows = Table(
    "windows", metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("device_id", _DEVICE, nullable=False),
    Column("stream", _STREAM, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("model_name", String(64), nullable=False),
    Column("model_version", String(128), nullable=False),
    Column("slot", String(8), nullable=False),
    Column("start", Double, nullable=False),
    Column("end", Double, nullable=False),
    Column("layout", String(33), nullable=False),
    Column("rows", BigInteger, nullable=False),
    Column("inputs", LargeBinary, nullable=False),
    Column("outputs", LargeBinary, nullable=False),
    Column("metrics", Text, nullable=False),
    Index("ix_windows_model_start", "model_name", "model_version", "start"),
    Index("ix_windows_device_start", "device_id", "start"),
)

events = Table(
    "events", metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("device_id", _DEVICE, nullable=False),
    Column("stream", _STREAM, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("ts", Double, nullable=False),
    Column("event", String(64), nullable=False),
    Column("detail", Text, nullable=False),
    Index("ix_events_device_ts", "device_id", "ts"),
)

samples = Table(
    "samples", metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("device_id", _DEVICE, nullable=False),
    Column("stream", _STREAM, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("prediction_id", String(128), nullable=False),
    Column("ts", Double, nullable=False),
    Column("model_version", String(128), nullable=False),
    Column("inputs", Text, nullable=False),
    Index("ix_samples_device_ts", "device_id", "ts"),
)

acks = Table(
    "acks", metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("device_id", _DEVICE, nullable=False),
    Column("command_id", String(128), nullable=False),
    Column("status", String(32), nullable=False),
    Column("reason", Text, nullable=False),
    Column("ts", Double, nullable=False),
    Column("received_at", Double, nullable=False),
    Index("ix_acks_command", "command_id"),
)

rejections = Table(
    "rejections", metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("ts", Double, nullable=False),
    Column("device_id", _DEVICE, nullable=True),
    Column("topic", Text, nullable=False),
    #: the class of the refusal (cloud_hub.ingest.REJECT_KINDS); ``reason`` says the detail
    Column("kind", String(32), nullable=False),
    Column("reason", Text, nullable=False),
    Column("size", Integer, nullable=False),
    Column("worker", String(128), nullable=False, default=""),
)

conflicts = Table(
    "conflicts", metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("ts", Double, nullable=False),
    Column("device_id", _DEVICE, nullable=False),
    Column("stream", _STREAM, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("message_id", String(36), nullable=False),
    Column("stored_message_id", String(36), nullable=False),
)

bundles = Table(
    "bundles", metadata,
    Column("name", String(64), primary_key=True),
    Column("version", String(128), primary_key=True),
    Column("sha256", String(64), nullable=False),
    Column("manifest", Text, nullable=False),
    Column("layout", String(33), nullable=False),
    Column("signer_key_id", String(16), nullable=False),
    Column("added_at", Double, nullable=False),
)

#: per (model version, layout, span of hours, first hour, device): summed counts as
#: little-endian int64 (see cloud_hub.fleet_drift); keyed in the query's order, so the devices
#: of one bucket are one b-tree range
rollups = Table(
    "rollups", metadata,
    Column("model_name", String(64), primary_key=True),
    Column("model_version", String(128), primary_key=True),
    Column("layout", String(33), primary_key=True),
    Column("span", Integer, primary_key=True, autoincrement=False),
    Column("hour", BigInteger, primary_key=True, autoincrement=False),
    Column("device_key", BigInteger, primary_key=True, autoincrement=False),
    Column("windows", Integer, nullable=False),
    Column("rows", BigInteger, nullable=False),
    Column("counts", LargeBinary, nullable=False),
    #: windows of the bucket left out: their sketches do not have the layout's lengths
    Column("dropped", Integer, nullable=False, default=0),
)

#: buckets whose windows changed since their rollup was computed (ingestion marks them)
rollup_dirty = Table(
    "rollup_dirty", metadata,
    Column("model_name", String(64), primary_key=True),
    Column("model_version", String(128), primary_key=True),
    Column("layout", String(33), primary_key=True),
    Column("device_id", _DEVICE, primary_key=True),
    Column("hour", BigInteger, primary_key=True, autoincrement=False),
    sqlite_with_rowid=False,
)


def where_keys(columns: Sequence[Any], keys: Iterable[tuple[Any, ...]],
               chunk: int = 500) -> Iterator[Any]:
    """WHERE clauses matching rows whose ``columns`` equal one of ``keys``: equality on all
    but the last column and IN on the last, one clause per prefix (and ``chunk`` values).

    Not a row-value ``(a, b) IN ((..), ..)``: SQLite answers that with a full table scan.
    """
    groups: dict[tuple[Any, ...], list[Any]] = {}
    for key in keys:
        groups.setdefault(tuple(key[:-1]), []).append(key[-1])
    for prefix, lasts in sorted(groups.items()):
        for i in range(0, len(lasts), chunk):
            yield sa.and_(*(c == v for c, v in zip(columns[:-1], prefix, strict=True)),
                          columns[-1].in_(lasts[i:i + chunk]))


def dump_json(value: Any) -> str:
    """Canonical JSON text (sorted keys, no spaces) as the tables store it.

    orjson writes the same text ten times faster (the hub stores every window's metrics);
    values it cannot take (integers past 64 bits) go through the standard library.
    """
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode("utf-8")
    except TypeError:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
