"""Drift statistics computed from binned counts alone, the same code on device and hub.

Every function takes two count vectors over the same slots, the baseline (``expected``) first
and the current window (``actual``) second. Counts may be int or float arrays; they must be 1-D,
of equal length, finite and non-negative, and each side must have a positive total, else
SketchError. Proportions are ``c / sum(c)``.

* :func:`psi` -- population stability index, ``sum((a - e) * ln(a / e))`` over proportions,
  with zero proportions replaced by ``eps`` (no renormalisation). Each term is >= 0, so PSI is
  >= 0 and never inf or NaN; equal proportions give exactly 0.
* :func:`js_distance` -- Jensen-Shannon distance, base 2, in [0, 1] (scipy's ``jensenshannon``).
* :func:`chi_square` -- Pearson chi-square test of homogeneity on the 2 x K table, slots empty on
  both sides dropped, no continuity correction (scipy's ``chi2_contingency(correction=False)``).
  The survival function is the regularized upper incomplete gamma ``Q(dof/2, x/2)``.
* :func:`ks_binned` -- two-sample Kolmogorov-Smirnov on binned data: the largest gap between the
  two cumulative proportions over slot boundaries. The p-value is the one scipy's
  ``ks_2samp(method="asymp")`` gives: the two-sided one-sample KS distribution ``D_N`` evaluated
  at ``N = round(n * m / (n + m))`` (half to even, at least 1), computed with Simard and
  L'Ecuyer's (2011) routing between exact (Durbin matrix, Smirnov's one-sided sum) and
  Pelz-Good asymptotic methods. Ties within a slot make it conservative.
* :func:`wasserstein_binned` -- W1 with all of a slot's mass at its position (see
  :func:`bin_positions`); numeric features only, W1 is not defined for categories.

Gates should use effect sizes (PSI, JS, W1), not bare p-values, which alarm on every large window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from fleet_protocol.errors import SketchError
from fleet_protocol.sketch import Sketch

FloatArray = npt.NDArray[np.float64]


class ChiSquareResult(NamedTuple):
    """Pearson chi-square test of homogeneity."""

    statistic: float
    p_value: float
    dof: int


class KSResult(NamedTuple):
    """Two-sample Kolmogorov-Smirnov test on binned data."""

    statistic: float
    p_value: float


@dataclass(frozen=True)
class DriftStats:
    """All statistics of one feature's baseline vs. current counts (totals as floats)."""

    psi: float
    js: float
    chi2_p: float
    ks: float
    ks_p: float
    wasserstein: float | None
    n_expected: float
    n_actual: float


def _vector(counts: npt.ArrayLike, side: str) -> FloatArray:
    try:
        v = np.asarray(counts, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise SketchError(f"{side} counts are not numbers: {err}") from err
    if v.ndim != 1 or v.size == 0:
        raise SketchError(f"{side} counts must be a non-empty 1-D vector, got shape {v.shape}")
    bad = ~np.isfinite(v) | (v < 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise SketchError(f"{side} count {i} is {float(v[i])!r}, expected a finite number >= 0")
    if not v.sum() > 0:
        raise SketchError(
            f"{side} counts have no observations (total 0); drift needs rows on both sides"
        )
    return v


def _pair(expected: npt.ArrayLike, actual: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    e = _vector(expected, "expected")
    a = _vector(actual, "actual")
    if e.shape != a.shape:
        raise SketchError(
            f"expected has {e.size} slots and actual {a.size}, expected the same slots"
        )
    return e, a


PSI_EPSILON = 1e-4


def _proportions(counts: FloatArray) -> FloatArray:
    return counts / counts.sum(axis=-1, keepdims=True)


def psi_rows(expected: npt.ArrayLike, actual: npt.ArrayLike,
             eps: float = PSI_EPSILON) -> FloatArray:
    """Row-wise :func:`psi` over stacks of count vectors (no validation; for calibration)."""
    p = _proportions(np.asarray(expected, dtype=np.float64))
    q = _proportions(np.asarray(actual, dtype=np.float64))
    p = np.where(p > 0, p, eps)
    q = np.where(q > 0, q, eps)
    out: FloatArray = np.sum((q - p) * np.log(q / p), axis=-1)
    return out


def js_rows(expected: npt.ArrayLike, actual: npt.ArrayLike) -> FloatArray:
    """Row-wise :func:`js_distance` over stacks of count vectors (no validation)."""
    p = _proportions(np.asarray(expected, dtype=np.float64))
    q = _proportions(np.asarray(actual, dtype=np.float64))
    m = 0.5 * (p + q)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_p = np.where(p > 0, p * np.log2(p / m), 0.0)
        kl_q = np.where(q > 0, q * np.log2(q / m), 0.0)
    out: FloatArray = np.sqrt(np.maximum(0.5 * (kl_p.sum(axis=-1) + kl_q.sum(axis=-1)), 0.0))
    return out


def psi(expected: npt.ArrayLike, actual: npt.ArrayLike, eps: float = PSI_EPSILON) -> float:
    """Population stability index; zero proportions become ``eps`` (0 < eps < 1)."""
    if not 0.0 < eps < 1.0:
        raise SketchError(f"psi eps is {eps!r}, expected 0 < eps < 1")
    e, a = _pair(expected, actual)
    p = e / e.sum()
    q = a / a.sum()
    p = np.where(p > 0, p, eps)
    q = np.where(q > 0, q, eps)
    return float(np.sum((q - p) * np.log(q / p)))


def js_distance(expected: npt.ArrayLike, actual: npt.ArrayLike) -> float:
    """Jensen-Shannon distance in base 2: sqrt of the JS divergence, in [0, 1]."""
    e, a = _pair(expected, actual)
    p = e / e.sum()
    q = a / a.sum()
    m = (p + q) / 2.0

    def kl_to_m(x: FloatArray) -> float:
        pos = x > 0
        return float(np.sum(x[pos] * np.log(x[pos] / m[pos])))

    div = (kl_to_m(p) + kl_to_m(q)) / math.log(2.0) / 2.0
    return math.sqrt(min(max(div, 0.0), 1.0))


def chi_square(expected: npt.ArrayLike, actual: npt.ArrayLike) -> ChiSquareResult:
    """Chi-square test of homogeneity on the 2 x K table of non-empty slots."""
    e, a = _pair(expected, actual)
    keep = (e + a) > 0
    observed = np.vstack([e[keep], a[keep]])
    dof = int(observed.shape[1]) - 1
    if dof == 0:
        return ChiSquareResult(0.0, 1.0, 0)
    rows = observed.sum(axis=1)
    cols = observed.sum(axis=0)
    fitted = np.outer(rows, cols) / observed.sum()
    stat = float(np.sum((observed - fitted) ** 2 / fitted))
    return ChiSquareResult(stat, chi2_sf(stat, dof), dof)


def chi2_sf(x: float, dof: int) -> float:
    """Survival function of the chi-square distribution: ``Q(dof / 2, x / 2)``."""
    if dof <= 0:
        raise SketchError(f"chi-square dof is {dof}, expected >= 1")
    if x <= 0.0:
        return 1.0
    return _gamma_q(dof / 2.0, x / 2.0)


_SMIRNOV_MAX_EXACT_N = 1_000_000
_TINY = 1e-300
_EPS = np.finfo(np.float64).eps
_MAX_ITER = 100_000


def _gamma_q(a: float, x: float) -> float:
    """Regularized upper incomplete gamma Q(a, x) (Numerical Recipes ``gammq``)."""
    log_prefactor = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1.0:
        # Series for P(a, x); Q = 1 - P is not small here, so no cancellation to fear.
        ap, term, total = a, 1.0 / a, 1.0 / a
        for _ in range(_MAX_ITER):
            ap += 1.0
            term *= x / ap
            total += term
            if abs(term) < abs(total) * _EPS:
                return max(0.0, 1.0 - total * math.exp(log_prefactor))
        raise SketchError(f"incomplete gamma series did not converge (a={a}, x={x})")
    # Continued fraction for Q(a, x), modified Lentz: relative accuracy even in the far tail.
    b = x + 1.0 - a
    c = 1.0 / _TINY
    d = 1.0 / b
    h = d
    for i in range(1, _MAX_ITER):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = _TINY if abs(d) < _TINY else d
        c = b + an / c
        c = _TINY if abs(c) < _TINY else c
        d = 1.0 / d
        step = d * c
        h *= step
        if abs(step - 1.0) < _EPS:
            return math.exp(log_prefactor + math.log(h))
    raise SketchError(f"incomplete gamma fraction did not converge (a={a}, x={x})")


def ks_binned(expected: npt.ArrayLike, actual: npt.ArrayLike) -> KSResult:
    """Two-sample KS statistic over slot boundaries and its p-value (see module docstring)."""
    e, a = _pair(expected, actual)
    n, m = float(e.sum()), float(a.sum())
    stat = float(np.max(np.abs(np.cumsum(e) / n - np.cumsum(a) / m)))
    big, small = max(n, m), min(n, m)
    n_eff = max(1, round(big * small / (big + small)))
    return KSResult(stat, kolmogorov_smirnov_sf(n_eff, stat))


def kolmogorov_smirnov_sf(n: int, d: float) -> float:
    """P(D_n >= d) of the two-sided one-sample KS statistic (scipy's ``kstwo.sf(d, n)``)."""
    if n < 1:
        raise SketchError(f"KS sample size is {n}, expected >= 1")
    if d >= 1.0:
        return 0.0
    t = n * d
    if t <= 0.5:
        return 1.0
    if t <= 1.0:  # Ruben-Gambino: P(D_n < d) = n!/n^n (2t - 1)^n
        cdf = math.exp(math.lgamma(n + 1) - n * math.log(n) + n * math.log(2 * t - 1))
        return _clip(1.0 - cdf)
    if t >= n - 1:  # Ruben-Gambino, upper end
        return _clip(2.0 * (1.0 - d) ** n)
    if d >= 0.5:  # the one-sided events cannot both happen: exact
        return _clip(2.0 * _smirnov_sf(n, d))
    nd2 = t * d
    if n <= 140:
        if nd2 <= 4.0:
            return _clip(1.0 - _durbin_cdf(n, d))
        return _clip(2.0 * _smirnov_sf(n, d))
    if nd2 >= 370.0:
        return 0.0
    if nd2 >= 2.2:
        return _clip(2.0 * _smirnov_sf(n, d))
    if n <= 100_000 and n * d**1.5 <= 1.4:
        return _clip(1.0 - _durbin_cdf(n, d))
    return _clip(1.0 - _pelz_good_cdf(n, d))


def _clip(p: float) -> float:
    return min(max(p, 0.0), 1.0)


def _log_factorial(k: npt.NDArray[np.float64]) -> FloatArray:
    """log(k!) for arrays of non-negative integers (Stirling series above 255, exact below)."""
    small = np.array([math.lgamma(i + 1.0) for i in range(256)])
    kk = np.maximum(k, 256.0)
    inv = 1.0 / kk
    inv2 = inv * inv
    series = inv * (1 / 12 - inv2 * (1 / 360 - inv2 * (1 / 1260 - inv2 / 1680)))
    big = (kk + 0.5) * np.log(kk) - kk + 0.5 * math.log(2 * math.pi) + series
    return np.where(k < 256, small[np.minimum(k, 255).astype(np.int64)], big)


def _smirnov_sf(n: int, d: float) -> float:
    """P(D+_n >= d), one-sided: the exact Smirnov / Birnbaum-Tingey sum in log space.

    About n terms (0.1-0.3 s at n = 10^6 on a small CPU); above a million, like scipy, the
    approximation ``exp(-(6nd + 1)^2 / (18n))`` instead.
    """
    if n > _SMIRNOV_MAX_EXACT_N:
        return math.exp(-((6.0 * n * d + 1.0) ** 2) / 18.0 / n)
    last = math.floor(n * (1.0 - d))
    total = 0.0
    log_n_fact = float(_log_factorial(np.array([float(n)]))[0])
    chunk = 1 << 20
    for start in range(0, last + 1, chunk):
        j = np.arange(start, min(last + 1, start + chunk), dtype=np.float64)
        lo = d + j / n
        hi = 1.0 - lo
        with np.errstate(divide="ignore"):
            log_terms = (
                log_n_fact
                - _log_factorial(j)
                - _log_factorial(n - j)
                + (j - 1.0) * np.log(lo)
                + (n - j) * np.log(hi)
            )
        total += float(np.sum(np.exp(log_terms)))
    return d * total


def _durbin_cdf(n: int, d: float) -> float:
    """P(D_n < d) exactly: Durbin's matrix method as organised by Marsaglia, Tsang and Wang."""
    k = math.ceil(n * d)
    h = k - n * d
    m = 2 * k - 1
    i = np.arange(m)
    diff = i[:, None] - i[None, :] + 1  # H[i, j] = 1 / (i - j + 1)! where i - j + 1 >= 0
    fact = np.array([float(math.factorial(x)) if x <= 170 else math.inf for x in range(m + 1)])
    hmat = np.where(diff >= 0, 1.0 / fact[np.clip(diff, 0, m)], 0.0)
    hpow = h ** np.arange(1, m + 1)
    hmat[:, 0] -= hpow / fact[1 : m + 1]
    hmat[m - 1, :] -= hpow[::-1] / fact[1 : m + 1][::-1]
    if 2 * h - 1 > 0:
        hmat[m - 1, 0] += (2 * h - 1) ** m / fact[m]
    # Matrix power by squaring, each factor kept as (matrix, power-of-two exponent).
    result, result_exp = np.eye(m), 0
    base, base_exp = _rescale(hmat, 0)
    power = n
    while power:
        if power & 1:
            result = result @ base
            result_exp += base_exp
            result, result_exp = _rescale(result, result_exp)
        power >>= 1
        if power:
            base = base @ base
            base, base_exp = _rescale(base, 2 * base_exp)
    entry = float(result[k - 1, k - 1])
    if entry <= 0.0:
        return 0.0
    log_cdf = math.log(entry) + result_exp * math.log(2.0) + math.lgamma(n + 1) - n * math.log(n)
    return _clip(math.exp(log_cdf))


def _rescale(mat: FloatArray, exp2: int) -> tuple[FloatArray, int]:
    top = float(np.max(np.abs(mat)))
    if top == 0.0 or not math.isfinite(top):
        return mat, exp2
    shift = math.frexp(top)[1]
    scaled = mat * 2.0**-shift
    # Entries this far below the largest cannot matter, and products that underflow into
    # subnormals slow matmul a hundredfold.
    scaled[np.abs(scaled) < 1e-140] = 0.0
    return scaled, exp2 + shift


def _pelz_good_cdf(n: int, d: float) -> float:
    """P(D_n <= d) by the Pelz-Good (1976) asymptotic series (four terms in 1/sqrt(n))."""
    z = math.sqrt(n) * d
    if -(math.pi**2) / 8 / z**2 < -745.0:
        return 0.0
    pi2, pi4, pi6 = math.pi**2, math.pi**4, math.pi**6
    z2, z4, z6 = z * z, z**4, z**6
    kmax = math.ceil(16 * z / math.pi)
    k = np.arange(1, kmax + 1, dtype=np.float64)
    mm = (2 * k - 1) ** 2  # squares of odd numbers
    q = np.exp(-pi2 * mm / (8 * z2))
    r = np.exp(-pi2 * k * k / (2 * z2))
    root = math.sqrt(2 * math.pi)
    k0 = root / z * np.sum(q)
    k1 = root / (6 * z4) * np.sum((pi2 * mm / 4 - z2) * q)
    k2 = root / (72 * z**7) * np.sum(
        (6 * z6 + 2 * z4 + (2 * z4 - 5 * z2) * pi2 * mm / 4 + pi4 * (1 - 2 * z2) * mm**2 / 16) * q
    ) - pi2 * root / (36 * z**3) * np.sum(k * k * r)
    k3 = root / (6480 * z**10) * np.sum(
        (
            -30 * z6
            - 90 * z**8
            + pi2 * (135 * z4 - 96 * z6) * mm / 4
            + pi4 * (212 * z4 - 60 * z2) * mm**2 / 16
            + pi6 * (5 - 30 * z2) * mm**3 / 64
        )
        * q
    ) + pi2 * root / (216 * z6) * np.sum((3 * z2 - pi2 * k * k) * k * k * r)
    rn = math.sqrt(n)
    return _clip(float(k0 + k1 / rn + k2 / n + k3 / (n * rn)))


def bin_positions(edges: npt.ArrayLike) -> FloatArray:
    """One position per numeric slot: inner-bin midpoints, under/overflow half a bin outside.

    The underflow sits at ``edges[0] - w_first / 2`` and the overflow at
    ``edges[-1] + w_last / 2``, where ``w_first`` / ``w_last`` are the first / last inner widths.
    """
    e = np.asarray(edges, dtype=np.float64)
    if e.ndim != 1 or e.size < 2 or not np.all(np.isfinite(e)) or not np.all(np.diff(e) > 0):
        raise SketchError(
            f"bin edges {e.tolist()!r} must be finite, strictly increasing, at least 2 values"
        )
    mids = (e[:-1] + e[1:]) / 2.0
    under = e[0] - (e[1] - e[0]) / 2.0
    over = e[-1] + (e[-1] - e[-2]) / 2.0
    return np.concatenate([[under], mids, [over]])


def wasserstein_binned(
    expected: npt.ArrayLike, actual: npt.ArrayLike, positions: npt.ArrayLike
) -> float:
    """W1 distance with each slot's mass at ``positions[i]`` (any order, finite)."""
    e, a = _pair(expected, actual)
    pos = np.asarray(positions, dtype=np.float64)
    if pos.shape != e.shape or not np.all(np.isfinite(pos)):
        raise SketchError(
            f"positions must be {e.size} finite numbers, one per slot, got shape {pos.shape}"
        )
    order = np.argsort(pos, kind="stable")
    p = pos[order]
    cdf_e = np.cumsum(e[order])[:-1] / e.sum()
    cdf_a = np.cumsum(a[order])[:-1] / a.sum()
    return float(np.sum(np.abs(cdf_e - cdf_a) * np.diff(p)))


def compare(
    expected_counts: npt.ArrayLike,
    actual_counts: npt.ArrayLike,
    positions: npt.ArrayLike | None = None,
) -> DriftStats:
    """Every statistic of one feature; ``wasserstein`` only when positions are given."""
    e, a = _pair(expected_counts, actual_counts)
    ks = ks_binned(e, a)
    return DriftStats(
        psi=psi(e, a),
        js=js_distance(e, a),
        chi2_p=chi_square(e, a).p_value,
        ks=ks.statistic,
        ks_p=ks.p_value,
        wasserstein=None if positions is None else wasserstein_binned(e, a, positions),
        n_expected=float(e.sum()),
        n_actual=float(a.sum()),
    )


def compare_feature(expected: Sketch, actual: Sketch, j: int) -> DriftStats:
    """:func:`compare` on feature ``j`` of two sketches of one layout (missing rows excluded)."""
    if expected.layout.fingerprint() != actual.layout.fingerprint():
        raise SketchError(
            f"cannot compare sketches of layouts {expected.layout.fingerprint()} and "
            f"{actual.layout.fingerprint()}"
        )
    if not 0 <= j < expected.layout.n_features:
        raise SketchError(f"feature index {j} is out of range 0..{expected.layout.n_features - 1}")
    f = expected.layout.features[j]
    positions = bin_positions(f.edges) if f.kind == "numeric" else None
    try:
        return compare(expected.feature_counts(j), actual.feature_counts(j), positions)
    except SketchError as err:
        raise SketchError(f"feature {f.name!r}: {err}") from err
