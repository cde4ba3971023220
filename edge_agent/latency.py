"""A mergeable latency histogram on fixed log-spaced buckets, 1 µs to 100 s.

Every histogram shares the same :attr:`LatencyHistogram.edges`: 81 edges ``10**(i/10)`` µs for
``i = 0..80`` (10 buckets per decade, 1 µs .. 1e8 µs = 100 s), computed in decimal arithmetic
so that every platform gets the same floats. The 82 buckets are closed on the right, like
Prometheus' ``le`` buckets:

* bucket 0: ``[0, 1 µs]`` (the underflow),
* bucket ``i`` for ``i = 1..80``: ``(edges[i-1], edges[i]]``,
* bucket 81: ``(100 s, inf)`` (the overflow).

So bucket ``i``'s upper edge is ``edges[i]`` (inf for the overflow). ``merge`` adds another
histogram in place: counts (int64), ``count`` and ``max`` exactly and in any order; ``sum`` is
a float and merges up to rounding.

Quantiles (:meth:`LatencyHistogram.quantile`) return the *upper edge* of the bucket where the
cumulative count reaches the rank ``r = max(1, ceil(q * count))``, capped at the exact ``max``.
The estimate never underestimates: for the ``r``-th smallest recorded value ``x`` (numpy's
``method="inverted_cdf"``), ``x <= estimate < x * 10**0.1`` when ``1 µs < x <= 100 s``, a
relative error below 25.9%, one-sided. Below 1 µs the estimate is at most 1 µs; above 100 s
it is the maximum. An upper bound is what a latency gate wants: "p99 under 50 ms" never passes
on an underestimate.

Measured cost (2-vCPU x86-64 cloud VM, best and median of timeit repeats on a shared host
under load): ``record`` 0.55-1.1 µs per call; ``record_many`` 36-44 ns per value in batches of
10,000 (a binary search over the 81 edges); ``quantile`` 5-10 µs.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Mapping
from decimal import Decimal, localcontext
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from edge_agent.errors import AgentError

__all__ = ["BUCKETS_PER_DECADE", "N_BUCKETS", "LatencyHistogram"]

BUCKETS_PER_DECADE = 10
_DECADES = 8  # 1 µs .. 1e8 µs (100 s)
N_BUCKETS = BUCKETS_PER_DECADE * _DECADES + 2  # inner buckets + underflow + overflow
SCHEMA_VERSION = 1


def _make_edges() -> tuple[float, ...]:
    """``10**(i/10)`` for i = 0..80, in decimal (libmpdec is the same on every platform)."""
    with localcontext() as ctx:
        ctx.prec = 40
        return tuple(
            float(Decimal(10) ** (Decimal(i) / BUCKETS_PER_DECADE))
            for i in range(BUCKETS_PER_DECADE * _DECADES + 1)
        )


_EDGE_LIST = _make_edges()
_EDGES = np.array(_EDGE_LIST)
_EDGES.setflags(write=False)
# Upper edge of each bucket: the edges, then inf for the overflow.
_UPPER = np.append(_EDGES, math.inf)
_UPPER.setflags(write=False)


class LatencyHistogram:
    """Counts of latencies in microseconds over the shared log-spaced buckets, plus count/sum/max.

    Not thread-safe: one thread records into a histogram; merge finished histograms instead.
    """

    edges: ClassVar[npt.NDArray[np.float64]] = _EDGES
    __slots__ = ("count", "counts", "max", "sum")
    __hash__ = None  # type: ignore[assignment]  # mutable

    def __init__(self) -> None:
        self.counts: npt.NDArray[np.int64] = np.zeros(N_BUCKETS, dtype=np.int64)
        self.count = 0
        self.sum = 0.0
        self.max = 0.0

    @staticmethod
    def bucket_of(us: float) -> int:
        """Index of the bucket that counts a latency of ``us`` microseconds."""
        return bisect_left(_EDGE_LIST, us)

    @staticmethod
    def upper_edge(bucket: int) -> float:
        """Upper edge of ``bucket`` in µs (inf for the overflow)."""
        return float(_UPPER[bucket])

    def record(self, us: float) -> None:
        """Count one latency in microseconds; AgentError unless it is finite and >= 0."""
        try:
            v = float(us)
        except (TypeError, ValueError):
            v = math.nan
        if not 0.0 <= v < math.inf:  # False for NaN too
            raise AgentError(f"latency {us!r} µs is not a finite number >= 0")
        self.counts[bisect_left(_EDGE_LIST, v)] += 1
        self.count += 1
        self.sum += v
        if v > self.max:
            self.max = v

    def record_many(self, us: npt.ArrayLike) -> None:
        """Count a batch of latencies in microseconds; AgentError (nothing counted) on a bad one."""
        x = np.asarray(us, dtype=np.float64).ravel()
        if x.size == 0:
            return
        ok = (x >= 0.0) & (x < math.inf)
        if not ok.all():
            bad = x[~ok][0]
            raise AgentError(
                f"latency {float(bad)!r} µs is not a finite number >= 0; nothing was recorded"
            )
        idx = np.searchsorted(_EDGES, x, side="left")
        self.counts += np.bincount(idx, minlength=N_BUCKETS)
        self.count += int(x.size)
        self.sum += float(x.sum())
        self.max = max(self.max, float(x.max()))

    def quantile(self, q: float) -> float:
        """Upper-edge estimate of the ``q`` quantile in µs (module docstring); NaN when empty."""
        if not 0.0 <= q <= 1.0:
            raise AgentError(f"quantile {q!r} is outside [0, 1]")
        if self.count == 0:
            return math.nan
        rank = max(1, math.ceil(self.count * q))
        bucket = int(np.searchsorted(np.cumsum(self.counts), rank, side="left"))
        return min(float(_UPPER[bucket]), self.max)

    def p50(self) -> float:
        """Estimated median in µs."""
        return self.quantile(0.5)

    def p95(self) -> float:
        """Estimated 95th percentile in µs."""
        return self.quantile(0.95)

    def p99(self) -> float:
        """Estimated 99th percentile in µs."""
        return self.quantile(0.99)

    @property
    def mean(self) -> float:
        """Mean latency in µs (NaN when empty)."""
        return self.sum / self.count if self.count else math.nan

    def merge(self, other: LatencyHistogram) -> None:
        """Add ``other``'s counts into this histogram, in place (``h += other`` does the same)."""
        if not isinstance(other, LatencyHistogram):
            raise AgentError(f"cannot merge a LatencyHistogram with a {type(other).__name__}")
        self.counts += other.counts
        self.count += other.count
        self.sum += other.sum
        self.max = max(self.max, other.max)

    def __iadd__(self, other: LatencyHistogram) -> LatencyHistogram:
        self.merge(other)
        return self

    def copy(self) -> LatencyHistogram:
        """An independent copy."""
        out = LatencyHistogram()
        out.counts[:] = self.counts
        out.count, out.sum, out.max = self.count, self.sum, self.max
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LatencyHistogram):
            return NotImplemented
        return (
            np.array_equal(self.counts, other.counts)
            and (self.count, self.sum, self.max) == (other.count, other.sum, other.max)
        )

    def __repr__(self) -> str:
        return (
            f"LatencyHistogram(count={self.count}, p50={self.p50():.6g}, "
            f"p99={self.p99():.6g}, max={self.max:.6g})"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form; counts as a sparse ``{"bucket index": count}`` mapping."""
        nonzero = np.flatnonzero(self.counts)
        return {
            "version": SCHEMA_VERSION,
            "buckets_per_decade": BUCKETS_PER_DECADE,
            "counts": {str(int(i)): int(self.counts[i]) for i in nonzero},
            "count": self.count,
            "sum": self.sum,
            "max": self.max,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LatencyHistogram:
        """Inverse of :meth:`to_dict`; AgentError naming the bad key and value."""
        if not isinstance(d, Mapping):
            raise AgentError(f"latency histogram must be a mapping, got {type(d).__name__}")
        keys = {"version", "buckets_per_decade", "counts", "count", "sum", "max"}
        if set(d) != keys:
            raise AgentError(
                f"latency histogram keys {sorted(d)}, expected {sorted(keys)}"
            )
        if d["version"] != SCHEMA_VERSION or d["buckets_per_decade"] != BUCKETS_PER_DECADE:
            raise AgentError(
                f"latency histogram version {d['version']!r} with {d['buckets_per_decade']!r} "
                f"buckets per decade; this build reads version {SCHEMA_VERSION} with "
                f"{BUCKETS_PER_DECADE}"
            )
        counts = d["counts"]
        if not isinstance(counts, Mapping):
            raise AgentError(f"latency 'counts' must be a mapping, got {type(counts).__name__}")
        out = cls()
        for key, n in counts.items():
            if not (isinstance(key, str) and key.isdigit() and int(key) < N_BUCKETS):
                raise AgentError(f"latency bucket {key!r} is not an index in 0..{N_BUCKETS - 1}")
            if not _is_count(n):
                raise AgentError(f"latency bucket {key} count {n!r} is not an integer >= 0")
            out.counts[int(key)] = n
        count, total, top = d["count"], d["sum"], d["max"]
        if not _is_count(count) or count != int(out.counts.sum()):
            raise AgentError(
                f"latency 'count' {count!r} does not equal the bucket total {out.counts.sum()}"
            )
        for name, v in (("sum", total), ("max", top)):
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < math.inf:
                raise AgentError(f"latency {name!r} {v!r} is not a finite number >= 0")
        if count and cls.bucket_of(top) != int(np.flatnonzero(out.counts)[-1]):
            raise AgentError(
                f"latency 'max' {top!r} is not in the highest non-empty bucket "
                f"{int(np.flatnonzero(out.counts)[-1])}"
            )
        if not count and (total or top):
            raise AgentError(f"empty latency histogram has sum {total!r} and max {top!r}")
        out.count, out.sum, out.max = count, float(total), float(top)
        return out


def _is_count(n: object) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0
