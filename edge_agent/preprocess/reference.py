"""Plain-Python references for the numba kernels, used by the tests.

Each function mirrors its kernel in ``kernels.py`` (``fft_radix2``: the FFT in ``spectrum.py``)
with loops over Python floats and ``math`` / ``cmath`` only: numpy appears solely to unpack
the input rows and pack the result. The arithmetic follows the same definitions and summation
order as the kernels (shifted two-pass mean, every sum of the scalar features in the lanes of
:func:`lane_sum`, ``m2 * sqrt(m2)`` for m2**1.5), so the scalar features are the kernels' bit
for bit. Band energies come from a direct DFT rather than an FFT and are summed with
``math.fsum``, so they agree with the kernel's to rounding, and a wrong kernel shows up as a
disagreement. Far too slow for production; never imported by the agent.
"""

from __future__ import annotations

import cmath
import itertools
import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "LANES",
    "fft_radix2",
    "lane_sum",
    "peak_normalize",
    "rms_normalize",
    "row_features",
    "trim_silence",
    "window_features",
]

_NAN = float("nan")


def _signal(row: Sequence[float]) -> list[float]:
    """The row's values up to its first NaN."""
    values: list[float] = []
    for x in row:
        if math.isnan(x):
            break
        values.append(float(x))
    return values


def _padded(values: list[float], width: int) -> list[float]:
    return values + [_NAN] * (width - len(values))


def _rows(X: np.ndarray) -> list[list[float]]:
    rows: list[list[float]] = X.tolist()
    return rows


def _scale_row(row: Sequence[float], target: float, use_rms: bool) -> list[float]:
    values = _signal(row)
    n = len(values)
    if use_rms:
        s = 0.0
        for x in values:
            s += x * x
        level = math.sqrt(s / n) if n > 0 else 0.0
    else:
        level = max((abs(x) for x in values), default=0.0)
    if level > 0.0:
        scale = target / level
        values = [x * scale for x in values]
    return _padded(values, len(row))


def peak_normalize(X: np.ndarray, target: float) -> np.ndarray:
    """Reference for kernels.peak_normalize."""
    rows = [_scale_row(r, target, use_rms=False) for r in _rows(X)]
    return np.array(rows, dtype=float).reshape(X.shape)


def rms_normalize(X: np.ndarray, target: float) -> np.ndarray:
    """Reference for kernels.rms_normalize."""
    rows = [_scale_row(r, target, use_rms=True) for r in _rows(X)]
    return np.array(rows, dtype=float).reshape(X.shape)


def _trim_row(row: Sequence[float], threshold: float) -> list[float]:
    values = _signal(row)
    peak = max((abs(x) for x in values), default=0.0)
    if peak == 0.0:
        return [_NAN] * len(row)
    cut = threshold * peak
    loud = [j for j, x in enumerate(values) if abs(x) >= cut]
    return _padded(values[loud[0] : loud[-1] + 1], len(row))


def trim_silence(X: np.ndarray, threshold: float) -> np.ndarray:
    """Reference for kernels.trim_silence."""
    return np.array([_trim_row(r, threshold) for r in _rows(X)], dtype=float).reshape(X.shape)


def fft_radix2(
    re: Sequence[float], im: Sequence[float], cos_t: Sequence[float], sin_t: Sequence[float]
) -> tuple[list[float], list[float]]:
    """Reference for spectrum.fft_inplace: the textbook iterative radix-2 FFT, in natural order.

    Bit-reversal swaps, then stage by stage the butterfly (a + w*b, a - w*b) with w*b =
    (wr*br - wi*bi) + i*(wr*bi + wi*br) and w = cos_t[k*step] - i*sin_t[k*step], where cos_t,
    sin_t hold cos/sin(2*pi*k/table_n) for k < table_n // 2 (``spectrum.twiddles``). Written
    with float operations, not complex ones, to pin that order: the kernel must give the same
    values, whatever passes it groups the stages into.
    """
    m = len(re)
    table_n = 2 * len(cos_t)
    xr = [float(x) for x in re]
    xi = [float(x) for x in im]
    j = 0
    for i in range(1, m):
        bit = m >> 1
        while j & bit:
            j ^= bit
            bit >>= 1
        j |= bit
        if i < j:
            xr[i], xr[j] = xr[j], xr[i]
            xi[i], xi[j] = xi[j], xi[i]
    half = 1
    while half < m:
        step = table_n // (2 * half)
        for k in range(half):
            wr = float(cos_t[k * step])
            wi = -float(sin_t[k * step])
            for a in range(k, m, 2 * half):
                b = a + half
                tr = wr * xr[b] - wi * xi[b]
                ti = wr * xi[b] + wi * xr[b]
                xr[a], xr[b] = xr[a] + tr, xr[a] - tr
                xi[a], xi[b] = xi[a] + ti, xi[a] - ti
        half *= 2
    return xr, xi


# Lanes of the kernels' sums: kernels._LANES (the tests check that the two agree).
LANES = 64


def lane_sum(terms: Sequence[float]) -> float:
    """The kernels' order of a sum: term j goes to lane j % LANES, each lane adds in order from
    0.0, then the lanes fold in halves: lane[k] += lane[k + w] for w = LANES/2, .., 2, 1."""
    lanes = [0.0] * LANES
    for j, t in enumerate(terms):
        lanes[j % LANES] += t
    width = LANES
    while width > 1:
        width //= 2
        for k in range(width):
            lanes[k] = lanes[k] + lanes[k + width]
    return lanes[0]


def _band_energies(deviations: list[float], n_bands: int) -> list[float]:
    """Relative band energies of the mean-removed signal by a direct DFT."""
    n = len(deviations)
    if n < 2:
        return [0.0] * n_bands
    m = 1
    while m < n:
        m *= 2
    half = m // 2
    power = [0.0] * (half + 1)
    for k in range(1, half + 1):
        acc = 0j
        for j, d in enumerate(deviations):
            # Reduce k*j modulo m first so the angle stays small and exact.
            acc += d * cmath.exp(complex(0.0, -2.0 * math.pi * ((k * j) % m) / m))
        power[k] = acc.real * acc.real + acc.imag * acc.imag
    total = math.fsum(power[1:])
    if total == 0.0:
        return [0.0] * n_bands
    bands = []
    for b in range(n_bands):
        lo = 1 + b * half // n_bands
        hi = 1 + (b + 1) * half // n_bands
        bands.append(math.fsum(power[lo:hi]) / total)
    return bands


def row_features(row: Sequence[float], features: Sequence[str], n_bands: int) -> list[float]:
    """Reference features of one row, in the order of ``features`` (bands expanded)."""
    values = _signal(row)
    n = len(values)
    width = sum(n_bands if f == "bands" else 1 for f in features)
    if n == 0:
        return [_NAN] * width
    x0 = values[0]
    mean = x0 + lane_sum([x - x0 for x in values]) / n
    deviations = [x - mean for x in values]
    squares = [d * d for d in deviations]
    m2 = lane_sum(squares) / n
    m3 = lane_sum([d2 * d for d2, d in zip(squares, deviations, strict=True)]) / n
    m4 = lane_sum([d2 * d2 for d2 in squares]) / n
    sq = lane_sum([x * x for x in values])
    rms = math.sqrt(sq / n)
    peak = max(abs(x) for x in values)
    crossings = sum(1 for a, b in itertools.pairwise(values) if (a >= 0) != (b >= 0))
    scalars = {
        "mean": mean,
        "std": math.sqrt(m2),
        "rms": rms,
        "skew": m3 / (m2 * math.sqrt(m2)) if m2 > 0.0 else 0.0,
        "kurtosis": m4 / (m2 * m2) - 3.0 if m2 > 0.0 else 0.0,
        "ptp": max(values) - min(values),
        "crest": peak / rms if rms > 0.0 else 0.0,
        "zcr": crossings / (n - 1) if n >= 2 else 0.0,
    }
    out: list[float] = []
    for f in features:
        if f == "bands":
            out.extend(_band_energies(deviations, n_bands))
        else:
            out.append(scalars[f])
    return out


def window_features(X: np.ndarray, features: Sequence[str], n_bands: int) -> np.ndarray:
    """Reference for kernels.window_features, with features given by name."""
    width = sum(n_bands if f == "bands" else 1 for f in features)
    rows = [row_features(r, features, n_bands) for r in _rows(X)]
    return np.array(rows, dtype=float).reshape(X.shape[0], width)
