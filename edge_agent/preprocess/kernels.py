"""Numba kernels for the preprocessing ops that training and the device share.

Every kernel is batched: it takes a C-contiguous float64 array of shape (n_rows, L), loops over
the rows inside ``njit`` and returns a new float64 array (the input is never modified). A row's
signal is its values up to the first NaN; signal kernels write NaN after the (possibly new)
signal end, so their output keeps the same convention even when the input had values after its
first NaN. Parameters are trusted here: ``spec.validate_op`` checks them, ``spec.run_spec``
checks and converts the input. Each kernel has a plain-Python twin in ``reference.py`` written
with the same arithmetic order, and a hypothesis test that the two agree.

Numeric notes:

- ``fastmath=False`` everywhere, so LLVM may neither reorder sums nor fuse multiply-adds: the
  training machine and an ARM device do the same operations in the same order (the only
  platform-dependent bits are libm's cos in the FFT twiddle table).
- Every sum of ``window_features`` (sum(x - x0), sum(x*x), the central sums and the band
  energies) runs in ``_LANES`` = 64 lanes: term j goes to lane j % 64, each lane adds its
  terms in order starting from 0.0, and the lanes are folded in halves, lane[k] += lane[k + w]
  for w = 32, 16, .., 1 (``reference.lane_sum`` is the same order in plain Python). The order
  is fixed by the code, not by the vector width, so it is the same on every machine; the loops
  over a block of 64 lanes are elementwise, which LLVM vectorises without reassociating.
- Central moments are two-pass (mean first). The mean is shifted by the row's first sample,
  ``mean = x0 + sum(x - x0) / n``, so a constant row gives deviations of exactly 0 and hence
  skew, kurtosis and band energies of exactly 0 rather than values made of rounding noise.
- Inputs are expected in a sane physical range (|x| roughly 1e-30..1e30 or 0); far outside it
  the squares and fourth powers under- or overflow.
- Band energies use an iterative radix-2 FFT (``spectrum.py``; np.fft is not available in
  numba): the real signal is packed into a half-length complex FFT. Its tables (twiddles and
  the bit-reversal permutation) come from ``twiddles_for``, kept per width, or are built per
  call by ``window_features``. Each band is a lane sum of its bins; the total is the bands'
  energies added with b ascending.
- Min, max and the sign-change count are exact in any order (min and max are kept per lane).

Measured cost (2-vCPU AMD EPYC (Zen 5) cloud VM, AVX-512, numba 0.68, after JIT, medians of
interleaved runs on a shared and noisy host): ``window_features_with`` with all features, 4
bands and the cached tables takes about 2.2-2.3 µs per 1024-sample window in a batch of 1000
windows and about 3.0 µs for a batch of one window, of which ~0.8 µs is the call itself
(unboxing the arguments, boxing the result) and ~0.75 µs all but the bands; ``window_features``
builds the tables per call (+~2.5 µs). Of a window, the FFT takes ~1.2 µs, the two passes of
scalar features ~0.5 µs and the band sums ~0.15 µs. With one in-order accumulator per sum
(latency-bound) and the earlier FFT schedule the same one-window call took 4.7-5.0 µs.
``run_spec`` adds about 9 µs of spec and input validation per call. ``peak_normalize``,
``rms_normalize`` and ``trim_silence`` take 1.5-2 µs per 1024-sample window (the one sum
among them, rms_normalize's, keeps a single in-order accumulator).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from edge_agent.preprocess.spectrum import FFTTables, fft_tables, half_spectrum_power_of

__all__ = [
    "FEATURE_BANDS",
    "N_SCALAR_FEATURES",
    "n_outputs",
    "peak_normalize",
    "rms_normalize",
    "trim_silence",
    "twiddles_for",
    "window_features",
    "window_features_with",
]

# Feature codes for ``window_features``: positions in spec.WINDOW_FEATURES. Codes below
# N_SCALAR_FEATURES give one column each; FEATURE_BANDS expands to n_bands columns.
_MEAN, _STD, _RMS, _SKEW, _KURTOSIS, _PTP, _CREST, _ZCR = 0, 1, 2, 3, 4, 5, 6, 7
N_SCALAR_FEATURES = 8
FEATURE_BANDS = 8

_jit = numba.njit(cache=True, fastmath=False, nogil=True)

# Masking the sign bit off an index tells LLVM it is non-negative (see spectrum.py).
_NONNEG = (1 << 63) - 1

# Lanes of the scalar features' sums (see _first_pass); a power of two.
_LANES = 64


@_jit
def _row_length(row: np.ndarray) -> int:
    """Number of values before the first NaN."""
    n = row.shape[0]
    nans = 0
    for j in range(n):
        # No early exit, so LLVM vectorises this loop: a full row costs a sixth of the search.
        nans += math.isnan(row[j])
    if nans == 0:
        return n
    for j in range(n):
        if math.isnan(row[j]):
            return j
    return n


@_jit
def _max_abs(row: np.ndarray, n: int) -> float:
    m = 0.0
    for j in range(n):
        a = abs(row[j])
        if a > m:
            m = a
    return m


@_jit
def _scale_rows(X: np.ndarray, use_rms: bool, target: float) -> np.ndarray:
    out = np.full(X.shape, np.nan)
    for i in range(X.shape[0]):
        row = X[i]
        n = _row_length(row)
        if use_rms:
            s = 0.0
            for j in range(n):
                s += row[j] * row[j]
            level = math.sqrt(s / n) if n > 0 else 0.0
        else:
            level = _max_abs(row, n)
        if level > 0.0:
            scale = target / level
            for j in range(n):
                out[i, j] = row[j] * scale
        else:
            for j in range(n):
                out[i, j] = row[j]
    return out


@_jit
def peak_normalize(X: np.ndarray, target: float) -> np.ndarray:
    """Scale each row so max|x| == target; all-zero and empty rows are left unchanged."""
    return _scale_rows(X, False, target)


@_jit
def rms_normalize(X: np.ndarray, target: float) -> np.ndarray:
    """Scale each row so its RMS == target; zero-RMS and empty rows are left unchanged."""
    return _scale_rows(X, True, target)


@_jit
def trim_silence(X: np.ndarray, threshold: float) -> np.ndarray:
    """Drop leading/trailing samples with |x| < threshold * max|x|; shift left, NaN-pad.

    An empty or all-zero row becomes an empty row (all NaN).
    """
    out = np.full(X.shape, np.nan)
    for i in range(X.shape[0]):
        row = X[i]
        n = _row_length(row)
        m = _max_abs(row, n)
        if m == 0.0:
            continue
        cut = threshold * m
        first = 0
        while abs(row[first]) < cut:
            first += 1
        last = n - 1
        while abs(row[last]) < cut:
            last -= 1
        for j in range(first, last + 1):
            out[i, j - first] = row[j]
    return out


@_jit
def n_outputs(codes: np.ndarray, n_bands: int) -> int:
    """Number of output columns for these feature codes."""
    total = 0
    for c in codes:
        total += n_bands if c == FEATURE_BANDS else 1
    return total


@_jit
def _next_pow2(n: int) -> int:
    m = 1
    while m < n:
        m *= 2
    return m


def twiddles_for(width: int) -> FFTTables:
    """The FFT tables (``spectrum.fft_tables``) for windows of ``width`` samples, kept per width.

    Use as ``window_features_with(X, codes, n_bands, *twiddles_for(X.shape[1]))``. The device
    runs one window per request and building the tables costs about as much as the FFT, so they
    are built once here (numba kernels cannot keep state). Nothing writes to them.
    """
    tables = _TABLES.get(width)
    if tables is None:
        tables = _TABLES[width] = fft_tables(_next_pow2(width))
    return tables


_TABLES: dict[int, FFTTables] = {}


@_jit
def window_features(X: np.ndarray, codes: np.ndarray, n_bands: int) -> np.ndarray:
    """Per-row features in the order of ``codes``; FEATURE_BANDS expands to n_bands columns.

    Empty rows give NaN in every column. See spec.py for each feature's definition.
    """
    w_re, w_im, rev = fft_tables(_next_pow2(X.shape[1]))
    return window_features_with(X, codes, n_bands, w_re, w_im, rev)


@_jit
def _fold_sum(v: np.ndarray) -> float:
    """Sum of the lanes v[:_LANES] folded in halves: v[k] += v[k + w], w = 32, 16, .., 1.

    Overwrites v. Each fold is one elementwise (vectorised) step, in a fixed order.
    """
    width = _LANES
    while width > 1:
        width //= 2
        for k in range(width):
            v[k] = v[k] + v[k + width]
    return v[0]


@_jit
def _first_pass(row: np.ndarray, n: int,
                lanes: np.ndarray) -> tuple[float, float, float, float, int]:
    """sum(x - x0), sum(x * x), min, max and sign changes of row[:n] (n >= 1).

    The sums run in ``_LANES`` lanes (element j goes to lane j % _LANES, each lane sums in
    order) folded by :func:`_fold_sum`; min and max are kept per lane as well and folded the
    same way, which is exact. ``lanes`` is scratch of 4 * _LANES values. The loop over a block
    of lanes is elementwise, so LLVM vectorises it without reassociating any sum; full blocks
    and the last partial one are separate loops because a trip count of exactly _LANES lets LLVM
    drop most of its run-time overlap checks (1.7x faster than one loop with a variable width).
    The sign changes are counted in a loop of their own, which LLVM vectorises too.
    """
    x0 = row[0]
    s = lanes[:_LANES]
    sq = lanes[_LANES : 2 * _LANES]
    lo = lanes[2 * _LANES : 3 * _LANES]
    hi = lanes[3 * _LANES : 4 * _LANES]
    s[:] = 0.0
    sq[:] = 0.0
    lo[:] = x0
    hi[:] = x0
    full = n - n % _LANES
    for base in range(0, full, _LANES):
        base = base & _NONNEG
        for k in range(_LANES):
            x = row[(base + k) & _NONNEG]
            s[k] = s[k] + (x - x0)
            sq[k] = sq[k] + x * x
            lo[k] = x if x < lo[k] else lo[k]
            hi[k] = x if x > hi[k] else hi[k]
    for k in range(n - full):
        x = row[(full + k) & _NONNEG]
        s[k] = s[k] + (x - x0)
        sq[k] = sq[k] + x * x
        lo[k] = x if x < lo[k] else lo[k]
        hi[k] = x if x > hi[k] else hi[k]
    width = _LANES
    while width > 1:
        width //= 2
        for k in range(width):
            lo[k] = lo[k + width] if lo[k + width] < lo[k] else lo[k]
            hi[k] = hi[k + width] if hi[k + width] > hi[k] else hi[k]
    crossings = 0
    for j in range(1, n):
        crossings += (row[j] >= 0.0) != (row[j - 1] >= 0.0)
    return _fold_sum(s), _fold_sum(sq), lo[0], hi[0], crossings


@_jit
def _central_sums(row: np.ndarray, n: int, mean: float, lanes: np.ndarray,
                  dev: np.ndarray) -> tuple[float, float, float]:
    """Sums of d**2, d**3 and d**4 for d = row[:n] - mean, in the lanes of :func:`_first_pass`.

    Also writes d to dev[:n] (the FFT's input). ``lanes`` is scratch of 3 * _LANES values.
    """
    m2 = lanes[:_LANES]
    m3 = lanes[_LANES : 2 * _LANES]
    m4 = lanes[2 * _LANES : 3 * _LANES]
    m2[:] = 0.0
    m3[:] = 0.0
    m4[:] = 0.0
    full = n - n % _LANES
    for base in range(0, full, _LANES):
        base = base & _NONNEG
        for k in range(_LANES):
            j = (base + k) & _NONNEG
            d = row[j] - mean
            dev[j] = d
            d2 = d * d
            m2[k] = m2[k] + d2
            m3[k] = m3[k] + d2 * d
            m4[k] = m4[k] + d2 * d2
    for k in range(n - full):
        j = (full + k) & _NONNEG
        d = row[j] - mean
        dev[j] = d
        d2 = d * d
        m2[k] = m2[k] + d2
        m3[k] = m3[k] + d2 * d
        m4[k] = m4[k] + d2 * d2
    return _fold_sum(m2), _fold_sum(m3), _fold_sum(m4)


@_jit
def _lane_sum(x: np.ndarray, start: int, stop: int, lanes: np.ndarray) -> float:
    """Sum of x[start:stop] in the lanes of :func:`_first_pass` (x[start + j] goes to lane j %
    _LANES), folded by :func:`_fold_sum`. ``lanes`` is scratch of _LANES values."""
    v = lanes[:_LANES]
    v[:] = 0.0
    full = stop - (stop - start) % _LANES
    for base in range(start, full, _LANES):
        base = base & _NONNEG
        for k in range(_LANES):
            v[k] = v[k] + x[(base + k) & _NONNEG]
    for k in range(stop - full):
        v[k] = v[k] + x[(full + k) & _NONNEG]
    return _fold_sum(v)


@_jit
def _band_energies(power: np.ndarray, h: int, bands: np.ndarray, lanes: np.ndarray) -> None:
    """bands[b] = energy of bins 1..h in slice b over the total (all 0 when the total is 0).

    Each slice is a :func:`_lane_sum`; the total is the slices' energies summed with b
    ascending. ``lanes`` is scratch of _LANES values.
    """
    n_bands = bands.shape[0]
    total = 0.0
    for b in range(n_bands):
        e = _lane_sum(power, 1 + b * h // n_bands, 1 + (b + 1) * h // n_bands, lanes)
        bands[b] = e
        total += e
    for b in range(n_bands):
        bands[b] = bands[b] / total if total > 0.0 else 0.0


@_jit
def window_features_with(X: np.ndarray, codes: np.ndarray, n_bands: int, w_re: np.ndarray,
                         w_im: np.ndarray, rev: np.ndarray) -> np.ndarray:
    """:func:`window_features` with the FFT tables of ``twiddles_for(X.shape[1])``."""
    n_rows, width = X.shape
    n_out = n_outputs(codes, n_bands)
    out = np.full((n_rows, n_out), np.nan)
    want_bands = False
    for c in codes:
        if c == FEATURE_BANDS:
            want_bands = True
    points = _next_pow2(width) // 2 if want_bands else 0
    # One scratch allocation: the lanes of the sums, the deviations (zero-padded to the FFT's
    # length when it runs), FFT real and imaginary parts, power, band energies, scalars. The
    # vectorised loops' arrays start at multiples of 8 values (64 bytes) into it.
    n_dev = (max(2 * points, width) + 7) // 8 * 8
    work = np.empty(4 * _LANES + n_dev + 3 * points + 1 + n_bands + N_SCALAR_FEATURES)
    lanes = work[: 4 * _LANES]
    dev = work[4 * _LANES : 4 * _LANES + n_dev]
    at = 4 * _LANES + n_dev
    re = work[at : at + points]
    im = work[at + points : at + 2 * points]
    power = work[at + 2 * points : at + 3 * points + 1]
    bands = work[at + 3 * points + 1 : at + 3 * points + 1 + n_bands]
    scalars = work[at + 3 * points + 1 + n_bands :]

    for i in range(n_rows):
        row = X[i]
        n = _row_length(row)
        if n == 0:
            continue
        s, sq, lo, hi, crossings = _first_pass(row, n, lanes)
        mean = row[0] + s / n
        m2, m3, m4 = _central_sums(row, n, mean, lanes, dev)
        with_spectrum = want_bands and n >= 2
        m2 /= n
        m3 /= n
        m4 /= n
        rms = math.sqrt(sq / n)
        peak = 0.0  # max|x| = max(hi, -lo); 0.0 for an all-zero row
        if hi > peak:
            peak = hi
        if -lo > peak:
            peak = -lo
        ptp = hi - lo
        if ptp == 0.0:
            ptp = 0.0  # never -0.0: the lanes of _first_pass may keep different zeros
        scalars[_MEAN] = mean
        scalars[_STD] = math.sqrt(m2)
        scalars[_RMS] = rms
        scalars[_SKEW] = m3 / (m2 * math.sqrt(m2)) if m2 > 0.0 else 0.0
        scalars[_KURTOSIS] = m4 / (m2 * m2) - 3.0 if m2 > 0.0 else 0.0
        scalars[_PTP] = ptp
        scalars[_CREST] = peak / rms if rms > 0.0 else 0.0
        scalars[_ZCR] = crossings / (n - 1) if n >= 2 else 0.0

        if with_spectrum:
            h = _next_pow2(n) // 2
            dev[n : 2 * h] = 0.0
            half_spectrum_power_of(dev, h, rev, re, im, power, w_re, w_im)
            _band_energies(power, h, bands, lanes)
        elif want_bands:
            bands[:] = 0.0

        col = 0
        for c in codes:
            if c == FEATURE_BANDS:
                for b in range(n_bands):
                    out[i, col] = bands[b]
                    col += 1
            else:
                out[i, col] = scalars[c]
                col += 1
    return out
