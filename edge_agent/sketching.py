"""Folding batches of served rows into a drift sketch, and the row buffer.

The agent serves one row at a time but sketches in batches: served rows are staged (see
:mod:`edge_agent.telemetry`) and the staged batches go to :func:`update_sketch_segments` (or
one batch to :func:`update_sketch`), which folds them into a ``fleet_protocol.sketch.Sketch``'s
arrays in place, every feature and every batch in one compiled call. :class:`KernelLayout` is
the layout flattened into arrays the kernel can read.

The kernel (:mod:`edge_agent.sketch_kernels`) runs from an ahead-of-time build when there is one
for this source and machine under ``$NUMBA_CACHE_DIR/aot`` (``edgefleet agent warmup`` builds it,
:mod:`edge_agent.sketch_aot`; ``agent run`` points NUMBA_CACHE_DIR at the data dir's cache, as
for numba), else from numba's JIT. The build imports without numba and LLVM, which hold ~117 MiB
once loaded; both give the same bits. The choice is made once, at the first fold (or
:func:`warmup`), and logged; importing this module imports neither.

Agreement with the numpy reference (``Sketch.update_numeric`` / ``Sketch.update_codes``):

- Slots follow ``fleet_protocol.sketch.numeric_slot`` exactly: NaN is missing; ``x < e[0]``
  (and -inf) is the underflow; ``e[i-1] <= x < e[i]`` is bin ``i``; ``x == e[-1]`` is the last
  inner bin; ``x > e[-1]`` (and +inf) is the overflow. Counts and missing are exactly equal.
- Moments cover only values with ``|x| <= MOMENT_LIMIT`` (1e100); beyond it a value is counted
  in a slot but kept out of the moments, as in the reference. Per feature and batch the kernel
  computes count, mean, M2, min and max, then merges them into the stored row with the same
  arithmetic as ``merge_moments`` (Chan et al.), an empty side being the identity. Count, min
  and max are equal to the reference (a batch's min and max of ±0.0 values are taken in IEEE
  754's total order, -0.0 below +0.0, where numpy's depend on the order: equal, not always
  the same bits); mean and M2 agree to rounding, because the
  reference sums with numpy's pairwise ``mean`` and a BLAS ``dot``. The batch mean is shifted
  by the batch's first in-limit value, ``mean = x0 + sum(x - x0) / n``, so a constant batch
  has an M2 of exactly 0. Each feature's sums are taken in row order, so the bits are those of
  a plain per-column loop (tests/edge_agent/test_perf_paths.py holds that loop).
- Categorical features arrive as float codes: -1 (or NaN) missing, ``0..k-1`` a category,
  ``k`` other. A code that is not one of these raises ``SketchError``, as ``update_codes``
  does, and nothing is counted (the kernel checks every code before it writes).

The kernel is compiled without fastmath (the same bits on x86-64 and ARM) and releases the GIL,
so the serving thread runs while the fold thread folds; :mod:`edge_agent.sketch_kernels` says
how it is fast.

Measured cost (2-vCPU x86-64 cloud VM, numba 0.68, after JIT; thread CPU time, best of repeats
on a host shared with other jobs): 1024 rows x 16 numeric features with 17 edges take 28 µs
per call from float32 rows, 30 µs from float64 (1.7 ns per value; 38-40 µs before the column
statistics took integer order keys, measured the same way in one session; binning each value
by 16 compare-adds and a histogram took 82-100 µs, a per-value search 345-355 µs, the numpy
reference 1.1-1.6 ms per 256 rows), from the JIT or the ahead-of-time build alike. A call has a
fixed cost of 2-5 µs (checks and dispatch; the build's check of the arguments against its
compiled types costs about what the JIT's dispatch does), so batch. ``RowBuffer.append`` of a
16-float float64 row takes 0.4-0.8 µs. The first call in a fresh process imports the build in
about 2 ms, or JIT-compiles for about 3 s, or loads numba's on-disk cache in about 0.4 s: call
:func:`warmup` at start-up.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from edge_agent import sketch_aot
from edge_agent.errors import AgentError
from fleet_protocol.errors import SketchError
from fleet_protocol.sketch import FeatureLayout, Sketch, SketchLayout

__all__ = ["KernelLayout", "RowBuffer", "decode_deferred", "fold_stage", "update_sketch",
           "update_sketch_segments", "warmup"]

log = logging.getLogger(__name__)

_S = TypeVar("_S", bound=np.generic)


def _frozen(a: npt.ArrayLike, dtype: type[_S]) -> npt.NDArray[_S]:
    """A C-contiguous, read-only copy (the layout is shared between threads and never edited)."""
    out: npt.NDArray[_S] = np.ascontiguousarray(np.array(a, dtype=dtype))
    out.setflags(write=False)
    return out


_LAYOUT_DTYPES: dict[str, type[np.generic]] = {
    "offsets": np.int64, "edges": np.float64, "edge_start": np.int64, "edge_count": np.int64,
    "numeric": np.bool_, "n_slots": np.int64, "last": np.float64,
}


@dataclass(frozen=True, eq=False)
class KernelLayout:
    """Flattened view of a SketchLayout for the kernels.

    ``offsets``, ``edge_start``, ``edge_count``, ``n_slots`` and ``numeric`` have one entry per
    feature; ``edges`` holds every numeric feature's edges end to end (feature ``j``'s are
    ``edges[edge_start[j]:edge_start[j] + edge_count[j]]``; a categorical feature has
    ``edge_start`` -1 and ``edge_count`` 0). ``fingerprint`` is the source layout's, checked
    by :func:`update_sketch` so a kernel layout is never applied to another layout's sketch.
    All arrays are 1-D, read-only, C-contiguous and of their annotated dtype (an array given
    otherwise is copied so on construction): what the ahead-of-time build was compiled for,
    checked once here rather than on every fold.
    """

    offsets: npt.NDArray[np.int64]
    edges: npt.NDArray[np.float64]
    edge_start: npt.NDArray[np.int64]
    edge_count: npt.NDArray[np.int64]
    numeric: npt.NDArray[np.bool_]
    n_slots: npt.NDArray[np.int64]
    fingerprint: str
    #: each numeric feature's last edge (0.0 for a categorical one)
    last: npt.NDArray[np.float64]

    def __post_init__(self) -> None:
        for name, dtype in _LAYOUT_DTYPES.items():
            a = getattr(self, name)
            if not (isinstance(a, np.ndarray) and a.dtype == dtype and a.flags.c_contiguous
                    and a.flags.aligned and not a.flags.writeable):
                a = _frozen(a, dtype)
                object.__setattr__(self, name, a)
            if a.ndim != 1:
                raise SketchError(f"kernel layout array {name} has shape {a.shape}, expected "
                                  "one entry per feature (or per edge); build it with "
                                  "KernelLayout.from_layout")
        problem = self._inconsistency()
        if problem:
            raise SketchError(f"kernel layout {self.fingerprint}: {problem}; build it with "
                              "KernelLayout.from_layout")

    def _inconsistency(self) -> str | None:
        """What makes these arrays disagree with each other (None: nothing): the kernels index
        the sketch's arrays and ``edges`` by them without bounds checks, so a layout that
        passes here can never make a fold read or write outside them."""
        nf = len(self.offsets)
        for name in ("edge_start", "edge_count", "numeric", "n_slots", "last"):
            if len(getattr(self, name)) != nf:
                return f"{name} has {len(getattr(self, name))} entries for {nf} features"
        slot = 0
        for j in range(nf):
            if self.offsets[j] != slot or self.n_slots[j] < 1:
                return f"feature {j}: offset {self.offsets[j]}, {self.n_slots[j]} slots"
            slot += int(self.n_slots[j])
            if not self.numeric[j]:
                continue
            start, m = int(self.edge_start[j]), int(self.edge_count[j])
            if m < 2 or start < 0 or start + m > len(self.edges) or self.n_slots[j] != m + 1 \
                    or self.last[j] != self.edges[start + m - 1]:
                return (f"numeric feature {j}: edges {start}..{start + m - 1} of "
                        f"{len(self.edges)}, {self.n_slots[j]} slots, last edge {self.last[j]}")
        return None

    @property
    def total_slots(self) -> int:
        """Length of a sketch's counts under this layout."""
        return int(self.offsets[-1] + self.n_slots[-1]) if len(self.offsets) else 0

    @classmethod
    def from_layout(cls, layout: SketchLayout) -> KernelLayout:
        """Flatten ``layout``: offsets, concatenated edges and per-feature slot counts."""
        edges: list[float] = []
        edge_start: list[int] = []
        edge_count: list[int] = []
        for f in layout.features:
            if f.kind == "numeric":
                edge_start.append(len(edges))
                edge_count.append(len(f.edges))
                edges.extend(f.edges)
            else:
                edge_start.append(-1)
                edge_count.append(0)
        last = [f.edges[-1] if f.kind == "numeric" else 0.0 for f in layout.features]
        return cls(
            offsets=_frozen(layout.offsets, np.int64),
            edges=_frozen(edges, np.float64),
            edge_start=_frozen(edge_start, np.int64),
            edge_count=_frozen(edge_count, np.int64),
            numeric=_frozen([f.kind == "numeric" for f in layout.features], np.bool_),
            n_slots=_frozen([f.n_slots for f in layout.features], np.int64),
            fingerprint=layout.fingerprint(),
            last=_frozen(last, np.float64),
        )

    @property
    def n_features(self) -> int:
        """Number of features (columns of the values given to :func:`update_sketch`)."""
        return int(self.offsets.shape[0])


_Fold = Callable[..., tuple[int, int, int]]


class _Kernels:
    """Which kernel folds: chosen once per process, on first use, from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._chosen = False
        self._aot: sketch_aot.AotKernel | None = None
        self._jit: _Fold | None = None
        self._jit_decode: Callable[..., int] | None = None

    def aot(self) -> sketch_aot.AotKernel | None:
        """The ahead-of-time build under NUMBA_CACHE_DIR (read from the environment, as numba
        reads it), or None: then :meth:`jit`."""
        if not self._chosen:
            with self._lock:
                if not self._chosen:
                    cache_dir = os.environ.get("NUMBA_CACHE_DIR")
                    if cache_dir:
                        self._aot = sketch_aot.load(Path(cache_dir))  # logs which, and why
                    else:
                        log.info("sketch kernels: numba's JIT (NUMBA_CACHE_DIR is not set: no "
                                 "ahead-of-time build to look for)")
                    self._chosen = True
        return self._aot

    def jit(self) -> _Fold:
        """The numba kernel (imports numba and LLVM the first time)."""
        if self._jit is None:
            from edge_agent.sketch_kernels import _update_segments_kernel

            self._jit = _update_segments_kernel
        return self._jit

    def jit_decode(self) -> Callable[..., int]:
        """The numba decoder of deferred batches (imports numba and LLVM the first time)."""
        if self._jit_decode is None:
            from edge_agent.sketch_kernels import _decode_kernel

            self._jit_decode = _decode_kernel
        return self._jit_decode


_KERNELS = _Kernels()


def update_sketch(sketch: Sketch, klayout: KernelLayout, values: npt.ArrayLike) -> None:
    """Fold a batch of rows into ``sketch`` in place (counts, missing, moments), in one call.

    ``values`` is float64 ``(n_rows, n_features)``: the raw value of a numeric feature, the
    category code of a categorical one (-1 or NaN missing, ``0..k-1``, ``k`` other). The
    result equals ``Sketch.update_numeric`` / ``update_codes`` column by column (see the
    module docstring for what "equals" means for mean and M2). SketchError, with nothing
    counted, when ``klayout`` is not the sketch's layout, the shape is wrong or a code is
    invalid. The GIL is released inside the kernel, but one sketch must not be updated from
    two threads at once.
    """
    x = _checked_values(sketch, klayout, values)
    if x.shape[0] == 0:
        return
    # one compiled entry point for both functions: one JIT (or cache load) at start-up
    _, j, i = _fold(sketch, klayout, x, np.array([x.shape[0]], dtype=np.int64))
    if j >= 0:
        _raise_bad_code(sketch, x, j, i)


def update_sketch_segments(
    sketch: Sketch, klayout: KernelLayout, values: npt.ArrayLike, ends: npt.ArrayLike
) -> None:
    """Fold consecutive batches of ``values`` in one call: rows ``ends[k-1]:ends[k]`` (from 0)
    are one batch. The result is the same bits as one :func:`update_sketch` per batch, in
    order (the batch moments are merged one by one), for one dispatch and one GIL release.

    ``ends`` must be increasing and end at ``len(values)``. On an invalid code, the batches
    before the bad one are folded and SketchError names the bad one, which counts nothing.
    """
    x = _checked_values(sketch, klayout, values)
    e = np.asarray(ends, dtype=np.int64)
    if e.ndim != 1 or (e.size and (e[-1] != x.shape[0] or np.any(np.diff(e) < 0) or e[0] < 0)):
        raise SketchError(
            f"segment ends {e.tolist()[:8]} are not increasing up to the {x.shape[0]} rows"
        )
    if x.shape[0] == 0:
        return
    fold_stage(sketch, klayout, x, e)


def fold_stage(sketch: Sketch, klayout: KernelLayout, values: np.ndarray,
               ends: np.ndarray) -> None:
    """:func:`update_sketch_segments` for rows the caller made itself, unchecked: ``values``
    C-contiguous, aligned float32 or float64 rows of ``klayout``, which is the sketch's, and
    ``ends`` a non-decreasing int64 array ending at ``len(values)`` (the agent's fold stages,
    built so). The checks it skips cost ~4 µs a call, twice per stage, on the fold thread;
    the kernel still checks the codes, and the compiled build its arguments' types.
    """
    k, j, i = _fold(sketch, klayout, values, ends)
    if k >= 0:
        start = int(ends[k - 1]) if k else 0
        _raise_bad_code(sketch, values[start:], j, i,
                        f"batch {k} (rows {start}..{int(ends[k]) - 1}): ")


def decode_deferred(raw: np.ndarray, probabilities: np.ndarray, table: np.ndarray, shift: int,
                    ranges: np.ndarray, outputs: np.ndarray, log_scores: np.ndarray,
                    log_codes: np.ndarray, code_bytes: int) -> int:
    """Decode deferred batches (rows ``ranges[k, 0]:ranges[k, 1]``, in bounds of every array):
    label codes ``table[clip(raw - shift)]`` and scores (each row's largest float32
    probability, NaN if any is NaN) into ``outputs`` (float64 rows: code, score) and into the
    prediction log's float32 ``log_scores`` and ``log_codes`` (uint8, ``code_bytes`` per row,
    little-endian). One call per stage, the GIL released; returns the non-finite scores.
    The arrays are the telemetry stage's own: C-contiguous, of these dtypes."""
    args = (raw, probabilities, table, shift, ranges, outputs, log_scores, log_codes,
            code_bytes)
    aot = _KERNELS.aot()
    done = aot.decode(args) if aot is not None else None
    return int(done if done is not None else _KERNELS.jit_decode()(*args))


def _kernel_args(sketch: Sketch, klayout: KernelLayout, x: np.ndarray,
                 ends: np.ndarray) -> tuple[np.ndarray, ...]:
    """The kernel's arguments, in its order; SketchError when the sketch's arrays are not of
    the layout's shape (the kernels write into them without bounds checks)."""
    nf = klayout.n_features
    if (sketch.counts.shape != (klayout.total_slots,) or sketch.missing.shape != (nf,)
            or sketch.moments.shape != (nf, 5)):
        raise SketchError(
            f"sketch arrays of shapes {sketch.counts.shape}, {sketch.missing.shape}, "
            f"{sketch.moments.shape} do not fit layout {klayout.fingerprint} "
            f"(({klayout.total_slots},), ({nf},), ({nf}, 5))")
    return (sketch.counts, sketch.missing, sketch.moments, klayout.offsets, klayout.edges,
            klayout.last, klayout.edge_start, klayout.edge_count, klayout.numeric,
            klayout.n_slots, x, ends)


def _fold(sketch: Sketch, klayout: KernelLayout, x: np.ndarray,
          ends: np.ndarray) -> tuple[int, int, int]:
    """Run the kernel on checked values: (bad batch, feature, row), -1s when all folded."""
    args = _kernel_args(sketch, klayout, x, ends if ends.flags.c_contiguous
                        else np.ascontiguousarray(ends))
    aot = _KERNELS.aot()
    # the build declines arrays that are not of its compiled types; the JIT takes any
    done = aot.fold(args) if aot is not None else None
    k, j, i = done if done is not None else _KERNELS.jit()(*args)
    return int(k), int(j), int(i)


def _checked_values(sketch: Sketch, klayout: KernelLayout, values: npt.ArrayLike) -> np.ndarray:
    """``values`` as C-contiguous, aligned float32 (when given so: the agent stages float32
    rows, and the kernel widens each column as it copies it out) or float64 rows of the
    sketch's layout, or SketchError."""
    if klayout.fingerprint != sketch.layout.fingerprint():
        raise SketchError(
            f"kernel layout {klayout.fingerprint} does not match the sketch's layout "
            f"{sketch.layout.fingerprint()}; build it with KernelLayout.from_layout(sketch.layout)"
        )
    try:
        x = values if isinstance(values, np.ndarray) and values.dtype == np.float32 \
            else np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise SketchError(f"values are not float64 numbers ({err})") from err
    if x.ndim != 2 or x.shape[1] != klayout.n_features:
        raise SketchError(
            f"values have shape {x.shape}, expected (n_rows, {klayout.n_features}) for layout "
            f"{klayout.fingerprint}"
        )
    if not (x.flags.c_contiguous and x.flags.aligned):
        x = np.array(x, order="C")  # a fresh copy: contiguous and aligned, as compiled for
    return x


def _raise_bad_code(sketch: Sketch, x: np.ndarray, j: int, i: int, where: str = "") -> None:
    f = sketch.layout.features[j]
    raise SketchError(
        f"{where}feature {f.name!r}: row {i} has code {float(x[i, j])!r}, expected an integer "
        f"in -1..{len(f.categories)} (-1 missing, {len(f.categories)} other) or NaN; "
        "nothing was counted"
    )


def warmup() -> None:
    """Choose the kernel (logged) and run it on tiny float32 and float64 inputs, so the first
    real fold neither imports, nor compiles, nor loads numba's cache."""
    layout = SketchLayout(
        (
            FeatureLayout("x", "numeric", edges=(0.0, 1.0)),
            FeatureLayout("c", "categorical", categories=("a",)),
        )
    )
    sketch = Sketch.empty(layout)
    klayout = KernelLayout.from_layout(layout)
    values = np.array([[0.5, 0.0], [np.nan, -1.0]])
    for dtype in (np.float32, np.float64):
        update_sketch_segments(sketch, klayout, values.astype(dtype), [1, 2])
    decode_deferred(np.zeros(1, np.int64), np.zeros((1, 2), np.float32),
                    np.zeros(3, np.int64), 0, np.array([[0, 1]], np.int64),
                    np.empty((1, 2), np.float64), np.empty(1, np.float32),
                    np.empty(1, np.uint8), 1)


class RowBuffer:
    """A preallocated float64 ``(capacity, n_features)`` batch that rows are copied into.

    ``append`` is on the serving path: one row copy and a counter, 0.4-0.8 µs for a 16-float
    float64 row (measured as in the module docstring; a Python list instead of an array costs
    up to ~0.5 µs more for the conversion). A full buffer refuses more rows with
    AgentError; the caller drains it first. :meth:`drain` returns a *view* of the filled rows
    and resets the buffer, so consume the view (e.g. with :func:`update_sketch`) before the
    next append overwrites it. Not thread-safe: one thread owns a buffer.
    """

    __slots__ = ("_capacity", "_data", "_n")

    def __init__(self, capacity: int, n_features: int) -> None:
        if capacity < 1 or n_features < 1:
            raise AgentError(
                f"row buffer needs capacity >= 1 and n_features >= 1, got capacity {capacity} "
                f"and n_features {n_features}"
            )
        self._data = np.zeros((capacity, n_features), dtype=np.float64)
        self._capacity = capacity
        self._n = 0

    @property
    def capacity(self) -> int:
        """Rows the buffer holds when full."""
        return self._capacity

    @property
    def n_features(self) -> int:
        """Values per row."""
        return int(self._data.shape[1])

    @property
    def full(self) -> bool:
        """True when no row fits until :meth:`drain`."""
        return self._n == self._capacity

    def __len__(self) -> int:
        return self._n

    def append(self, row: npt.ArrayLike) -> bool:
        """Copy one row (``n_features`` values) in; True when the buffer is now full.

        A scalar is broadcast across the row, as numpy assignment does; pass 1-D rows.
        """
        n = self._n
        try:
            self._data[n] = row
        except IndexError:
            raise AgentError(
                f"row buffer is full ({self._capacity} rows); drain() it before appending"
            ) from None
        except (ValueError, TypeError) as err:
            raise AgentError(
                f"row does not fit a buffer of {self.n_features} features: {err}"
            ) from err
        n += 1
        self._n = n
        return n == self._capacity

    def append_many(self, rows: npt.ArrayLike) -> int:
        """Copy as many of ``rows`` (2-D) as fit; return how many were taken.

        Feed the rest after a drain: ``taken = buf.append_many(rows); rows = rows[taken:]``.
        """
        r = np.asarray(rows, dtype=np.float64)
        if r.ndim != 2 or r.shape[1] != self.n_features:
            raise AgentError(
                f"rows have shape {r.shape}, expected (n_rows, {self.n_features})"
            )
        take = min(r.shape[0], self._capacity - self._n)
        self._data[self._n : self._n + take] = r[:take]
        self._n += take
        return take

    def drain(self) -> npt.NDArray[np.float64]:
        """View of the filled rows (C-contiguous), and reset the buffer to empty."""
        out = self._data[: self._n]
        self._n = 0
        return out
