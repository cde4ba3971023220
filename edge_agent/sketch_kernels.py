"""The numba kernels behind :mod:`edge_agent.sketching`, in a module of their own.

Importing this module imports numba, and LLVM under it (~100 MiB resident): so
:mod:`edge_agent.sketching` imports it only when no ahead-of-time build of
``_update_segments_kernel`` (:mod:`edge_agent.sketch_aot`) is there to load. What the kernels
compute, and how exactly they agree with the numpy reference, is in
:mod:`edge_agent.sketching`'s docstring.

``fastmath=False``, so LLVM neither reorders the sums nor fuses multiply-adds: an x86-64
gateway and an ARM device produce the same bits. ``nogil=True`` lets the serving thread run
while the fold thread folds.

How it is fast without fastmath: a numeric column is copied out (widened to float64: the agent
stages float32 rows, exact in it); one branch-free pass over the copy takes its NaNs, overflow,
and the count, min and max of its values within the moment limit, min and max as integer order
keys (float min and max do not vectorise without fastmath; integer ones do); then it is counted
by edge instead of binned by value: for each edge, how many values are
``>= edge``, a compare summed over the column that LLVM vectorises (integer adds), with no
per-value search (whose branches mispredict on every row) and no histogram (whose increments of
the same bin wait on each other); neighbouring counts give the bins. The moment passes run
row-major with one accumulator per feature, so the features' float dependency chains overlap
while each feature still sums in row order.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from fleet_protocol.sketch import MOMENT_LIMIT

# Features with at most this many edges are binned by a vectorised count, longer ones by a
# bisection per value (the count still wins at 257 edges, the compiler's maximum: 410 µs against
# ~800 µs per 1024 x 16 values).
_LINEAR_MAX_EDGES = 512
_jit = numba.njit(cache=True, fastmath=False, nogil=True)


@_jit
def _count_le(edges: np.ndarray, start: int, n: int, x: float) -> int:
    """How many of the sorted ``edges[start:start + n]`` (``n >= 1``) are ``<= x``.

    A branch-free bisection: the step is a multiply by the comparison, so random values cost no
    mispredicted branches (a ``select`` here is turned back into a branch by LLVM). 0 for NaN.
    """
    base = start
    while n > 1:
        half = n >> 1
        base += half * (edges[base + half - 1] <= x)
        n -= half
    return base - start + (edges[base] <= x)


@_jit
def _first_bad_code(
    values: np.ndarray, numeric: np.ndarray, n_slots: np.ndarray
) -> tuple[int, int]:
    """(feature, row) of the first invalid categorical code, or (-1, -1) when all are valid."""
    n_rows, n_features = values.shape
    for j in range(n_features):
        if numeric[j]:
            continue
        other = float(n_slots[j] - 1)
        for i in range(n_rows):
            c = values[i, j]
            if math.isnan(c):
                continue
            if c < -1.0 or c > other or c != math.floor(c):
                return j, i
    return -1, -1

# Order keys: a float64's bits as int64, with the 63 low bits flipped when the sign is set,
# order the non-NaN values as the floats do, with -0.0 below +0.0 (IEEE 754's totalOrder
# without NaNs). min and max of integer keys vectorise; of floats, without fastmath, they do
# not (a compare-and-select chain per value). The same map turns a key back into its float.
_LOW_BITS = np.int64(0x7FFFFFFFFFFFFFFF)
_KEY_MAX = np.int64(0x7FFFFFFFFFFFFFFF)
_KEY_MIN = np.int64(-0x7FFFFFFFFFFFFFFF - 1)
# |x| <= MOMENT_LIMIT as an integer compare of |x|'s bits (NaN's bits are above +inf's)
_LIMIT_BITS = np.int64(np.array(MOMENT_LIMIT, dtype=np.float64).view(np.int64)[()])


@_jit
def _column_stats(col: np.ndarray, bits: np.ndarray, n: int,
                  last: float) -> tuple[int, int, int, np.int64, np.int64]:
    """Of ``col[:n]`` (``bits``: ``col`` viewed as int64): its NaNs, its values ``> last``,
    and the count and the least and greatest order keys of its values within MOMENT_LIMIT
    (``_KEY_MAX`` and ``_KEY_MIN`` when there are none). One branch-free pass that LLVM
    vectorises: 1024 values in ~0.25 µs, against ~0.6 µs for float compares and branches.
    """
    n_nan = 0
    n_over = 0
    n_in = 0
    lo = _KEY_MAX
    hi = _KEY_MIN
    for i in range(n):
        x = col[i]
        v = bits[i]
        n_nan += x != x
        n_over += x > last
        inside = (v & _LOW_BITS) <= _LIMIT_BITS
        n_in += inside
        k = v ^ ((v >> 63) & _LOW_BITS)
        lo = min(lo, k if inside else _KEY_MAX)
        hi = max(hi, k if inside else _KEY_MIN)
    return n_nan, n_over, n_in, lo, hi


@_jit
def _update_kernel(
    counts: np.ndarray,
    missing: np.ndarray,
    moments: np.ndarray,
    offsets: np.ndarray,
    edges: np.ndarray,
    last_edge: np.ndarray,
    edge_start: np.ndarray,
    edge_count: np.ndarray,
    numeric: np.ndarray,
    n_slots: np.ndarray,
    values: np.ndarray,
) -> tuple[int, int]:
    """Fold ``values`` into the sketch arrays; (feature, row) of a bad code, else (-1, -1).

    Per numeric feature: copy its column out, take the count, min and max of its in-limit
    values (min and max in IEEE 754's total order, so -0.0 is below +0.0) and the first of them
    in row order (the shift), and bin it by edge counts (vectorised). Then
    the two moment passes run row-major with one accumulator per feature: each feature's sum is
    still taken in row order (the same bits as a column loop), but the features' dependency
    chains interleave instead of waiting on each other's float latency.
    """
    bad = _first_bad_code(values, numeric, n_slots)
    if bad[0] >= 0:
        return bad
    n_rows, n_features = values.shape
    # the column widened to float64 (float32 values are exact in it), binned by float64
    # compares: four lanes of compare results are four int64 lanes of counts
    col = np.empty(n_rows, dtype=np.float64)
    bits = col.view(np.int64)
    key = np.empty(1, dtype=np.int64)  # a float64's bits: key[0] = bits, read key_value[0]
    key_value = key.view(np.float64)
    slots = np.empty(n_rows, dtype=np.int64)
    hist = np.empty((int(n_slots.max()) if n_features else 0) + 2, dtype=np.int64)
    n_in = np.zeros(n_features, dtype=np.int64)
    shift = np.zeros(n_features, dtype=np.float64)
    lo = np.empty(n_features, dtype=np.float64)
    hi = np.empty(n_features, dtype=np.float64)
    for j in range(n_features):
        offset = offsets[j]
        if not numeric[j]:
            n_missing = 0
            for i in range(n_rows):
                c = values[i, j]
                if math.isnan(c) or c < 0.0:
                    n_missing += 1
                else:
                    counts[offset + int(c)] += 1
            missing[j] += n_missing
            continue
        m = edge_count[j]
        # The slot of x under edges[start:start + m] (numeric_slot's rule) is (edges but the
        # last that are <= x) + (x > last edge): x == last lands in the last inner bin, x > last
        # (and +inf) in the overflow; NaN (missing) compares false everywhere.
        start = edge_start[j]
        last = last_edge[j]
        # The column is copied out, then one vectorised pass takes what needs no edge: NaNs,
        # the overflow, and the count, min and max of the values within MOMENT_LIMIT (False
        # for NaN); the shift is the first of those in row order, as in the reference.
        for i in range(n_rows):
            col[i] = values[i, j]
        n_nan, n_over, n, key_lo, key_hi = _column_stats(col, bits, n_rows, last)
        if n:
            first = 0
            while not abs(col[first]) <= MOMENT_LIMIT:
                first += 1
            shift[j] = col[first]
            key[0] = key_lo ^ ((key_lo >> 63) & _LOW_BITS)
            lo[j] = key_value[0]
            key[0] = key_hi ^ ((key_hi >> 63) & _LOW_BITS)
            hi[j] = key_value[0]
        n_in[j] = n
        missing[j] += n_nan
        if m - 1 <= _LINEAR_MAX_EDGES:
            # Counted by edge, not by value: with G_k = #(x >= e_k) for the edges but the last,
            # B = [values not NaN, G_0, ..., G_{m-2}, #(x > last)] is non-increasing (sorted
            # edges) and slot s holds B[s] - B[s+1] (the overflow B[m]). Each G_k is a compare
            # summed over the column: a reduction LLVM vectorises, with no per-value slot and
            # no histogram (whose increments of the same bins wait on each other).
            prev = n_rows - n_nan
            for k in range(start, start + m - 1):
                e = edges[k]
                g = 0
                for i in range(n_rows):
                    g += e <= col[i]
                counts[offset + k - start] += prev - g
                prev = g
            counts[offset + m - 1] += prev - n_over
            counts[offset + m] += n_over
        else:
            # long edge lists: a branch-free bisection per value, then a histogram
            for i in range(n_rows):
                x = col[i]
                slots[i] = _count_le(edges, start, m - 1, x) + (x > last) + (x != x) * (m + 1)
            hist[: m + 2] = 0
            for i in range(n_rows):
                hist[slots[i]] += 1
            for s in range(m + 1):
                counts[offset + s] += hist[s]
    # The batch mean is shifted by the batch's first in-limit value: mean = x0 + sum(x - x0) / n.
    # A value outside the limit adds +0.0, not a branch (mispredicted wherever such values
    # are): acc starts at +0.0 and a sum is -0.0 only when both terms are, so adding +0.0
    # never changes its bits. The same holds for m2 below.
    acc = np.zeros(n_features, dtype=np.float64)
    for i in range(n_rows):
        for j in range(n_features):
            x = values[i, j]
            acc[j] += (x - shift[j]) if abs(x) <= MOMENT_LIMIT else 0.0
    mean_b = np.zeros(n_features, dtype=np.float64)
    for j in range(n_features):
        if n_in[j]:
            mean_b[j] = shift[j] + acc[j] / n_in[j]
    m2 = np.zeros(n_features, dtype=np.float64)
    for i in range(n_rows):
        for j in range(n_features):
            x = values[i, j]
            d = x - mean_b[j]
            m2[j] += d * d if abs(x) <= MOMENT_LIMIT else 0.0
    for j in range(n_features):
        if not n_in[j]:
            continue
        nb = float(n_in[j])
        na = moments[j, 0]
        if na == 0.0:
            moments[j, 0] = nb
            moments[j, 1] = mean_b[j]
            moments[j, 2] = m2[j]
            moments[j, 3] = lo[j]
            moments[j, 4] = hi[j]
            continue
        # Same operations, in the same order, as fleet_protocol.sketch.merge_moments.
        total = na + nb
        delta = mean_b[j] - moments[j, 1]
        moments[j, 1] = moments[j, 1] + delta * (nb / total)
        moments[j, 2] = moments[j, 2] + m2[j] + delta * delta * (na * nb / total)
        moments[j, 0] = total
        moments[j, 3] = min(moments[j, 3], lo[j])
        moments[j, 4] = max(moments[j, 4], hi[j])
    return -1, -1


@_jit
def _update_segments_kernel(
    counts: np.ndarray,
    missing: np.ndarray,
    moments: np.ndarray,
    offsets: np.ndarray,
    edges: np.ndarray,
    last_edge: np.ndarray,
    edge_start: np.ndarray,
    edge_count: np.ndarray,
    numeric: np.ndarray,
    n_slots: np.ndarray,
    values: np.ndarray,
    ends: np.ndarray,
) -> tuple[int, int, int]:
    """Fold ``values[ends[k-1]:ends[k]]`` for each k in turn, exactly as that many
    ``_update_kernel`` calls; (segment, feature, row) of the first bad code, else -1s."""
    start = 0
    for k in range(ends.shape[0]):
        end = ends[k]
        if end > start:
            j, i = _update_kernel(counts, missing, moments, offsets, edges, last_edge,
                                  edge_start, edge_count, numeric, n_slots, values[start:end])
            if j >= 0:
                return k, j, i
        start = end
    return -1, -1, -1


@_jit
def _decode_kernel(
    raw: np.ndarray,
    probabilities: np.ndarray,
    table: np.ndarray,
    shift: int,
    ranges: np.ndarray,
    outputs: np.ndarray,
    log_scores: np.ndarray,
    log_codes: np.ndarray,
    code_bytes: int,
) -> int:
    """Decode a stage's deferred batches (rows ``ranges[k, 0]:ranges[k, 1]``): each row's
    label code, ``table[raw - shift]`` with the index clipped onto the table's ends (which hold
    the "unknown" code), and its score, the row's largest probability (NaN if any is NaN).
    Writes both into ``outputs`` (code, score: the output sketch's rows) and into the rows'
    prediction-log entries: ``log_scores`` (float32) and ``log_codes``, the codes as
    ``code_bytes``-byte little-endian unsigned integers. Returns how many scores are not finite.

    The same values as ``CodeTable.__call__`` and ``model.row_scores``, in one pass and
    without the GIL: on the fold thread these were some 40 numpy calls per stage, and each
    released and took back the GIL that the serving thread wanted (~17 µs of a 1024-row batch).
    """
    last = table.shape[0] - 1
    n_cols = probabilities.shape[1]
    bad = 0
    for k in range(ranges.shape[0]):
        for i in range(ranges[k, 0], ranges[k, 1]):
            idx = raw[i] - shift
            idx = 0 if idx < 0 else (last if idx > last else idx)
            code = table[idx]
            score = probabilities[i, 0]
            for c in range(1, n_cols):
                v = probabilities[i, c]
                # numpy's maximum(score, v): a NaN wins, and of equal values the later one
                # (-0.0 then +0.0 gives +0.0)
                if v >= score or v != v:
                    score = v
            outputs[i, 0] = code
            outputs[i, 1] = score
            log_scores[i] = score
            bad += not math.isfinite(score)
            at = i * code_bytes
            for b in range(code_bytes):
                log_codes[at + b] = (code >> (8 * b)) & 0xFF
    return bad
