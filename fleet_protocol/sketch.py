"""Drift sketches: the data layout, the accumulator of one window, and its exact merge.

A *layout* freezes, per feature, what is counted: the bin edges of a numeric feature (taken from
training quantiles by the compiler) or the vocabulary of a categorical one. A *sketch* is one
window's counts over that layout plus, per feature, a missing count and mergeable moments.
Sketches of the same layout merge by addition: counts exactly and in any order; moments with
Chan et al.'s parallel formula (count, min and max exactly, mean and M2 up to rounding).

Slots of a numeric feature with edges ``e[0] < ... < e[m-1]`` (``m = len(edges) >= 2``) are
``m + 1``: slot 0 is the underflow, slots ``1..m-1`` the inner bins, slot ``m`` the overflow.
The bin rule of :func:`numeric_slot`, for a value ``x``:

* ``x`` is NaN                      -> -1 (missing; counted in ``Sketch.missing``, not in a slot)
* ``x < e[0]`` (includes -inf)      -> 0 (underflow)
* ``e[i-1] <= x < e[i]``            -> i, for i in 1..m-1 (inner bins are closed on the left)
* ``x == e[m-1]``                   -> m-1 (the last inner bin is closed on both sides, so the
  training maximum, typically the last edge, is not an overflow)
* ``x > e[m-1]`` (includes +inf)    -> m (overflow)

Slots of a categorical feature with categories ``c[0..k-1]`` are ``k + 1``: slot ``i`` counts
``c[i]`` and slot ``k`` counts every other value ("other"). None, NaN and "" are missing.

Moments (``Sketch.moments[j] = count, mean, M2, min, max``) cover the values of numeric features
with ``|x| <= MOMENT_LIMIT`` (1e100) only. ±inf, and absurd finite values beyond the limit, land
in the underflow/overflow slots but not in the moments, so a garbage reading can never overflow
the moments to inf/NaN and poison every merge after it. An empty row is ``0, 0, 0, +inf, -inf``;
categorical rows stay empty.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from fleet_protocol import codec
from fleet_protocol.errors import CodecError, SketchError

FeatureKind = Literal["numeric", "categorical"]
LAYOUT_SCHEMA_VERSION = 1
MOMENT_LIMIT = 1e100
EMPTY_MOMENTS: tuple[float, float, float, float, float] = (0.0, 0.0, 0.0, math.inf, -math.inf)


@dataclass(frozen=True)
class FeatureLayout:
    """What one feature's sketch counts: numeric bin edges or categorical vocabulary."""

    name: str
    kind: FeatureKind
    edges: tuple[float, ...] = ()
    categories: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SketchError(f"feature name must be a non-empty string, got {self.name!r}")
        where = f"feature {self.name!r}"
        if self.kind == "numeric":
            self._check_numeric(where)
        elif self.kind == "categorical":
            self._check_categorical(where)
        else:
            raise SketchError(f"{where}: kind {self.kind!r} is not one of 'numeric', 'categorical'")

    def _check_numeric(self, where: str) -> None:
        if self.categories:
            raise SketchError(
                f"{where}: a numeric feature has no categories, got {self.categories!r}"
            )
        try:
            edges = tuple(float(e) for e in self.edges)
        except (TypeError, ValueError) as err:
            raise SketchError(f"{where}: edges must be numbers, got {self.edges!r}") from err
        if len(edges) < 2:
            raise SketchError(
                f"{where}: numeric edges {edges!r} has {len(edges)} values, expected at least 2"
            )
        for i, e in enumerate(edges):
            if not math.isfinite(e):
                raise SketchError(f"{where}: edge {i} is {e!r}, expected a finite number")
        for i in range(1, len(edges)):
            if not edges[i] > edges[i - 1]:
                raise SketchError(
                    f"{where}: edges must be strictly increasing, but edge {i} = {edges[i]!r} "
                    f"follows {edges[i - 1]!r}"
                )
        object.__setattr__(self, "edges", edges)
        object.__setattr__(self, "categories", ())

    def _check_categorical(self, where: str) -> None:
        if self.edges:
            raise SketchError(f"{where}: a categorical feature has no edges, got {self.edges!r}")
        if isinstance(self.categories, str):
            raise SketchError(
                f"{where}: categories must be a sequence of strings, got the string "
                f"{self.categories!r}"
            )
        cats = tuple(self.categories)
        if not cats:
            raise SketchError(f"{where}: categories is empty, expected at least 1 category")
        seen: set[str] = set()
        for c in cats:
            if not isinstance(c, str) or not c:
                raise SketchError(
                    f"{where}: category {c!r} is not a non-empty string ('' means missing)"
                )
            if c in seen:
                raise SketchError(f"{where}: category {c!r} appears twice, expected unique")
            seen.add(c)
        object.__setattr__(self, "categories", cats)
        object.__setattr__(self, "edges", ())

    @property
    def n_slots(self) -> int:
        """Number of count slots: edges + 1 (numeric) or categories + 1 (categorical)."""
        if self.kind == "numeric":
            return len(self.edges) + 1
        return len(self.categories) + 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form; edges keep full float precision."""
        return {
            "name": self.name,
            "kind": self.kind,
            "edges": list(self.edges),
            "categories": list(self.categories),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureLayout:
        """Inverse of :meth:`to_dict`; SketchError on unknown or missing keys."""
        if not isinstance(d, Mapping):
            raise SketchError(f"feature layout must be a mapping, got {type(d).__name__}")
        unknown = set(d) - {"name", "kind", "edges", "categories"}
        if unknown:
            raise SketchError(f"feature layout has unknown keys {sorted(unknown)}")
        if "name" not in d or "kind" not in d:
            raise SketchError(f"feature layout needs 'name' and 'kind', got keys {sorted(d)}")
        return cls(
            name=d["name"],
            kind=d["kind"],
            edges=tuple(d.get("edges", ())),
            categories=tuple(d.get("categories", ())),
        )


@dataclass(frozen=True)
class SketchLayout:
    """The ordered features of a sketch and where each one's slots start in the flat counts."""

    features: tuple[FeatureLayout, ...]
    _offsets: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _fingerprint: str = field(init=False, repr=False, compare=False)
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        features = tuple(self.features)
        if not features:
            raise SketchError("a sketch layout needs at least one feature, got none")
        index: dict[str, int] = {}
        for j, f in enumerate(features):
            if not isinstance(f, FeatureLayout):
                raise SketchError(f"feature {j} is a {type(f).__name__}, expected FeatureLayout")
            if f.name in index:
                raise SketchError(f"feature name {f.name!r} appears twice, expected unique names")
            index[f.name] = j
        offsets = [0]
        for f in features:
            offsets.append(offsets[-1] + f.n_slots)
        canonical = json.dumps(
            {"v": LAYOUT_SCHEMA_VERSION, "features": [f.to_dict() for f in features]},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,
            allow_nan=False,
        )
        object.__setattr__(self, "features", features)
        object.__setattr__(self, "_offsets", tuple(offsets))
        object.__setattr__(self, "_index", index)
        object.__setattr__(
            self, "_fingerprint", hashlib.sha256(canonical.encode("ascii")).hexdigest()[:16]
        )

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start of each feature's slots in the flat counts array (one entry per feature)."""
        return self._offsets[:-1]

    @property
    def total_slots(self) -> int:
        """Length of the flat counts array."""
        return self._offsets[-1]

    @property
    def n_features(self) -> int:
        """Number of features."""
        return len(self.features)

    @property
    def names(self) -> tuple[str, ...]:
        """Feature names in layout order."""
        return tuple(f.name for f in self.features)

    def slots(self, j: int) -> slice:
        """Slice of feature ``j``'s slots in the flat counts array."""
        return slice(self._offsets[j], self._offsets[j + 1])

    def fingerprint(self) -> str:
        """16 hex characters of sha256 over the canonical JSON; equal layouts, equal prints."""
        return self._fingerprint

    def index(self, name: str) -> int:
        """Position of the feature called ``name``; SketchError if there is none."""
        try:
            return self._index[name]
        except KeyError:
            raise SketchError(
                f"no feature named {name!r} in layout {self._fingerprint}; "
                f"features are {list(self._index)}"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form, including the fingerprint (checked by :meth:`from_dict`)."""
        return {
            "version": LAYOUT_SCHEMA_VERSION,
            "fingerprint": self._fingerprint,
            "features": [f.to_dict() for f in self.features],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SketchLayout:
        """Inverse of :meth:`to_dict`; SketchError on a wrong version or fingerprint."""
        if not isinstance(d, Mapping) or "features" not in d:
            raise SketchError("sketch layout must be a mapping with a 'features' list")
        version = d.get("version", LAYOUT_SCHEMA_VERSION)
        if version != LAYOUT_SCHEMA_VERSION:
            raise SketchError(
                f"sketch layout version {version!r}, this build reads {LAYOUT_SCHEMA_VERSION}"
            )
        feats = d["features"]
        if not isinstance(feats, Sequence) or isinstance(feats, str):
            raise SketchError(f"layout 'features' must be a list, got {type(feats).__name__}")
        layout = cls(tuple(FeatureLayout.from_dict(f) for f in feats))
        stated = d.get("fingerprint")
        if stated is not None and stated != layout.fingerprint():
            raise SketchError(
                f"layout fingerprint {stated!r} does not match its features, which give "
                f"{layout.fingerprint()!r}: the layout was edited or corrupted"
            )
        return layout


def numeric_slot(edges: npt.ArrayLike, values: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Slot of each value under ``edges``, by the bin rule in the module docstring (-1 = NaN)."""
    e = np.asarray(edges, dtype=np.float64)
    x = np.asarray(values, dtype=np.float64)
    slots = np.asarray(np.searchsorted(e, x, side="right"), dtype=np.int64)
    slots[x == e[-1]] = e.size - 1
    slots[np.isnan(x)] = -1
    return slots


def merge_moments(a: npt.ArrayLike, b: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Merge (count, mean, M2, min, max) rows with Chan et al.'s parallel formula.

    ``a`` and ``b`` are one row of 5 or matching stacks of rows ``(k, 5)``. A side with count 0
    is the identity: the other side comes back unchanged (in a new array).
    """
    ma = np.asarray(a, dtype=np.float64)
    mb = np.asarray(b, dtype=np.float64)
    if ma.shape != mb.shape or ma.shape[-1:] != (5,):
        raise SketchError(f"moments of shapes {ma.shape} and {mb.shape} do not merge")
    na, nb = ma[..., 0], mb[..., 0]
    n = na + nb
    delta = mb[..., 1] - ma[..., 1]
    with np.errstate(divide="ignore", invalid="ignore"):  # n == 0 rows are replaced below
        mean = ma[..., 1] + delta * (nb / n)
        m2 = ma[..., 2] + mb[..., 2] + delta * delta * (na * nb / n)
    merged = np.stack(
        [n, mean, m2, np.minimum(ma[..., 3], mb[..., 3]), np.maximum(ma[..., 4], mb[..., 4])],
        axis=-1,
    )
    merged = np.where((na == 0)[..., None], mb, merged)
    return np.where((nb == 0)[..., None], ma, merged)


def _batch_moments(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Moments of a batch of values within the limit (two-pass: mean, then squared deviations)."""
    if x.size == 0:
        return np.array(EMPTY_MOMENTS)
    mean = float(np.mean(x))
    dev = x - mean
    return np.array([float(x.size), mean, float(np.dot(dev, dev)), float(x.min()), float(x.max())])


def _is_missing(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return value == ""
    if isinstance(value, float | np.floating):
        return bool(np.isnan(value))
    return False


class Sketch:
    """Mutable accumulator of one window for one layout.

    ``counts`` (int64, ``total_slots``) holds every feature's slot counts end to end,
    ``missing`` (int64, ``n_features``) the missing count per feature and ``moments``
    (float64, ``(n_features, 5)``) count, mean, M2, min and max of the numeric values within
    ``MOMENT_LIMIT``.
    """

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __init__(
        self,
        layout: SketchLayout,
        counts: npt.ArrayLike,
        missing: npt.ArrayLike,
        moments: npt.ArrayLike,
    ) -> None:
        self.layout = layout
        self.counts: npt.NDArray[np.int64] = np.array(counts, dtype=np.int64)
        self.missing: npt.NDArray[np.int64] = np.array(missing, dtype=np.int64)
        self.moments: npt.NDArray[np.float64] = np.array(moments, dtype=np.float64)
        want = {
            "counts": (layout.total_slots,),
            "missing": (layout.n_features,),
            "moments": (layout.n_features, 5),
        }
        for name, shape in want.items():
            got = getattr(self, name).shape
            if got != shape:
                raise SketchError(
                    f"sketch {name} has shape {got}, layout {layout.fingerprint()} needs {shape}"
                )
        if self.counts.min() < 0 or self.missing.min() < 0:
            raise SketchError(
                f"sketch counts must be non-negative, got min count {self.counts.min()} and "
                f"min missing {self.missing.min()}"
            )

    @classmethod
    def empty(cls, layout: SketchLayout) -> Sketch:
        """A sketch with nothing counted yet."""
        return cls(
            layout,
            np.zeros(layout.total_slots, dtype=np.int64),
            np.zeros(layout.n_features, dtype=np.int64),
            np.tile(np.array(EMPTY_MOMENTS), (layout.n_features, 1)),
        )

    def _feature(self, j: int, kind: FeatureKind | None = None) -> FeatureLayout:
        if not 0 <= j < self.layout.n_features:
            raise SketchError(
                f"feature index {j} is out of range, layout has {self.layout.n_features} features"
            )
        f = self.layout.features[j]
        if kind is not None and f.kind != kind:
            raise SketchError(f"feature {f.name!r} (index {j}) is {f.kind}, not {kind}")
        return f

    def update(self, j: int, values: Sequence[Any] | npt.ArrayLike) -> None:
        """Count a batch of raw values of feature ``j``, numeric or categorical by its layout."""
        if self._feature(j).kind == "numeric":
            self.update_numeric(j, np.asarray(values))
        else:
            self.update_categorical(j, values)  # type: ignore[arg-type]

    def update_numeric(self, j: int, values: npt.ArrayLike) -> None:
        """Count a batch of values of numeric feature ``j`` (reference implementation)."""
        f = self._feature(j, "numeric")
        try:
            x = np.asarray(values, dtype=np.float64).ravel()
        except (TypeError, ValueError) as err:
            raise SketchError(f"feature {f.name!r}: values are not numbers ({err})") from err
        if x.size == 0:
            return
        slots = numeric_slot(np.asarray(f.edges), x)
        present = slots >= 0
        self.missing[j] += x.size - int(np.count_nonzero(present))
        self.counts[self.layout.slots(j)] += np.bincount(slots[present], minlength=f.n_slots)
        batch = _batch_moments(x[np.abs(x) <= MOMENT_LIMIT])
        self.moments[j] = merge_moments(self.moments[j], batch)

    def category_codes(self, j: int, values: Iterable[Any]) -> npt.NDArray[np.int64]:
        """Codes of categorical values: -1 missing, i for ``categories[i]``, k for other.

        None, NaN and "" are missing; other non-string values are matched by ``str(value)``.
        """
        f = self._feature(j, "categorical")
        lookup = {c: i for i, c in enumerate(f.categories)}
        other = len(f.categories)
        codes = [
            -1 if _is_missing(v) else lookup.get(v if isinstance(v, str) else str(v), other)
            for v in values
        ]
        return np.array(codes, dtype=np.int64)

    def update_categorical(self, j: int, values: Sequence[Any] | npt.NDArray[Any]) -> None:
        """Count a batch of values of categorical feature ``j`` (see :meth:`category_codes`)."""
        self.update_codes(j, self.category_codes(j, values))

    def update_codes(self, j: int, codes: npt.ArrayLike) -> None:
        """Count pre-mapped codes of categorical feature ``j``: -1 missing, 0..k-1, k other."""
        f = self._feature(j, "categorical")
        c = np.asarray(codes).ravel()
        if c.size == 0:
            return
        if not np.issubdtype(c.dtype, np.integer):
            raise SketchError(f"feature {f.name!r}: codes must be integers, got {c.dtype}")
        lo, hi = int(c.min()), int(c.max())
        if lo < -1 or hi > len(f.categories):
            raise SketchError(
                f"feature {f.name!r}: codes span [{lo}, {hi}], expected -1..{len(f.categories)}"
            )
        present = c >= 0
        self.missing[j] += c.size - int(np.count_nonzero(present))
        self.counts[self.layout.slots(j)] += np.bincount(c[present], minlength=f.n_slots)

    def feature_counts(self, j: int) -> npt.NDArray[np.int64]:
        """View of feature ``j``'s slot counts (missing excluded)."""
        return self.counts[self.layout.slots(j)]

    def n_rows(self, j: int) -> int:
        """Rows observed for feature ``j``, missing included."""
        return int(self.feature_counts(j).sum()) + int(self.missing[j])

    def _check_same_layout(self, other: object) -> Sketch:
        if not isinstance(other, Sketch):
            raise SketchError(f"cannot merge a Sketch with a {type(other).__name__}")
        mine, theirs = self.layout.fingerprint(), other.layout.fingerprint()
        if mine != theirs:
            raise SketchError(
                f"cannot merge sketches of different layouts: {mine} and {theirs}; "
                "sketches merge only within one model version's layout"
            )
        return other

    def merge(self, other: Sketch) -> Sketch:
        """A new sketch counting both windows; SketchError if the layouts differ."""
        out = self.copy()
        out += other
        return out

    def __iadd__(self, other: Sketch) -> Sketch:
        other = self._check_same_layout(other)
        self.counts += other.counts
        self.missing += other.missing
        self.moments = merge_moments(self.moments, other.moments)
        return self

    def copy(self) -> Sketch:
        """An independent copy."""
        return Sketch(self.layout, self.counts, self.missing, self.moments)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sketch):
            return NotImplemented
        return (
            self.layout.fingerprint() == other.layout.fingerprint()
            and np.array_equal(self.counts, other.counts)
            and np.array_equal(self.missing, other.missing)
            and np.array_equal(self.moments, other.moments)
        )

    def __repr__(self) -> str:
        return (
            f"Sketch(layout={self.layout.fingerprint()}, features={self.layout.n_features}, "
            f"rows={self.n_rows(0)})"
        )

    def check(self) -> None:
        """Raise SketchError unless the moments are consistent with the counts."""
        for j, f in enumerate(self.layout.features):
            n, mean, m2, lo, hi = (float(v) for v in self.moments[j])
            where = f"feature {f.name!r}"
            if f.kind == "categorical" or n == 0:
                if (n, mean, m2, lo, hi) != EMPTY_MOMENTS:
                    raise SketchError(
                        f"{where}: moments {(n, mean, m2, lo, hi)} should be the empty row "
                        f"{EMPTY_MOMENTS}"
                    )
                continue
            present = int(self.feature_counts(j).sum())
            if not (n.is_integer() and 0 < n <= present):
                raise SketchError(
                    f"{where}: moment count {n} is not an integer in 1..{present} (counted rows)"
                )
            if not (math.isfinite(mean) and math.isfinite(m2) and m2 >= 0):
                raise SketchError(f"{where}: mean {mean} / M2 {m2} must be finite, M2 >= 0")
            if not (-MOMENT_LIMIT <= lo <= hi <= MOMENT_LIMIT):
                raise SketchError(
                    f"{where}: min {lo} / max {hi} must lie within ±{MOMENT_LIMIT}, min <= max"
                )

    def to_bytes(self) -> bytes:
        """Deterministic compact bytes (format in ``fleet_protocol.codec``)."""
        numeric = [j for j, f in enumerate(self.layout.features) if f.kind == "numeric"]
        return codec.encode_sketch(
            self.layout.fingerprint(), self.counts, self.missing, self.moments[numeric]
        )

    @classmethod
    def from_bytes(cls, layout: SketchLayout, data: bytes) -> Sketch:
        """Decode bytes from :meth:`to_bytes`; CodecError if they do not fit ``layout``."""
        numeric = [j for j, f in enumerate(layout.features) if f.kind == "numeric"]
        payload = codec.decode_sketch(
            data, layout.fingerprint(), layout.total_slots, layout.n_features, len(numeric)
        )
        moments = np.tile(np.array(EMPTY_MOMENTS), (layout.n_features, 1))
        moments[numeric] = payload.numeric_moments
        sketch = cls(layout, payload.counts, payload.missing, moments)
        try:
            sketch.check()
        except SketchError as err:
            raise CodecError(f"decoded sketch is inconsistent: {err}") from err
        return sketch

    def to_dict(self) -> dict[str, str]:
        """JSON-safe form: the layout fingerprint and base64 of :meth:`to_bytes`."""
        return {
            "layout": self.layout.fingerprint(),
            "data": base64.b64encode(self.to_bytes()).decode("ascii"),
        }

    @classmethod
    def from_dict(cls, layout: SketchLayout, d: Mapping[str, Any]) -> Sketch:
        """Inverse of :meth:`to_dict`; CodecError on bad base64 or bytes."""
        data = d.get("data") if isinstance(d, Mapping) else None
        if not isinstance(data, str):
            raise CodecError("sketch dict needs a base64 string under 'data'")
        try:
            raw = base64.b64decode(data.encode("ascii"), validate=True)
        except (ValueError, UnicodeEncodeError) as err:
            raise CodecError(f"sketch 'data' is not valid base64: {err}") from err
        return cls.from_bytes(layout, raw)
