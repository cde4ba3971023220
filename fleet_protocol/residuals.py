"""A mergeable sketch of regression residuals (``truth - prediction``) with relative accuracy.

A regressor's feedback is a stream of signed errors whose scale nobody knows in advance (0.01
for a temperature, 10,000 for a price), so fixed bins would either drown small errors or cut
large ones. This is a DDSketch (Masson, Rim and Lee, VLDB 2019) of the residuals: logarithmic
buckets that give every quantile within a *relative* error ``ALPHA`` of a true value, at any
scale, and that merge exactly by adding counts — across windows, restarts and devices.

Buckets: with ``GAMMA = (1 + ALPHA) / (1 - ALPHA)``, a magnitude ``m = |e|`` above
``MIN_MAGNITUDE`` falls in bucket ``k = ceil(log(m) / log(GAMMA))``, which covers
``(GAMMA**(k-1), GAMMA**k]``; positive and negative residuals keep separate buckets (keyed by
the magnitude's bucket), magnitudes at or below ``MIN_MAGNITUDE`` (a perfect prediction, to
rounding) are counted as zero. A bucket's value is ``2 * GAMMA**k / (GAMMA + 1)``, within
``ALPHA`` of anything in it. ``log`` is libm's: on a value within rounding of a bucket boundary
two platforms may choose neighbouring buckets, which moves an estimate by no more than the
bound allows.

Size is bounded: each sign keeps at most ``MAX_BUCKETS`` buckets; past that the smallest
magnitudes are collapsed into the smallest kept bucket (DDSketch's "collapsing lowest"
store), so the large errors that matter keep their accuracy and only quantiles among the
smallest magnitudes lose it. With ``ALPHA`` = 2% a decade holds ~58 buckets, so that takes
residuals of one sign spanning more than ~8.9 decades: far beyond a real model's errors. A
window's sketch holds at most as many buckets as it had feedback.

Exact besides the buckets: ``count``, ``sum`` (signed: the bias), ``sum_abs`` (MAE) and
``sum_sq`` (RMSE), merged by addition (floats up to rounding).

Wire form (:meth:`ResidualSketch.to_dict`, in a window's metrics JSON)::

    {"version": 1, "alpha": 0.02, "count": 12, "sum": -0.4, "sum_abs": 3.1, "sum_sq": 1.9,
     "zero": 1, "positive": {"-52": 3, "17": 2}, "negative": {"-3": 6}}

:meth:`ResidualSketch.from_dict` checks every key and value and names the bad one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from fleet_protocol.errors import SketchError
from fleet_protocol.sketch import MOMENT_LIMIT

__all__ = ["ALPHA", "GAMMA", "MAX_BUCKETS", "MIN_MAGNITUDE", "RESIDUAL_LIMIT", "ResidualSketch"]

SCHEMA_VERSION = 1
ALPHA = 0.02
GAMMA = (1.0 + ALPHA) / (1.0 - ALPHA)
_LOG_GAMMA = math.log(GAMMA)
MIN_MAGNITUDE = 1e-12
MAX_BUCKETS = 512
#: residuals larger than this are refused (as the input sketches keep such values out of their
#: moments): their squares would overflow the RMSE, and no real model misses by 1e100
RESIDUAL_LIMIT = MOMENT_LIMIT
_KEY_TEXT = re.compile(r"-?(0|[1-9][0-9]{0,5})")
# the bucket of the largest finite float, and of MIN_MAGNITUDE: every key lies between
_MAX_KEY = math.ceil(math.log(1.7976931348623157e308) / _LOG_GAMMA)
_MIN_KEY = math.ceil(math.log(MIN_MAGNITUDE) / _LOG_GAMMA)
_KEYS = ("version", "alpha", "count", "sum", "sum_abs", "sum_sq", "zero", "positive",
         "negative")


def bucket_of(magnitude: float) -> int:
    """The bucket of a magnitude above MIN_MAGNITUDE."""
    return math.ceil(math.log(magnitude) / _LOG_GAMMA)


def bucket_value(key: int) -> float:
    """The value standing for bucket ``key``: within ALPHA of anything it holds."""
    return 2.0 * math.exp(key * _LOG_GAMMA) / (GAMMA + 1.0)


def _collapse(buckets: dict[int, int]) -> None:
    """Fold the smallest keys into the smallest kept one until at most MAX_BUCKETS remain."""
    if len(buckets) <= MAX_BUCKETS:
        return
    keys = sorted(buckets)
    cut = len(keys) - MAX_BUCKETS
    into = keys[cut]
    buckets[into] += sum(buckets.pop(k) for k in keys[:cut])


class ResidualSketch:
    """Residuals ``truth - prediction`` of a regressor; see the module docstring.

    Not thread-safe: one thread adds to a sketch (the agent does under its window lock).
    """

    __slots__ = ("count", "negative", "positive", "sum", "sum_abs", "sum_sq", "zero")
    __hash__ = None  # type: ignore[assignment]  # mutable

    def __init__(self) -> None:
        self.positive: dict[int, int] = {}
        self.negative: dict[int, int] = {}
        self.zero = 0
        self.count = 0
        self.sum = 0.0
        self.sum_abs = 0.0
        self.sum_sq = 0.0

    @classmethod
    def of(cls, residuals: Iterable[float]) -> ResidualSketch:
        """A sketch of these residuals."""
        sketch = cls()
        for e in residuals:
            sketch.add(e)
        return sketch

    def add(self, residual: float) -> None:
        """Count one residual; SketchError (nothing counted) unless it is a finite number
        within RESIDUAL_LIMIT."""
        e = float(residual)
        if not abs(e) <= RESIDUAL_LIMIT:  # False for NaN too
            raise SketchError(f"residual {residual!r} is not a finite number within "
                              f"{RESIDUAL_LIMIT:g}")
        m = abs(e)
        if m <= MIN_MAGNITUDE:
            self.zero += 1
        else:
            buckets = self.positive if e > 0 else self.negative
            k = bucket_of(m)
            buckets[k] = buckets.get(k, 0) + 1
            if len(buckets) > MAX_BUCKETS:
                _collapse(buckets)
        self.count += 1
        self.sum += e
        self.sum_abs += m
        self.sum_sq += e * e

    def merge(self, other: ResidualSketch) -> None:
        """Add ``other`` into this sketch, in place: counts exactly, in any order."""
        if not isinstance(other, ResidualSketch):
            raise SketchError(f"cannot merge a ResidualSketch with a {type(other).__name__}")
        for mine, theirs in ((self.positive, other.positive), (self.negative, other.negative)):
            for k, c in theirs.items():
                mine[k] = mine.get(k, 0) + c
            _collapse(mine)
        self.zero += other.zero
        self.count += other.count
        self.sum += other.sum
        self.sum_abs += other.sum_abs
        self.sum_sq += other.sum_sq

    def __iadd__(self, other: ResidualSketch) -> ResidualSketch:
        self.merge(other)
        return self

    # --- summaries ---------------------------------------------------------------------------

    @property
    def mae(self) -> float | None:
        return self.sum_abs / self.count if self.count else None

    @property
    def rmse(self) -> float | None:
        return math.sqrt(self.sum_sq / self.count) if self.count else None

    @property
    def bias(self) -> float | None:
        """Mean residual: > 0 when the model predicts too low on average."""
        return self.sum / self.count if self.count else None

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile of the signed residuals (the rank-``max(1, ceil(q * count))``
        smallest, numpy's ``inverted_cdf``), within ALPHA relative error; None when empty."""
        order = [(-bucket_value(k), c) for k, c in sorted(self.negative.items(), reverse=True)]
        order.append((0.0, self.zero))
        order += [(bucket_value(k), c) for k, c in sorted(self.positive.items())]
        return self._ranked(q, order)

    def abs_quantile(self, q: float) -> float | None:
        """The ``q`` quantile of the residuals' magnitudes (the absolute errors), within ALPHA
        relative error; None when empty."""
        merged = dict(self.positive)
        for k, c in self.negative.items():
            merged[k] = merged.get(k, 0) + c
        order = [(0.0, self.zero)] + [(bucket_value(k), c) for k, c in sorted(merged.items())]
        return self._ranked(q, order)

    def _ranked(self, q: float, order: list[tuple[float, int]]) -> float | None:
        if not 0.0 <= q <= 1.0:
            raise SketchError(f"quantile {q!r} is outside [0, 1]")
        if not self.count:
            return None
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for value, c in order:
            seen += c
            if seen >= rank:
                return value
        return order[-1][0]  # not reached for a consistent sketch

    def summary(self) -> dict[str, Any]:
        """MAE, RMSE, bias and absolute-error quantiles, for a window's metrics."""
        return {"mae": self.mae, "rmse": self.rmse, "bias": self.bias,
                "abs_error_p50": self.abs_quantile(0.5), "abs_error_p90": self.abs_quantile(0.9),
                "abs_error_p99": self.abs_quantile(0.99)}

    # --- wire form ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (module docstring); bucket keys as decimal strings, sorted."""
        return {
            "version": SCHEMA_VERSION, "alpha": ALPHA, "count": self.count, "sum": self.sum,
            "sum_abs": self.sum_abs, "sum_sq": self.sum_sq, "zero": self.zero,
            "positive": {str(k): self.positive[k] for k in sorted(self.positive)},
            "negative": {str(k): self.negative[k] for k in sorted(self.negative)},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ResidualSketch:
        """Inverse of :meth:`to_dict`; SketchError naming the bad key and value."""
        if not isinstance(d, Mapping):
            raise SketchError(f"residual sketch must be an object, got {type(d).__name__}")
        unknown = sorted(set(d) - set(_KEYS))
        missing = [k for k in _KEYS if k not in d]
        if unknown or missing:
            raise SketchError(f"residual sketch keys: unknown {unknown}, missing {missing}; "
                                  f"expected exactly {list(_KEYS)}")
        if type(d["version"]) is not int or d["version"] != SCHEMA_VERSION:
            raise SketchError(f"residual sketch version {d['version']!r} is not "
                                  f"{SCHEMA_VERSION}")
        if d["alpha"] != ALPHA or isinstance(d["alpha"], bool):
            raise SketchError(f"residual sketch alpha {d['alpha']!r} is not {ALPHA} (a "
                                  "sketch of another accuracy cannot be merged with this one)")
        out = cls()
        out.zero = _count(d["zero"], "zero")
        out.count = _count(d["count"], "count")
        for name in ("sum", "sum_abs", "sum_sq"):
            v = d[name]
            try:
                ok = type(v) in (int, float) and math.isfinite(float(v))
            except OverflowError:  # an int beyond any float
                ok = False
            if not ok:
                raise SketchError(f"residual sketch {name} {v!r:.40} is not a finite number")
            setattr(out, name, float(v))
        if out.sum_abs < 0 or out.sum_sq < 0:
            raise SketchError(f"residual sketch sum_abs {out.sum_abs!r} and sum_sq "
                                  f"{out.sum_sq!r} must be >= 0")
        for name in ("positive", "negative"):
            raw = d[name]
            if not isinstance(raw, Mapping):
                raise SketchError(f"residual sketch {name} must be an object of bucket: "
                                      f"count, got {type(raw).__name__}")
            if len(raw) > MAX_BUCKETS:
                raise SketchError(f"residual sketch {name} has {len(raw)} buckets, at most "
                                      f"{MAX_BUCKETS}")
            buckets: dict[int, int] = getattr(out, name)
            for key, c in raw.items():
                k = _bucket_key(key, name)
                buckets[k] = _count(c, f"{name}[{key!r}]", positive=True)
        total = out.zero + sum(out.positive.values()) + sum(out.negative.values())
        if total != out.count:
            raise SketchError(f"residual sketch count {out.count} is not the sum of its "
                                  f"buckets and zero ({total})")
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ResidualSketch):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"ResidualSketch(count={self.count}, mae={self.mae}, bias={self.bias})"


def _count(v: Any, what: str, positive: bool = False) -> int:
    if type(v) is not int or v < (1 if positive else 0):
        raise SketchError(f"residual sketch {what} {v!r} is not an integer >= "
                              f"{1 if positive else 0}")
    return v


def _bucket_key(key: Any, name: str) -> int:
    if not isinstance(key, str) or not _KEY_TEXT.fullmatch(key) or key == "-0":
        raise SketchError(f"residual sketch {name} key {key!r:.40} is not a canonical integer")
    k = int(key)
    if not _MIN_KEY <= k <= _MAX_KEY:
        raise SketchError(f"residual sketch {name} key {key!r} is outside "
                              f"{_MIN_KEY}..{_MAX_KEY}")
    return k
