"""Fleet drift: merge a model version's sketches across devices and time, judge every feature
against the bundle's calibrated thresholds, and rank devices and tag values by drift.

Decoding every stored sketch per query cannot be fast (1,000 devices x 24 h of 5-minute windows
is 288,000 windows), so the hub keeps **rollups** per (model version, layout, bucket, device):
the summed slot counts, missing counts, windows and rows, as one little-endian int64 blob laid
out ``[input counts | input missing | output counts | output missing]``. Buckets are aligned
spans of 1, 2, 4, ... 64 hours (:data:`SPANS`), each the sum of its two halves, so any range of
whole hours is a handful of buckets per device (a 25-hour range at most 6, not 25). A query
concatenates the blobs of its buckets, views them as one ``(rows, width)`` matrix and sums each
device's rows with ``np.add.reduceat``.

Rollups are maintained incrementally. Ingestion only marks a bucket dirty (``rollup_dirty``,
an upsert per window); :func:`refresh_rollups` — which every query runs first for its model
version — claims a chunk of marks, recomputes those buckets from the raw windows (decoded many
at a time by ``fleet_protocol.codec.decode_counts_batch``) and writes them, all in one
transaction, with the longer buckets above them. A window arriving days late marks its own old
hour, which is recomputed at the next query. Claiming locks the marks and ingestion's upsert
locks them too, so a window still uncommitted while a refresh runs keeps (or re-creates) its
mark and is rolled up the next time.

Granularity: **hours**. A query covers whole UTC hours: ``since`` is rounded down and ``until``
up to the hour (the result says the range it used), and a window belongs to the hour its
``start`` falls in. The result equals the exact merge of the windows whose start lies in that
range (tests/cloud_hub/test_fleet_drift.py checks it against ``Sketch.from_bytes`` merges).
Only windows sketched under the bundle's layout are merged; windows of other layouts of the same
model version are counted as skipped. Moments are not rolled up: PSI and JS need counts only.

Ranking: a device's (or tag value's) drift score is its worst feature's
``max(psi / psi_limit, js / js_limit)`` at its own row count — above 1 means that feature
drifts on that device alone. Features with fewer rows than the bundle's ``min_evidence`` do not
count; a device with none has no score and ranks last.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cloud_hub.errors import QueryError
from cloud_hub.tables import devices, rollup_dirty, rollups, where_keys
from cloud_hub.tables import windows as windows_table
from cloud_hub.tags import Selector, parse_selector
from fleet_protocol import codec
from fleet_protocol.drift import js_rows, psi_rows
from fleet_protocol.errors import CodecError
from fleet_protocol.layouts import layouts_of
from fleet_protocol.manifest import DriftThresholds, FeatureBaseline
from fleet_protocol.verdict import (
    STATUS_TEXT,
    FeatureVerdict,
    Status,
    format_rate,
    judge_feature,
    verdict_lines,
)

if TYPE_CHECKING:
    from cloud_hub.store import DeviceTags, HubStore

__all__ = ["HOUR", "DeviceDrift", "DeviceMissing", "FleetDrift", "TagDrift", "fleet_drift",
           "format_fleet_drift", "format_time", "refresh_rollups"]

log = logging.getLogger(__name__)

HOUR = 3600
#: dirty buckets claimed per refresh transaction (a writer holds SQLite's lock meanwhile)
REFRESH_CHUNK = 512
#: rollup spans in hours: a bucket of span s starts at an hour (since the epoch) divisible by
#: s, and sums its two halves; any range of whole hours is a few of them (see _cover)
SPANS = (1, 2, 4, 8, 16, 32, 64)
#: how often one feature of a quiet window alarms (PSI or JS past its q=0.995 limit: ~1%)
FEATURE_FALSE_ALARM = 0.01
#: a device whose worst feature is this many times past its limit drifts, whatever the count
STRONG_SCORE = 3.0
_I8 = np.dtype("<i8")
IntMatrix = npt.NDArray[np.int64]


# --- rollups ---------------------------------------------------------------------------------


def _dims(data: bytes) -> tuple[int, int, int]:
    (slots, features, numeric), _ = codec.decode_uvarints(data, 3, codec.HEADER_BYTES, "header")
    return int(slots), int(features), int(numeric)


def _decode_pairs(inputs: Sequence[bytes], outputs: Sequence[bytes],
                  layout: str) -> tuple[IntMatrix, npt.NDArray[np.bool_]]:
    """Rollup vectors of windows of one layout: ``(kept, width)`` and the mask of kept ones.

    Every window of a layout has the same lengths when its device is honest (the fingerprint
    fixes them); the fast path decodes them all at once. Otherwise the lengths most windows
    share win, and the others are dropped and logged (ingestion checked each sketch alone).
    """
    fp_in, fp_out = layout.split("/")
    d_in, d_out = _dims(bytes(inputs[0])), _dims(bytes(outputs[0]))
    try:
        ci, mi = codec.decode_counts_batch(inputs, fp_in, *d_in)
        co, mo = codec.decode_counts_batch(outputs, fp_out, *d_out)
        return np.hstack([ci, mi, co, mo]), np.ones(len(inputs), dtype=np.bool_)
    except CodecError:
        pass
    decoded: list[tuple[Any, IntMatrix] | None] = []
    for i, o in zip(inputs, outputs, strict=True):
        try:
            di, do = _dims(bytes(i)), _dims(bytes(o))
            a = codec.decode_sketch(bytes(i), fp_in, *di)
            b = codec.decode_sketch(bytes(o), fp_out, *do)
            decoded.append(((di, do), np.concatenate([a.counts, a.missing, b.counts,
                                                      b.missing])))
        except CodecError:
            decoded.append(None)
    shapes = Counter(d[0] for d in decoded if d is not None)
    if not shapes:
        return np.zeros((0, 0), dtype=np.int64), np.zeros(len(inputs), dtype=np.bool_)
    best = shapes.most_common(1)[0][0]
    keep = np.array([d is not None and d[0] == best for d in decoded], dtype=np.bool_)
    log.warning("rollup: %d of %d window(s) of layout %s have sketches of other lengths or "
                "do not decode; left out of the drift rollups", int((~keep).sum()),
                len(decoded), layout)
    return np.vstack([d[1] for d in decoded if d is not None and d[0] == best]), keep


def _refresh_chunk(store: HubStore, conn: Connection, model_name: str | None,
                   model_version: str | None, limit: int) -> int:
    rd = rollup_dirty
    pk = [rd.c.model_name, rd.c.model_version, rd.c.layout, rd.c.device_id, rd.c.hour]
    q = sa.select(*pk).order_by(*pk).limit(limit).with_for_update()
    if model_name is not None:
        q = q.where(rd.c.model_name == model_name)
    if model_version is not None:
        q = q.where(rd.c.model_version == model_version)
    marks = [tuple(r) for r in conn.execute(q)]
    if not marks:
        return 0
    conn.execute(_DELETE_MARK, [dict(zip(("m", "v", "lay", "dev", "h"), mark, strict=True))
                                for mark in marks])
    series: dict[tuple[str, str, str, str], set[int]] = defaultdict(set)
    for m, v, lay, dev, hour in marks:
        series[(m, v, lay, dev)].add(int(hour))
    keys = dict(conn.execute(sa.select(devices.c.device_id, devices.c.id).where(
        devices.c.device_id.in_(sorted({s[3] for s in series})))).all())
    batches: dict[str, _Batch] = defaultdict(_Batch)
    for (m, v, lay, dev), hours in series.items():
        lo, hi = min(hours), max(hours)
        found: dict[int, list[Any]] = defaultdict(list)
        for r in conn.execute(_BUCKET_WINDOWS, {"dev": dev, "m": m, "v": v, "lay": lay,
                                                "lo": lo * HOUR, "hi": (hi + 1) * HOUR}).all():
            if int(r.start // HOUR) in hours:
                found[int(r.start // HOUR)].append(r)
        batch = batches[lay]
        for hour in sorted(hours):
            batch.buckets.append((m, v, dev, hour))
            batch.sizes.append(len(found[hour]))
            for r in found[hour]:
                batch.rows.append(int(r.rows))
                batch.inputs.append(r.inputs)
                batch.outputs.append(r.outputs)
    hourly: dict[_Key, _Value | None] = {}
    for lay, batch in batches.items():
        if batch.inputs:
            vectors, keep = _decode_pairs(batch.inputs, batch.outputs, lay)
        else:
            vectors, keep = np.zeros((0, 0), dtype=np.int64), np.zeros(0, dtype=np.bool_)
        rows = np.asarray(batch.rows, dtype=np.int64)
        start = vec = 0
        for (m, v, dev, hour), n in zip(batch.buckets, batch.sizes, strict=True):
            mask = keep[start:start + n]
            k = int(mask.sum())
            hourly[(m, v, lay, hour, keys[dev])] = None if n == 0 else (
                k, int(rows[start:start + n][mask].sum()),
                vectors[vec:vec + k].sum(axis=0).astype(_I8).tobytes() if k else b"", n - k)
            start += n
            vec += k
    _write_level(store, conn, 1, hourly)
    level = hourly
    for span in SPANS[1:]:
        level = _parents(store, conn, span, level)
    return len(marks)


_Key = tuple[str, str, str, int, int]  # model, version, layout, first hour, device key
_Value = tuple[int, int, bytes, int]  # windows, rows, counts blob, dropped windows


def _write_level(store: HubStore, conn: Connection, span: int,
                 values: dict[_Key, _Value | None]) -> None:
    """Upsert the buckets of one span that hold windows; delete the ones that hold none."""
    upserts = [{"model_name": m, "model_version": v, "layout": lay, "span": span, "hour": h,
                "device_key": k, "windows": val[0], "rows": val[1], "counts": val[2],
                "dropped": val[3]}
               for (m, v, lay, h, k), val in sorted(values.items()) if val is not None]
    if upserts:  # executemany of one compiled statement
        stmt = store.insert(rollups)
        conn.execute(stmt.on_conflict_do_update(
            index_elements=["model_name", "model_version", "layout", "span", "hour",
                            "device_key"],
            set_={"windows": stmt.excluded.windows, "rows": stmt.excluded.rows,
                  "counts": stmt.excluded.counts, "dropped": stmt.excluded.dropped}), upserts)
    empty = sorted((m, v, lay, span, h, k) for (m, v, lay, h, k), val in values.items()
                   if val is None)
    if empty:
        conn.execute(_DELETE_ROLLUP, [dict(zip(("m", "v", "lay", "span", "h", "k"), key,
                                              strict=True)) for key in empty])


_ROLLUP_KEY = [rollups.c.model_name, rollups.c.model_version, rollups.c.layout, rollups.c.span,
               rollups.c.hour, rollups.c.device_key]
# statements built once (executed many times: SQLAlchemy compiles each shape once)
_B = sa.bindparam
_DELETE_MARK = sa.delete(rollup_dirty).where(
    rollup_dirty.c.model_name == _B("m"), rollup_dirty.c.model_version == _B("v"),
    rollup_dirty.c.layout == _B("lay"), rollup_dirty.c.device_id == _B("dev"),
    rollup_dirty.c.hour == _B("h"))
_DELETE_ROLLUP = sa.delete(rollups).where(
    *(c == _B(name) for c, name in zip(_ROLLUP_KEY, ("m", "v", "lay", "span", "h", "k"),
                                       strict=True)))
_W = windows_table
_BUCKET_WINDOWS = sa.select(_W.c.start, _W.c.rows, _W.c.inputs, _W.c.outputs).where(
    _W.c.device_id == _B("dev"), _W.c.model_name == _B("m"), _W.c.model_version == _B("v"),
    _W.c.layout == _B("lay"), _W.c.start >= _B("lo"), _W.c.start < _B("hi"))


def _merge(children: list[_Value]) -> _Value | None:
    """The bucket holding ``children`` (None: no child holds anything)."""
    if not children:
        return None
    blobs = [c[2] for c in children if c[0] > 0]
    if len({len(b) for b in blobs}) > 1:  # one device, one layout, two lengths: a liar
        return 0, 0, b"", sum(c[0] + c[3] for c in children)
    counts = b""
    if blobs:
        counts = np.sum([np.frombuffer(b, dtype=_I8) for b in blobs], axis=0,
                        dtype=np.int64).astype(_I8).tobytes()
    return (sum(c[0] for c in children), sum(c[1] for c in children), counts,
            sum(c[3] for c in children))


def _parents(store: HubStore, conn: Connection, span: int,
             changed: dict[_Key, _Value | None]) -> dict[_Key, _Value | None]:
    """Recompute the buckets of ``span`` hours above the ``changed`` ones of ``span // 2``."""
    half = span // 2
    parents = sorted({(m, v, lay, h - h % span, k) for (m, v, lay, h, k) in changed})
    known: dict[_Key, _Value | None] = dict(changed)
    need = sorted({(m, v, lay, half, h + d, k) for (m, v, lay, h, k) in parents
                   for d in (0, half)} - {(m, v, lay, half, h, k) for m, v, lay, h, k in changed})
    r = rollups
    for clause in where_keys(_ROLLUP_KEY, need):
        for row in conn.execute(sa.select(
                r.c.model_name, r.c.model_version, r.c.layout, r.c.hour, r.c.device_key,
                r.c.windows, r.c.rows, r.c.counts, r.c.dropped).where(clause)).all():
            known[(row[0], row[1], row[2], int(row[3]), int(row[4]))] = (
                int(row[5]), int(row[6]), bytes(row[7]), int(row[8]))
    out: dict[_Key, _Value | None] = {}
    for m, v, lay, h, k in parents:
        children = [known.get((m, v, lay, h + d, k)) for d in (0, half)]
        out[(m, v, lay, h, k)] = _merge([c for c in children if c is not None])
    _write_level(store, conn, span, out)
    return out


@dataclass
class _Batch:
    """The windows of the claimed buckets of one layout, bucket after bucket."""

    buckets: list[tuple[str, str, str, int]] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    inputs: list[bytes] = field(default_factory=list)
    outputs: list[bytes] = field(default_factory=list)


def refresh_rollups(store: HubStore, *, model_name: str | None = None,
                    model_version: str | None = None, chunk: int = REFRESH_CHUNK) -> int:
    """Recompute every dirty rollup bucket (of one model version, or all); how many."""
    t0 = time.perf_counter()
    total = 0
    while True:
        n = store.run_write(
            lambda conn: _refresh_chunk(store, conn, model_name, model_version, chunk),
            what="refreshing drift rollups")
        total += n
        if n < chunk:
            break
    if total:
        log.info("rollups refreshed buckets=%d model=%s version=%s ms=%.1f", total,
                 model_name or "*", model_version or "*", (time.perf_counter() - t0) * 1000)
    return total


# --- the query -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceDrift:
    """One device's drift: its worst feature at its own row count (score None: too few rows)."""

    device_id: str
    windows: int
    rows: int
    score: float | None
    feature: str | None
    psi: float | None
    psi_threshold: float | None
    js: float | None
    js_threshold: float | None
    #: "drift" when more of its features drift than chance explains (:func:`chance_limit`)
    status: Status
    #: every feature (and output) drifting on this device alone, worst first
    drifted: tuple[str, ...]
    #: features with enough rows to judge
    judged: int
    tags: dict[str, str]


@dataclass(frozen=True)
class DeviceMissing:
    """A device whose inputs had no value in some rows: its feature missing most often.

    Drift is judged on the values a feature had, so a sensor that stopped sending shows here,
    not as drift: its feature simply has fewer rows."""

    device_id: str
    feature: str
    #: rows without a value of ``feature``, and of all rows (with a value or not)
    missing: int
    rows: int
    tags: dict[str, str]

    @property
    def rate(self) -> float:
        return self.missing / self.rows if self.rows else 0.0


@dataclass(frozen=True)
class TagDrift:
    """The merged drift of the devices carrying one tag value (``key=value``)."""

    key: str
    value: str
    devices: int
    windows: int
    rows: int
    score: float | None
    feature: str | None
    psi: float | None
    psi_threshold: float | None
    js: float | None
    js_threshold: float | None
    status: Status
    drifted: tuple[str, ...]
    judged: int


@dataclass(frozen=True)
class FleetDrift:
    """A fleet drift query: per-feature verdicts of the merged fleet, and where drift is.

    ``since`` / ``until`` are the whole hours covered: the range asked for, narrowed to the
    hours that hold windows of this model version (see the module docstring);
    ``selected`` devices match the selector, ``reporting`` of them sent windows in range;
    ``devices`` and ``tags`` are the ``top`` of each, most drifted first.
    """

    model_name: str
    model_version: str
    layout: str
    since: float
    until: float
    selector: str
    min_evidence: int
    selected: int
    reporting: int
    windows: int
    rows: int
    skipped_windows: int
    features: tuple[FeatureVerdict, ...]
    outputs: tuple[FeatureVerdict, ...]
    devices: tuple[DeviceDrift, ...]
    tags: tuple[TagDrift, ...]
    #: the ``top`` devices with missing input values, highest missing rate first (none: [])
    missing: tuple[DeviceMissing, ...] = ()

    @property
    def drifted(self) -> list[str]:
        return [v.name for v in self.features + self.outputs if v.drifted]


@dataclass(frozen=True)
class _Feature:
    name: str
    baseline: FeatureBaseline
    slots: slice
    #: where the feature's missing count is in a rollup's row
    missing: int


@dataclass(frozen=True)
class _Scores:
    score: npt.NDArray[np.float64]  # NaN: no feature with enough rows
    ratio: npt.NDArray[np.float64]  # (rows, features); -inf: not enough rows
    worst: npt.NDArray[np.int64]
    psi: npt.NDArray[np.float64]
    psi_thr: npt.NDArray[np.float64]
    js: npt.NDArray[np.float64]
    js_thr: npt.NDArray[np.float64]

    def row(self, i: int, feats: Sequence[_Feature]) -> dict[str, Any]:
        if math.isnan(self.score[i]):
            return {"score": None, "feature": None, "psi": None, "psi_threshold": None,
                    "js": None, "js_threshold": None, "status": "insufficient",
                    "drifted": (), "judged": 0}
        over = np.flatnonzero(self.ratio[i] > 1.0)
        drifted = tuple(feats[f].name for f in over[np.argsort(-self.ratio[i][over])])
        judged = int(np.isfinite(self.ratio[i]).sum())
        drifts = len(drifted) >= chance_limit(judged) or self.score[i] > STRONG_SCORE
        return {"score": float(self.score[i]), "feature": feats[self.worst[i]].name,
                "psi": float(self.psi[i]), "psi_threshold": float(self.psi_thr[i]),
                "js": float(self.js[i]), "js_threshold": float(self.js_thr[i]),
                "status": "drift" if drifts else "ok", "drifted": drifted, "judged": judged}


@functools.lru_cache(maxsize=1024)
def chance_limit(judged: int, rate: float = FEATURE_FALSE_ALARM, alpha: float = 0.01) -> int:
    """The fewest drifting features, of ``judged``, that chance explains at most ``alpha`` of
    the time when each feature alarms falsely at ``rate`` (independently: a binomial tail).

    Every feature's limits are calibrated so that a window from the training distribution
    alarms about 1% of the time; judged together, 66 features of a quiet device show at least
    one alarm about half the time. So a device (or tag value) drifts when more of its features
    drift than that (or its worst feature is far past its limit, :data:`STRONG_SCORE`).
    """
    tail = 1.0
    for k in range(judged + 1):
        if tail <= alpha * (1 + 1e-9):  # rounding: P(X >= 1) of one feature is exactly alpha
            return max(k, 1)
        tail -= math.comb(judged, k) * rate**k * (1.0 - rate) ** (judged - k)
    return judged + 1


def _thresholds(thresholds: DriftThresholds, n: npt.NDArray[np.float64],
                stat: str) -> npt.NDArray[np.float64]:
    """fleet_protocol.verdict.threshold_at for many row counts at once."""
    sizes = np.log(np.asarray(thresholds.window_sizes, dtype=np.float64))
    logv = np.log(np.maximum(np.asarray(getattr(thresholds, stat), dtype=np.float64), 1e-12))
    return np.exp(np.interp(np.log(np.maximum(n, 1.0)), sizes, logv))


def _score(counts: IntMatrix, feats: Sequence[_Feature], min_evidence: int) -> _Scores:
    """Each row's worst feature by max(psi / limit, js / limit), vectorised over rows."""
    g = counts.shape[0]
    shape = (g, len(feats))
    ratio = np.full(shape, -np.inf)
    psi, js, psi_thr, js_thr = (np.zeros(shape) for _ in range(4))
    for f, feat in enumerate(feats):
        expected = np.asarray(feat.baseline.counts, dtype=np.float64)
        actual = counts[:, feat.slots].astype(np.float64)
        n = actual.sum(axis=1)
        ok = n >= max(min_evidence, 1)
        if not ok.any() or not expected.sum() > 0:
            continue
        p = psi_rows(expected[None, :], actual[ok])
        j = js_rows(expected[None, :], actual[ok])
        pt = _thresholds(feat.baseline.thresholds, n[ok], "psi")
        jt = _thresholds(feat.baseline.thresholds, n[ok], "js")
        psi[ok, f], js[ok, f], psi_thr[ok, f], js_thr[ok, f] = p, j, pt, jt
        ratio[ok, f] = np.maximum(p / pt, j / jt)
    worst = np.argmax(ratio, axis=1) if len(feats) else np.zeros(g, dtype=np.int64)
    rows = np.arange(g)
    best = ratio[rows, worst]
    return _Scores(np.where(np.isfinite(best), best, np.nan), ratio, worst, psi[rows, worst],
                   psi_thr[rows, worst], js[rows, worst], js_thr[rows, worst])


def _ranked(scores: npt.NDArray[np.float64], top: int) -> list[int]:
    """Indices by score, highest first, rows without a score last."""
    order = np.lexsort((-np.nan_to_num(scores, nan=-np.inf), np.isnan(scores)))
    return [int(i) for i in order[:top]]


def _cover(h0: int, h1: int) -> list[tuple[int, int]]:
    """Hours [h0, h1) as the fewest rollup buckets: (span, first hour) pairs, greedily."""
    out = []
    h = h0
    while h < h1:
        span = next(s for s in reversed(SPANS) if h % s == 0 and h + s <= h1)
        out.append((span, h))
        h += span
    return out


def _hours(since: float, until: float) -> tuple[int, int]:
    for name, v in (("since", since), ("until", until)):
        if not math.isfinite(v) or v < 0:
            raise QueryError(f"{name} {v!r} is not a time (seconds since the epoch, >= 0)")
    if not until > since:
        raise QueryError(f"until {until} must be after since {since}")
    return math.floor(since / HOUR), math.ceil(until / HOUR)


def fleet_drift(store: HubStore, *, model_name: str, model_version: str, since: float,
                until: float, selector: str | Selector | None = None,
                top: int = 10) -> FleetDrift:
    """Merge the drift sketches of ``model_name`` ``model_version`` over the devices
    ``selector`` matches and the hours of [since, until); judge and rank (module docstring).

    BundleNotFound when the bundle was never added to the hub (its thresholds are needed).
    """
    if top < 1:
        raise QueryError(f"top {top} must be at least 1")
    h0, h1 = _hours(since, until)
    sel = parse_selector(selector)
    manifest = store.bundle(model_name, model_version)
    lay_in, lay_out = layouts_of(manifest)
    layout = f"{lay_in.fingerprint()}/{lay_out.fingerprint()}"
    base_out = lay_in.total_slots + lay_in.n_features
    feats = [_Feature(b.name, b, lay_in.slots(j), lay_in.total_slots + j)
             for j, b in enumerate(manifest.baseline.features)]
    n_inputs = len(feats)
    for j, b in enumerate(manifest.baseline.outputs):
        s = lay_out.slots(j)
        feats.append(_Feature(b.name, b, slice(base_out + s.start, base_out + s.stop),
                              base_out + lay_out.total_slots + j))
    width = base_out + lay_out.total_slots + lay_out.n_features
    min_evidence = manifest.baseline.min_evidence

    store.refresh_rollups(model_name, model_version)
    chosen = {k: d for k, d in store.device_tags().items() if sel.matches(d.tags)}
    r = rollups
    series = (r.c.model_name == model_name, r.c.model_version == model_version)

    def fetch(conn: Connection) -> tuple[list[Any], list[Any], int, int]:
        # only the hours that hold data: "since the epoch" must not mean 490,000 hours
        lo, hi = conn.execute(sa.select(sa.func.min(r.c.hour), sa.func.max(r.c.hour)).where(
            *series, r.c.span == 1, r.c.hour >= h0, r.c.hour < h1)).one()
        if lo is None:
            return [], [], h0, h1
        mine: list[Any] = []
        for span, hour in _cover(int(lo), int(hi) + 1):  # one b-tree range each
            mine += conn.execute(sa.select(r.c.device_key, r.c.windows, r.c.rows, r.c.counts,
                                           r.c.dropped).where(
                *series, r.c.layout == layout, r.c.span == span, r.c.hour == hour)).all()
        other = conn.execute(sa.select(r.c.device_key, r.c.windows + r.c.dropped).where(
            *series, r.c.layout != layout, r.c.span == 1, r.c.hour >= lo,
            r.c.hour <= hi)).all()
        return mine, list(other), int(lo), int(hi) + 1

    mine, other, h0, h1 = store.run_read(fetch, what=f"reading drift rollups of {model_name} "
                                 f"{model_version}")
    nbytes = width * _I8.itemsize
    skipped = sum(int(w) for k, w in other if k in chosen)
    skipped += sum(int(row[4]) + (int(row[1]) if len(row[3]) != nbytes else 0)
                   for row in mine if row[0] in chosen)
    keep = [row for row in mine if row[0] in chosen and len(row[3]) == nbytes]
    keep.sort(key=lambda row: row[0])
    columns = list(zip(*keep, strict=True)) or [(), (), (), (), ()]
    dev_keys, n_windows, n_rows = (np.asarray(c, dtype=np.int64) for c in columns[:3])
    matrix = np.frombuffer(b"".join(columns[3]), dtype=_I8).reshape(-1, width)
    if len(keep):
        starts = np.flatnonzero(np.r_[True, dev_keys[1:] != dev_keys[:-1]])
        per_device = np.add.reduceat(matrix, starts, axis=0)
        dev_windows = np.add.reduceat(n_windows, starts)
        dev_rows = np.add.reduceat(n_rows, starts)
        reporting = [chosen[int(k)] for k in dev_keys[starts]]
    else:
        per_device = np.zeros((0, width), dtype=np.int64)
        dev_windows = dev_rows = np.zeros(0, dtype=np.int64)
        reporting = []
    total = per_device.sum(axis=0)
    verdicts = tuple(judge_feature(f.baseline, total[f.slots], min_evidence, int(total[f.missing]))
                     for f in feats)

    scores = _score(per_device, feats, min_evidence)
    ranked_devices = tuple(
        DeviceDrift(reporting[i].device_id, int(dev_windows[i]), int(dev_rows[i]),
                    tags=reporting[i].tags, **scores.row(i, feats))
        for i in _ranked(scores.score, top))

    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, d in enumerate(reporting):
        for key, value in d.tags.items():
            groups[(key, value)].append(i)
    # a value every reporting device carries says nothing about where drift comes from
    informative = sorted(g for g, members in groups.items() if len(members) < len(reporting))
    ranked_tags: tuple[TagDrift, ...] = ()
    if informative:
        sums = np.vstack([per_device[groups[g]].sum(axis=0) for g in informative])
        tag_scores = _score(sums, feats, min_evidence)
        ranked_tags = tuple(
            TagDrift(informative[i][0], informative[i][1], len(groups[informative[i]]),
                     int(dev_windows[groups[informative[i]]].sum()),
                     int(dev_rows[groups[informative[i]]].sum()), **tag_scores.row(i, feats))
            for i in _ranked(tag_scores.score, top))
    return FleetDrift(
        model_name=model_name, model_version=model_version, layout=layout,
        since=float(h0 * HOUR), until=float(h1 * HOUR), selector=str(sel),
        min_evidence=min_evidence, selected=len(chosen), reporting=len(reporting),
        windows=int(n_windows.sum()), rows=int(n_rows.sum()), skipped_windows=skipped,
        features=verdicts[:n_inputs], outputs=verdicts[n_inputs:],
        devices=ranked_devices, tags=ranked_tags,
        missing=_most_missing(per_device, feats[:n_inputs], reporting, top))


def _most_missing(per_device: IntMatrix, feats: Sequence[_Feature],
                  reporting: Sequence[DeviceTags], top: int) -> tuple[DeviceMissing, ...]:
    """Each device's input feature with the highest missing rate (ties: the first); the
    ``top`` devices with any, highest rate first (ties: more missing rows, then device id)."""
    if not feats or not len(per_device):
        return ()
    missing = per_device[:, [f.missing for f in feats]]
    present = np.stack([per_device[:, f.slots].sum(axis=1) for f in feats], axis=1)
    total = missing + present
    rate = np.divide(missing, total, out=np.zeros(missing.shape), where=total > 0)
    worst = np.argmax(rate, axis=1)
    rows = np.arange(len(per_device))
    worst_rate, worst_missing = rate[rows, worst], missing[rows, worst]
    ids = np.array([d.device_id for d in reporting])
    order = [int(i) for i in np.lexsort((ids, -worst_missing, -worst_rate))
             if worst_missing[i] > 0]
    return tuple(DeviceMissing(reporting[i].device_id, feats[int(worst[i])].name,
                               int(worst_missing[i]), int(total[i, worst[i]]), reporting[i].tags)
                 for i in order[:top])


# --- the table ---------------------------------------------------------------------------

def _share(drifted: tuple[str, ...], judged: int) -> str:
    return f"{len(drifted)}/{judged}" if judged else "-"


def format_time(ts: float | None) -> str:
    """``2026-01-31 12:00Z`` (UTC), or ``-``."""
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%MZ")


def _num(v: float | None, fmt: str = ".4f") -> str:
    return "-" if v is None else format(v, fmt)


def format_fleet_drift(result: FleetDrift, top: int | None = None) -> str:
    """The fleet drift table: per-feature verdicts, then the devices and tag values that drift
    most (``top`` of each, default all the result holds)."""
    r = result
    devices, tags = r.devices[:top], r.tags[:top]
    lines = [
        f"{r.model_name} {r.model_version}: {r.reporting} of {r.selected} device(s) reporting, "
        f"{r.windows} window(s), {r.rows} rows, {format_time(r.since)} -> {format_time(r.until)}"
        + (f", devices {r.selector}" if r.selector else ""),
        f"min evidence {r.min_evidence} rows; {r.skipped_windows} window(s) of other layouts "
        "skipped",
        *verdict_lines(r.features + r.outputs, rows_width=10),
    ]
    lines += ["", "where it comes from: score = the worst feature's statistic / its limit; a "
              "device drifts when more of its features drift than chance explains, or its score "
              f"is over {STRONG_SCORE:g}",
              f"{'device':<24} {'windows':>7} {'rows':>10} {'score':>7} {'drifting':>8} "
              f"{'worst feature':<16} {'psi':>8} {'js':>8}  verdict"]
    for d in devices:
        lines.append(f"{d.device_id[:24]:<24} {d.windows:>7} {d.rows:>10} "
                     f"{_num(d.score, '.2f'):>7} {_share(d.drifted, d.judged):>8} "
                     f"{(d.feature or '-')[:16]:<16} {_num(d.psi):>8} {_num(d.js):>8}  "
                     f"{STATUS_TEXT[d.status]}")
    if not devices:
        lines.append("(no device reported windows of this model version in this range)")
    if tags:
        lines += ["", f"{'tag':<24} {'devices':>7} {'rows':>10} {'score':>7} {'drifting':>8} "
                  f"{'worst feature':<16} {'psi':>8} {'js':>8}  verdict"]
        for t in tags:
            tag = f"{t.key}={t.value}"
            lines.append(f"{tag[:24]:<24} {t.devices:>7} {t.rows:>10} "
                         f"{_num(t.score, '.2f'):>7} {_share(t.drifted, t.judged):>8} "
                         f"{(t.feature or '-')[:16]:<16} {_num(t.psi):>8} {_num(t.js):>8}  "
                         f"{STATUS_TEXT[t.status]}")
    if r.missing:
        lines += ["", "missing values: devices whose inputs most often had none (drift is judged "
                  "on the values that came; a sensor that stopped shows here)",
                  f"{'device':<24} {'rows':>10} {'feature':<22} {'missing':>8}"]
        lines += [f"{m.device_id[:24]:<24} {m.rows:>10} {m.feature[:22]:<22} "
                  f"{format_rate(m.rate):>8}" for m in r.missing[:top]]
    return "\n".join(lines)
