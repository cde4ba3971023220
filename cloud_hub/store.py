"""The hub's database: one schema in SQLAlchemy Core for SQLite (default) and PostgreSQL.

``HubStore()`` opens (and creates, with no set-up) a SQLite file; ``HubStore(url)`` opens
PostgreSQL for fleets that outgrow one machine (``postgresql://...`` is read as
``postgresql+psycopg://...``). The schema is created with ``metadata.create_all`` (idempotent,
under an advisory lock on PostgreSQL so workers starting together do not race) and versioned by
the ``schema_version`` row of the ``meta`` table.

SQLite runs in WAL mode with ``synchronous=FULL``: the hub answers each stored batch with a
receipt, and the device deletes those rows on receipt, so a commit must survive a power cut,
not only a crash of the hub (NORMAL may lose the last commits on power loss). The fsync it costs
is paid once per ingested batch. A new database file gets 16 KiB pages (a stored window is
~3 KB). Write transactions begin with ``BEGIN IMMEDIATE`` (a deferred
transaction that upgrades to a writer fails at once with "database is locked" instead of
waiting its ``busy_timeout``); reads begin deferred so they never block a writer.

The tables are defined in :mod:`cloud_hub.tables`, tag selectors in :mod:`cloud_hub.tags`, and
ingestion lives in :mod:`cloud_hub.ingest`; this module creates the schema and owns the
connections and the registry API.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import (
    Table,
    event,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

from cloud_hub.errors import DeviceNotFound, HubStoreError
from cloud_hub.tables import (
    SCHEMA_VERSION,
    bundles,
    devices,
    dump_json,
    meta,
    metadata,
    rejections,
    windows,
)
from cloud_hub.tags import Selector, parse_selector, tag_pair
from fleet_protocol.manifest import BundleManifest, canonical_json, parse_manifest

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from cloud_hub.ingest import IngestResult, PendingIngest, Rejection
    from fleet_protocol.messages import BaseMessage

__all__ = [
    "BundleRecord",
    "DeviceRecord",
    "DeviceTags",
    "HubCounters",
    "HubStore",
    "default_db_path",
    "normalise_url",
    "open_store",
]

log = logging.getLogger(__name__)

BUSY_TIMEOUT_S = 10.0
#: page size of a new SQLite database (see _sqlite_engine)
SQLITE_PAGE_SIZE = 16384
#: the oldest SQLite the hub's SQL runs on: cloud_hub.ingest_sql uses UPDATE ... FROM (3.33)
#: and INSERT ... RETURNING (3.35)
MIN_SQLITE_VERSION = (3, 35, 0)
#: a batch is retried this many times on a transient database error before HubStoreError
WRITE_ATTEMPTS = 5
_ADVISORY_LOCK = 0x0EDF1EE7  # serialises create_all across hub workers on PostgreSQL

# --- records ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceRecord:
    """One device as the registry knows it."""

    key: int
    device_id: str
    first_seen: float
    last_seen: float
    online: bool
    state_ts: float | None
    agent_version: str | None
    slots: dict[str, Any]
    swap_phase: str | None
    health: dict[str, Any]
    device_tags: dict[str, str]
    operator_tags: dict[str, str]
    up_to_seq: int
    max_seq: int
    messages: int
    duplicates: int
    conflicts: int
    #: the newest outbox stream (None before any telemetry); up_to_seq and max_seq are its own
    stream: str | None = None
    #: envelopes refused and marked (their seqs count as delivered, their items are lost)
    refused: int = 0

    @property
    def tags(self) -> dict[str, str]:
        """Device tags with operator tags on top (an operator tag wins on the same key)."""
        return {**self.device_tags, **self.operator_tags}

    def versions(self) -> dict[str, str]:
        """``{"blue": "name 1.2.0", ...}`` for the slots that hold a bundle."""
        return {slot: f"{info['name']} {info['version']}" for slot, info in self.slots.items()
                if isinstance(info, dict)}


@dataclass(frozen=True)
class DeviceTags:
    """A device id and its merged tags (operator tags over device tags)."""

    device_id: str
    tags: dict[str, str]


@dataclass(frozen=True)
class HubCounters:
    """What the hub has counted since its database was created."""

    devices: int
    messages: int
    duplicates: int
    conflicts: int
    rejections: dict[str, int] = field(default_factory=dict)

    @property
    def rejected(self) -> int:
        return sum(self.rejections.values())


@dataclass(frozen=True)
class BundleRecord:
    """A bundle the hub knows (its manifest was verified when it was added)."""

    name: str
    version: str
    sha256: str
    layout: str
    signer_key_id: str
    added_at: float


# --- the store ---------------------------------------------------------------------------


def default_db_path(environ: Mapping[str, str] | None = None) -> Path:
    """``$EDGEFLEET_HUB_DB``, else ``$XDG_DATA_HOME/edgefleet/hub.db`` (~/.local/share)."""
    env = os.environ if environ is None else environ
    if env.get("EDGEFLEET_HUB_DB"):
        return Path(env["EDGEFLEET_HUB_DB"])
    data = Path(env.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return data / "edgefleet" / "hub.db"


def normalise_url(url: str) -> str:
    """The SQLAlchemy URL for ``url``: PostgreSQL goes through psycopg 3."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    if url.startswith(("postgresql+psycopg://", "sqlite:///")):
        return url
    scheme = url.split("://", 1)[0] if "://" in url else url
    raise HubStoreError(f"database URL scheme {scheme!r} is not supported: use "
                        "postgresql://user@host/db, sqlite:///path, or a file path")


T = TypeVar("T")


class HubStore:
    """The hub database. Thread-safe; each call takes a connection from the pool.

    ``HubStore()`` opens the default SQLite file (:func:`default_db_path`), ``path=`` another
    one, ``url`` PostgreSQL (or ``sqlite:///...``). ``clock`` stamps added bundles;
    ``busy_timeout`` is how long a SQLite writer waits for another one before a retry.
    """

    def __init__(self, url: str | None = None, *, path: str | Path | None = None,
                 clock: Callable[[], float] = time.time,
                 busy_timeout: float = BUSY_TIMEOUT_S) -> None:
        if url is not None and path is not None:
            raise HubStoreError("give a database URL or a path, not both")
        self.clock = clock
        if url is None:
            db = Path(path) if path is not None else default_db_path()
            url = f"sqlite:///{db}"
        self.url = normalise_url(url)
        self.dialect = "postgresql" if self.url.startswith("postgresql") else "sqlite"
        if self.dialect == "sqlite":
            db_path = Path(self.url[len("sqlite:///"):])
            _check_sqlite_version(db_path)
            try:
                db_path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise HubStoreError(f"cannot create the folder of hub database {db_path}: "
                                    f"{err.strerror}") from err
            self.engine = _sqlite_engine(self.url, busy_timeout)
        else:
            self.engine = sa.create_engine(self.url, pool_pre_ping=True,
                                           isolation_level="READ COMMITTED")
        self._manifests: dict[tuple[str, str, str], BundleManifest] = {}
        try:
            self._create_schema()
        except SQLAlchemyError as err:
            self.engine.dispose()
            raise HubStoreError(f"cannot open hub database {self.describe()}: "
                                f"{_short(err)}") from err
        except HubStoreError:
            self.engine.dispose()
            raise

    # --- plumbing --------------------------------------------------------------------

    def describe(self) -> str:
        """The URL without its password."""
        return sa.make_url(self.url).render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> HubStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def insert(self, table: Table) -> Any:
        """The dialect's INSERT (it has ``on_conflict_do_nothing`` / ``_do_update``)."""
        return (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(table)

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction (BEGIN IMMEDIATE on SQLite); commits unless it raises."""
        with self.engine.connect() as conn:
            conn.execution_options(hub_write=True)
            with conn.begin():
                yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read transaction: one consistent snapshot, never blocks writers."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def run_write(self, fn: Callable[[Connection], T], *, what: str) -> T:
        """``fn`` in a write transaction, retried on transient errors (locks, deadlocks,
        serialization failures, a dropped connection); HubStoreError after the last try."""
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                with self.write() as conn:
                    return fn(conn)
            except (OperationalError, IntegrityError) as err:
                if attempt == WRITE_ATTEMPTS:
                    raise HubStoreError(
                        f"{what} failed {attempt} times on {self.describe()}: {_short(err)}; "
                        "nothing of it was stored") from err
                log.warning("%s: attempt %d failed (%s); retrying", what, attempt, _short(err))
                time.sleep(random.uniform(0, min(0.02 * 2 ** attempt, 0.5)))
            except SQLAlchemyError as err:
                raise HubStoreError(f"{what} failed on {self.describe()}: {_short(err)}") from err
        raise AssertionError("unreachable")

    def run_read(self, fn: Callable[[Connection], T], *, what: str) -> T:
        try:
            with self.read() as conn:
                return fn(conn)
        except SQLAlchemyError as err:
            raise HubStoreError(f"{what} failed on {self.describe()}: {_short(err)}") from err

    def _create_schema(self) -> None:
        with self.write() as conn:
            if self.dialect == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADVISORY_LOCK})
            metadata.create_all(conn)
            stored = conn.execute(sa.select(meta.c.value)
                                  .where(meta.c.key == "schema_version")).scalar()
            if stored is None:
                conn.execute(meta.insert().values(key="schema_version",
                                                  value=str(SCHEMA_VERSION)))
            elif stored != str(SCHEMA_VERSION):
                raise HubStoreError(
                    f"hub database {self.describe()} has schema version {stored}, this build "
                    f"knows {SCHEMA_VERSION}: upgrade edgefleet (or point the hub at another "
                    "database)")

    # --- ingestion ---------------------------------------------------------------------

    def ingest(self, messages: Sequence[tuple[str, bytes]], *, now: float,
               worker: str = "") -> IngestResult:
        """Validate and store a batch of (topic, payload) in one transaction; see
        :func:`cloud_hub.ingest.ingest`."""
        from cloud_hub.ingest import ingest

        return ingest(self, messages, now=now, worker=worker)

    def decode(self, messages: Sequence[tuple[str, bytes]]
               ) -> tuple[list[BaseMessage], list[Rejection]]:
        """The valid messages and the rejections of a batch, nothing written; see
        :func:`cloud_hub.ingest.decode_batch` and :meth:`begin_ingest`."""
        from cloud_hub.ingest import decode_batch

        return decode_batch(messages)

    def begin_ingest(self, messages: Sequence[tuple[str, bytes]], *, now: float,
                     worker: str = "", decoded: tuple[list[BaseMessage], list[Rejection]]
                     ) -> PendingIngest:
        """:meth:`ingest` with the commit left to the caller (who may make it on another
        thread); see :func:`cloud_hub.ingest.begin_ingest`."""
        from cloud_hub.ingest import begin_ingest

        return begin_ingest(self, messages, now=now, worker=worker, decoded=decoded)

    def record_unstorable(self, topic: str, payload: bytes, reason: str, *, now: float,
                          worker: str = "") -> IngestResult:
        """Count a message the database refused on every try as rejected ("unstorable"); see
        :func:`cloud_hub.ingest.record_unstorable`."""
        from cloud_hub.ingest import record_unstorable

        return record_unstorable(self, topic, payload, reason, now=now, worker=worker)

    def refresh_rollups(self, model_name: str | None = None,
                        model_version: str | None = None) -> int:
        """Recompute the dirty drift rollups (of one model version, or all); the number of
        hour buckets recomputed. :func:`cloud_hub.fleet_drift.fleet_drift` calls it first."""
        from cloud_hub.fleet_drift import refresh_rollups

        return refresh_rollups(self, model_name=model_name, model_version=model_version)

    # --- registry ----------------------------------------------------------------------

    def devices(self, selector: str | Selector | None = None) -> list[DeviceRecord]:
        """Every device the hub has heard from (sorted by id), or those ``selector`` matches."""
        sel = parse_selector(selector)
        rows = self.run_read(lambda c: c.execute(sa.select(devices)
                                                 .order_by(devices.c.device_id)).all(),
                             what="listing devices")
        out = [_device_record(r._mapping) for r in rows]
        return [d for d in out if sel.matches(d.tags)]

    def device_tags(self) -> dict[int, DeviceTags]:
        """Every device's id and merged tags by registry key: what selectors need, read fast
        (a fleet query calls it; the full records cost four JSON decodes a device)."""
        rows = self.run_read(lambda c: c.execute(sa.select(
            devices.c.id, devices.c.device_id, devices.c.device_tags,
            devices.c.operator_tags)).all(), what="reading device tags")
        parsed: dict[str, dict[str, str]] = {}  # fleets share a few tag sets: decode each once

        def tags(text: str) -> dict[str, str]:
            if text not in parsed:
                parsed[text] = json.loads(text)
            return parsed[text]

        return {int(k): DeviceTags(d, {**tags(own), **tags(op)}) for k, d, own, op in rows}

    def device(self, device_id: str) -> DeviceRecord:
        row = self.run_read(lambda c: c.execute(sa.select(devices).where(
            devices.c.device_id == device_id)).first(), what=f"reading device {device_id}")
        if row is None:
            raise DeviceNotFound(f"no device {device_id!r} on this hub; a device is known after "
                                 "its first valid message (see `edgefleet fleet devices`)")
        return _device_record(row._mapping)

    def set_tags(self, device_id: str, tags: Mapping[str, str | None]) -> DeviceRecord:
        """Set operator tags of a device (a value of None removes the tag); the new record."""
        for key, value in tags.items():
            tag_pair(f"{key}={value or ''}", "tag", allow_empty_value=True)

        def update(conn: Connection) -> bool:
            row = conn.execute(sa.select(devices.c.operator_tags).where(
                devices.c.device_id == device_id).with_for_update()).first()
            if row is None:
                return False
            current: dict[str, str] = json.loads(row.operator_tags)
            for key, value in tags.items():
                if value is None:
                    current.pop(key, None)
                else:
                    current[key] = value
            conn.execute(devices.update().where(devices.c.device_id == device_id)
                         .values(operator_tags=dump_json(current)))
            return True

        if not self.run_write(update, what=f"tagging device {device_id}"):
            raise DeviceNotFound(f"no device {device_id!r} on this hub; a device can be tagged "
                                 "after its first valid message")
        return self.device(device_id)

    def counters(self) -> HubCounters:
        """Devices, stored messages, duplicates, conflicts and rejections by kind."""

        def read(conn: Connection) -> HubCounters:
            n, stored, dups, confl = conn.execute(sa.select(
                sa.func.count(), sa.func.coalesce(sa.func.sum(devices.c.messages), 0),
                sa.func.coalesce(sa.func.sum(devices.c.duplicates), 0),
                sa.func.coalesce(sa.func.sum(devices.c.conflicts), 0))).one()
            by_kind = conn.execute(sa.select(rejections.c.kind, sa.func.count())
                                   .group_by(rejections.c.kind)).all()
            return HubCounters(int(n), int(stored), int(dups), int(confl),
                               {str(k): int(c) for k, c in sorted(by_kind)})

        return self.run_read(read, what="reading counters")

    def windows_by_device(self, *, model_name: str | None = None,
                          model_version: str | None = None) -> dict[str, int]:
        """Stored windows per device (of one model, or version)."""
        return self._per_device(sa.func.count(), model_name, model_version)

    def rows_by_device(self, *, model_name: str | None = None,
                       model_version: str | None = None) -> dict[str, int]:
        """Rows (predictions) of the stored windows per device."""
        return self._per_device(sa.func.sum(windows.c.rows), model_name, model_version)

    def _per_device(self, agg: Any, model_name: str | None,
                    model_version: str | None) -> dict[str, int]:
        q = sa.select(windows.c.device_id, agg).group_by(windows.c.device_id)
        if model_name is not None:
            q = q.where(windows.c.model_name == model_name)
        if model_version is not None:
            q = q.where(windows.c.model_version == model_version)
        rows = self.run_read(lambda c: c.execute(q).all(), what="counting windows")
        return {device: int(n) for device, n in rows}

    # --- bundles -----------------------------------------------------------------------

    def add_bundle(self, source: str | Path | BundleManifest, *,
                   trusted_keys: Sequence[Ed25519PublicKey | str | Path] = (),
                   sha256: str | None = None) -> BundleRecord:
        """Add a bundle: a ``.edgebundle`` path (verified against ``trusted_keys``: keys or
        PEM files) or a manifest the caller has verified already (``sha256`` of its bundle
        file if known, else the manifest's own).

        Adding the same bundle again is a no-op; another manifest under the same name and
        version is a BundleConflict. See :func:`cloud_hub.bundles.add_bundle`.
        """
        from cloud_hub.bundles import store_bundle, verify_bundle

        if isinstance(source, BundleManifest):
            digest = sha256 or hashlib.sha256(canonical_json(source)).hexdigest()
            return store_bundle(self, source, sha256=digest)
        verified = verify_bundle(source, trusted_keys)
        return store_bundle(self, verified.manifest, sha256=verified.sha256)

    def bundle(self, name: str, version: str) -> BundleManifest:
        """The manifest of a bundle added to the hub; BundleNotFound if there is none."""
        from cloud_hub.errors import BundleNotFound

        row = self.run_read(lambda c: c.execute(sa.select(bundles.c.sha256, bundles.c.manifest)
                                                .where(bundles.c.name == name,
                                                       bundles.c.version == version)).first(),
                            what=f"reading bundle {name} {version}")
        if row is None:
            known = ", ".join(f"{b.name} {b.version}" for b in self.bundles()) or "none"
            raise BundleNotFound(f"bundle {name} {version} was never added to this hub (known: "
                                 f"{known}); add it with `edgefleet hub add-bundle FILE`")
        cache_key = (name, version, row.sha256)
        manifest = self._manifests.get(cache_key)
        if manifest is None:
            manifest = parse_manifest(row.manifest)
            self._manifests[cache_key] = manifest
        return manifest

    def bundles(self) -> list[BundleRecord]:
        rows = self.run_read(lambda c: c.execute(
            sa.select(bundles.c.name, bundles.c.version, bundles.c.sha256, bundles.c.layout,
                      bundles.c.signer_key_id, bundles.c.added_at)
            .order_by(bundles.c.name, bundles.c.added_at)).all(), what="listing bundles")
        return [BundleRecord(*r) for r in rows]


def open_store(db: str | Path | None = None) -> HubStore:
    """A store from a CLI ``--db`` value: a URL (``postgresql://``, ``sqlite:///``), a file
    path, or None for the default file."""
    if db is None or isinstance(db, Path):
        return HubStore(path=db)
    return HubStore(db) if "://" in db else HubStore(path=Path(db))


def _device_record(r: Any) -> DeviceRecord:
    return DeviceRecord(
        key=int(r["id"]), device_id=r["device_id"], first_seen=r["first_seen"],
        last_seen=r["last_seen"], online=bool(r["online"]), state_ts=r["state_ts"],
        agent_version=r["agent_version"], slots=json.loads(r["slots"]),
        swap_phase=r["swap_phase"], health=json.loads(r["health"]),
        device_tags=json.loads(r["device_tags"]), operator_tags=json.loads(r["operator_tags"]),
        up_to_seq=int(r["up_to_seq"]), max_seq=int(r["max_seq"]), messages=int(r["messages"]),
        duplicates=int(r["duplicates"]), conflicts=int(r["conflicts"]), stream=r["stream"],
        refused=int(r["refused"]),
    )


def _short(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(getattr(err, "orig", None) or err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_sqlite_version(db_path: Path) -> None:
    """HubStoreError naming the SQLite library found and the one needed, before anything is
    written with it (its SQL errors would come only with the first batch ingested)."""
    if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
        needed = ".".join(map(str, MIN_SQLITE_VERSION))
        raise HubStoreError(
            f"hub database {db_path}: this Python's SQLite library is version "
            f"{sqlite3.sqlite_version}, and the hub needs {needed} or newer (UPDATE ... FROM, "
            "INSERT ... RETURNING); use a Python built with a newer SQLite (Debian 12, Ubuntu "
            "22.04 and later have one) or PostgreSQL (--db postgresql://...)")


def _sqlite_engine(url: str, busy_timeout: float) -> Engine:
    # check_same_thread off: the pool hands a connection to one thread at a time, and a hub
    # worker ingests on another thread than the one that opened the store.
    engine = sa.create_engine(url, connect_args={"check_same_thread": False,
                                                 "timeout": busy_timeout})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        # pysqlite's own transaction handling off: SQLAlchemy's begin event below says BEGIN
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        # a new database gets 16 KiB pages (an existing one keeps its own): a stored window
        # is ~3 KB (two sketches and the metrics), so 4 KiB pages held about one row each,
        # and every ingested window cost a page in the WAL, a pwrite and a checkpoint copy
        # (measured: ~10 µs of the hub's CPU per message). Set before the first write.
        cur.execute(f"PRAGMA page_size={SQLITE_PAGE_SIZE}")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("hub_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine
