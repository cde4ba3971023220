"""The numba preprocessing kernels agree with their plain-Python references, and with hand math."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.preprocess import kernels, reference, spectrum
from edge_agent.preprocess.spec import WINDOW_FEATURES

# Compilation (or loading numba's cache) happens on the first example, so no per-example deadline.
SETTINGS = settings(deadline=None, max_examples=150)

# Sane physical range: |x| <= 1e3, nonzero magnitudes >= 1e-30 (kernels.py documents why far
# smaller values are out of scope: their squares underflow).
_magnitudes = st.floats(min_value=1e-30, max_value=1e3, allow_subnormal=False)
VALUES = st.one_of(
    st.just(0.0),
    st.integers(-1000, 1000).map(float),
    st.tuples(_magnitudes, st.booleans()).map(lambda t: -t[0] if t[1] else t[0]),
)


@st.composite
def signal_batches(draw: st.DrawFn, max_rows: int = 6, max_width: int = 40) -> np.ndarray:
    """A (n_rows, L) float64 batch of NaN-padded rows: random, constant, short and empty."""
    n_rows = draw(st.integers(0, max_rows))
    width = draw(st.integers(0, max_width))
    rows = []
    for _ in range(n_rows):
        length = min(width, draw(st.one_of(st.sampled_from([0, 1, 2]), st.integers(0, width))))
        if draw(st.booleans()):
            values = [draw(VALUES)] * length
        else:
            values = draw(st.lists(VALUES, min_size=length, max_size=length))
        tail = [math.nan] * (width - length)
        if len(tail) > 1 and draw(st.booleans()):
            # Values after the first NaN are not part of the signal and must be ignored.
            tail[1:] = draw(st.lists(VALUES, min_size=len(tail) - 1, max_size=len(tail) - 1))
        rows.append(values + tail)
    return np.array(rows, dtype=np.float64).reshape(n_rows, width)


FEATURE_LISTS = st.lists(st.sampled_from(WINDOW_FEATURES), min_size=1, unique=True)


def _codes(features: list[str]) -> np.ndarray:
    return np.array([WINDOW_FEATURES.index(f) for f in features], dtype=np.int64)


def _signal(row: np.ndarray) -> np.ndarray:
    nan = np.flatnonzero(np.isnan(row))
    return row[: nan[0]] if nan.size else row


def _assert_rows_close(actual: np.ndarray, expected: np.ndarray) -> None:
    """Same NaN layout; values within rtol 1e-7 and atol 1e-9 * the row's magnitude."""
    assert actual.shape == expected.shape
    assert actual.dtype == np.float64
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected))
    for got, want in zip(actual, expected, strict=True):
        finite = want[~np.isnan(want)]
        scale = float(np.max(np.abs(finite))) if finite.size else 0.0
        np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-9 * scale, equal_nan=True)


@SETTINGS
@given(X=signal_batches(), target=st.floats(1e-3, 1e3))
def test_peak_normalize_matches_reference(X: np.ndarray, target: float) -> None:
    """peak_normalize equals the plain-Python reference on arbitrary NaN-padded batches."""
    _assert_rows_close(kernels.peak_normalize(X, target), reference.peak_normalize(X, target))


@SETTINGS
@given(X=signal_batches(), target=st.floats(1e-3, 1e3))
def test_rms_normalize_matches_reference(X: np.ndarray, target: float) -> None:
    """rms_normalize equals the plain-Python reference on arbitrary NaN-padded batches."""
    _assert_rows_close(kernels.rms_normalize(X, target), reference.rms_normalize(X, target))


@SETTINGS
@given(X=signal_batches(), threshold=st.floats(1e-6, 0.999))
def test_trim_silence_matches_reference(X: np.ndarray, threshold: float) -> None:
    """trim_silence equals the plain-Python reference on arbitrary NaN-padded batches."""
    _assert_rows_close(kernels.trim_silence(X, threshold), reference.trim_silence(X, threshold))


_SCALED = {"mean", "std", "rms", "ptp"}  # carry the signal's units; the rest are ratios


@SETTINGS
@given(X=signal_batches(), features=FEATURE_LISTS, n_bands=st.integers(1, 64))
def test_window_features_match_reference(X: np.ndarray, features: list[str], n_bands: int) -> None:
    """window_features (FFT bands) equals the reference (direct DFT) feature by feature."""
    got = kernels.window_features(X, _codes(features), n_bands)
    want = reference.window_features(X, features, n_bands)
    assert got.shape == want.shape == (X.shape[0], kernels.n_outputs(_codes(features), n_bands))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    names = [n for f in features for n in ([f] * n_bands if f == "bands" else [f])]
    for i, row in enumerate(X):
        signal = _signal(row)
        if signal.size == 0:
            continue
        scale = float(np.max(np.abs(signal)))
        moments = reference.row_features(row, ["mean", "std"], 1)
        negligible_m2 = moments[1] ** 2 <= 1e-12 * moments[0] ** 2
        for col, name in enumerate(names):
            g, w = got[i, col], want[i, col]
            if name in ("skew", "kurtosis") and negligible_m2:
                # Spread lost in the mean's rounding: any finite value is as right as another.
                assert math.isfinite(g) and math.isfinite(w), (name, g, w)
                continue
            atol = 1e-9 * scale if name in _SCALED else 1e-9
            assert math.isclose(g, w, rel_tol=1e-7, abs_tol=atol), (name, row, g, w)


@SETTINGS
@given(X=signal_batches(max_rows=4), features=FEATURE_LISTS, n_bands=st.integers(1, 16))
def test_window_features_rows_are_independent(
    X: np.ndarray, features: list[str], n_bands: int
) -> None:
    """A batch gives bit-for-bit the rows computed one at a time (no state leaks between rows)."""
    codes = _codes(features)
    batch = kernels.window_features(X, codes, n_bands)
    for i in range(X.shape[0]):
        single = kernels.window_features(np.ascontiguousarray(X[i : i + 1]), codes, n_bands)
        np.testing.assert_array_equal(batch[i : i + 1], single)


@SETTINGS
@given(X=signal_batches(), features=FEATURE_LISTS, n_bands=st.integers(1, 64))
def test_window_features_with_cached_tables(
    X: np.ndarray, features: list[str], n_bands: int
) -> None:
    """window_features_with and the tables of twiddles_for give exactly window_features."""
    codes = _codes(features)
    tables = kernels.twiddles_for(X.shape[1])
    assert kernels.twiddles_for(X.shape[1]) is tables
    np.testing.assert_array_equal(
        kernels.window_features_with(X, codes, n_bands, *tables),
        kernels.window_features(X, codes, n_bands),
    )


# Lengths around the lane count of the kernels' sums (kernels._LANES == 64): tails of every kind.
_LANE_LENGTHS = [1, 2, 3, 5, 7, 9, 63, 64, 65, 127, 128, 129, 191, 192, 193, 255, 256, 257]


@st.composite
def long_rows(draw: st.DrawFn) -> np.ndarray:
    """One NaN-padded row of up to 300 samples, its length often next to a multiple of 64."""
    width = draw(st.integers(1, 300))
    length = min(width, draw(st.one_of(st.sampled_from(_LANE_LENGTHS), st.integers(1, width))))
    if draw(st.booleans()):
        values = [draw(VALUES)] * length
    else:
        values = draw(st.lists(VALUES, min_size=length, max_size=length))
    tail = [math.nan] * (width - length)
    if len(tail) > 1 and draw(st.booleans()):
        tail[1:] = [draw(VALUES)] * (len(tail) - 1)
    return np.array([values + tail], dtype=np.float64)


def test_reference_uses_the_kernels_lanes() -> None:
    """The reference sums in as many lanes as the kernels."""
    assert reference.LANES == kernels._LANES


@SETTINGS
@given(X=long_rows())
def test_scalar_features_match_reference_bit_for_bit(X: np.ndarray) -> None:
    """The scalar features are the reference's exactly: both sum in the same lanes and order."""
    scalars = list(WINDOW_FEATURES[:-1])
    got = kernels.window_features(X, _codes(scalars), 1)[0]
    want = np.array(reference.row_features(X[0], scalars, 1))
    np.testing.assert_array_equal(got, want)


@SETTINGS
@given(values=st.lists(VALUES, max_size=300), data=st.data())
def test_lane_sum_matches_reference(values: list[float], data: st.DataObject) -> None:
    """kernels._lane_sum of x[start:stop] is reference.lane_sum of that slice, bit for bit."""
    start = data.draw(st.integers(0, len(values)))
    stop = data.draw(st.integers(start, len(values)))
    x = np.array(values, dtype=np.float64)
    got = kernels._lane_sum(x, start, stop, np.empty(kernels._LANES))
    assert got == reference.lane_sum(values[start:stop])


@SETTINGS
@given(X=long_rows())
def test_long_rows_bands_match_reference(X: np.ndarray) -> None:
    """Band energies of rows longer than a block of lanes agree with the reference's DFT."""
    got = kernels.window_features(X, _codes(["bands"]), 4)
    want = reference.window_features(X, ["bands"], 4)
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-9)


@st.composite
def fft_inputs(draw: st.DrawFn) -> tuple[int, int, list[float], list[float]]:
    """(h, table_n, re, im): an h-point signal and tables for up to 8x longer FFTs."""
    h = 2 ** draw(st.integers(0, 9))
    table_n = 2 * h * 2 ** draw(st.integers(0, 3))
    re = draw(st.lists(VALUES, min_size=h, max_size=h))
    im = draw(st.lists(VALUES, min_size=h, max_size=h))
    return h, table_n, re, im


def _fft_kernel(h: int, table_n: int, re: list[float], im: list[float]) -> np.ndarray:
    """spectrum.fft_inplace on natural-order input, permuted by the tables' ``rev``."""
    w_re, w_im, rev = spectrum.fft_tables(table_n)
    shift = (table_n // 2 // h).bit_length() - 1
    positions = rev[:h] >> shift
    zr = np.empty(h)
    zi = np.empty(h)
    zr[positions] = re
    zi[positions] = im
    spectrum.fft_inplace(zr, zi, h, w_re, w_im)
    return zr + 1j * zi


@SETTINGS
@given(args=fft_inputs())
def test_fft_matches_textbook_radix2(args: tuple[int, int, list[float], list[float]]) -> None:
    """The FFT gives the textbook radix-2 loop's values exactly, with bit reversal by table."""
    h, table_n, re, im = args
    cos_t, sin_t = spectrum.twiddles(table_n)
    want_re, want_im = reference.fft_radix2(re, im, cos_t.tolist(), sin_t.tolist())
    got = _fft_kernel(h, table_n, re, im)
    np.testing.assert_array_equal(got.real, want_re)
    np.testing.assert_array_equal(got.imag, want_im)


@SETTINGS
@given(args=fft_inputs())
def test_fft_matches_numpy(args: tuple[int, int, list[float], list[float]]) -> None:
    """The FFT is the DFT: it agrees with np.fft.fft to rounding."""
    h, table_n, re, im = args
    z = np.array(re) + 1j * np.array(im)
    scale = float(np.sum(np.abs(z)))
    np.testing.assert_allclose(_fft_kernel(h, table_n, re, im), np.fft.fft(z), rtol=0,
                               atol=1e-13 * scale)


@SETTINGS
@given(args=fft_inputs())
def test_half_spectrum_from_natural_order(args: tuple[int, int, list[float], list[float]]) -> None:
    """half_spectrum_power_of (input gathered from natural order) gives half_spectrum_power's
    values exactly."""
    h, table_n, re, im = args
    w_re, w_im, rev = spectrum.fft_tables(table_n)
    d = np.empty(2 * h)
    d[0::2] = re
    d[1::2] = im
    shift = (table_n // 2 // h).bit_length() - 1
    zr = np.empty(h)
    zi = np.empty(h)
    zr[rev[:h] >> shift] = re
    zi[rev[:h] >> shift] = im
    want = np.full(h + 1, np.nan)
    spectrum.half_spectrum_power(h, zr, zi, want, w_re, w_im)
    got = np.full(h + 1, np.nan)
    scratch_re = np.full(h, np.nan)
    scratch_im = np.full(h, np.nan)
    spectrum.half_spectrum_power_of(d, h, rev, scratch_re, scratch_im, got, w_re, w_im)
    np.testing.assert_array_equal(got[1:], want[1:])


@pytest.mark.parametrize("table_n", [1, 2, 4, 8, 64, 2048])
def test_fft_tables(table_n: int) -> None:
    """Per-stage twiddles are copies of the cos/sin table; rev is the bit-reversal permutation."""
    w_re, w_im, rev = spectrum.fft_tables(table_n)
    cos_t, sin_t = spectrum.twiddles(table_n)
    half = 1
    while half < table_n:
        k = np.arange(half)
        np.testing.assert_array_equal(w_re[half : 2 * half], cos_t[k * (table_n // (2 * half))])
        np.testing.assert_array_equal(w_im[half : 2 * half], -sin_t[k * (table_n // (2 * half))])
        angle = np.pi * k / half
        np.testing.assert_allclose(w_re[half : 2 * half] + 1j * w_im[half : 2 * half],
                                   np.exp(-1j * angle), rtol=0, atol=1e-15)
        half *= 2
    points = table_n // 2
    bits = max(points.bit_length() - 1, 0)
    want = [int(format(j, f"0{bits}b")[::-1], 2) if bits else 0 for j in range(points)]
    assert rev[:points].tolist() == want


@settings(deadline=None, max_examples=60)
@given(X=signal_batches(max_width=24), n_bands=st.integers(1, 8))
def test_reference_features_match_numpy_and_scipy(X: np.ndarray, n_bands: int) -> None:
    """The reference itself agrees with np.std, scipy.stats skew/kurtosis and np.fft bands."""
    for row in X:
        x = _signal(row)
        if x.size < 2 or np.ptp(x) <= 1e-6 * np.max(np.abs(x)):
            continue
        std, skew, kurtosis = reference.row_features(row, ["std", "skew", "kurtosis"], 1)
        scale = float(np.max(np.abs(x)))
        assert math.isclose(std, float(np.std(x)), rel_tol=1e-9, abs_tol=1e-12 * scale)
        assert math.isclose(skew, float(scipy.stats.skew(x)), rel_tol=1e-6, abs_tol=1e-6)
        assert math.isclose(kurtosis, float(scipy.stats.kurtosis(x)), rel_tol=1e-6, abs_tol=1e-6)
        m = 1 << (x.size - 1).bit_length()
        power = np.abs(np.fft.rfft(x - x.mean(), n=m))[1:] ** 2  # bins 1..m/2
        half = m // 2
        edges = [1 + b * half // n_bands for b in range(n_bands + 1)]
        expected = [
            power[lo - 1 : hi - 1].sum() / power.sum() for lo, hi in itertools.pairwise(edges)
        ]
        np.testing.assert_allclose(
            reference.row_features(row, ["bands"], n_bands), expected, rtol=1e-6, atol=1e-9
        )


def _features(row: list[float], n_bands: int = 4) -> dict[str, float]:
    X = np.array([row], dtype=np.float64)
    values = kernels.window_features(X, _codes(list(WINDOW_FEATURES)), n_bands)[0]
    names = list(WINDOW_FEATURES[:-1]) + [f"band_{b}" for b in range(n_bands)]
    return dict(zip(names, values.tolist(), strict=True))


@pytest.mark.parametrize(("cycles", "band"), [(3, 0), (40, 1), (70, 2), (100, 3), (128, 3)])
def test_sine_energy_lands_in_its_band(cycles: int, band: int) -> None:
    """A sine of k cycles per 256-sample window puts all its energy in the band holding bin k."""
    t = np.arange(256)
    feats = _features(np.cos(2 * np.pi * cycles * t / 256).tolist())
    bands = [feats[f"band_{b}"] for b in range(4)]
    assert bands[band] == pytest.approx(1.0, abs=1e-12)
    assert sum(bands) == pytest.approx(1.0, abs=1e-12)


def test_sine_crest_factor_is_sqrt2() -> None:
    """A whole number of sine periods has crest factor sqrt(2), std = rms = 1/sqrt(2), zero mean."""
    t = np.arange(1024)
    feats = _features(np.sin(2 * np.pi * 8 * t / 1024).tolist())
    assert feats["crest"] == pytest.approx(math.sqrt(2), rel=1e-12)
    assert feats["rms"] == pytest.approx(1 / math.sqrt(2), rel=1e-12)
    assert feats["std"] == pytest.approx(1 / math.sqrt(2), rel=1e-12)
    assert feats["mean"] == pytest.approx(0.0, abs=1e-12)
    assert feats["ptp"] == pytest.approx(2.0, rel=1e-12)


@pytest.mark.parametrize(
    ("row", "zcr"),
    [
        ([1.0, -1.0] * 8, 1.0),
        ([0.0, -1.0, 0.0, -1.0], 1.0),  # zero counts as non-negative
        ([0.0, 1.0, 0.0, 1.0], 0.0),
        ([-0.0, 2.0, 3.0], 0.0),  # -0.0 >= 0 too
        ([1.0, 2.0, -3.0, -4.0, 5.0], 0.5),
        ([5.0], 0.0),
    ],
)
def test_zero_crossing_rate(row: list[float], zcr: float) -> None:
    """zcr is the fraction of the n-1 adjacent pairs whose sign (x >= 0 vs x < 0) differs."""
    assert _features(row)["zcr"] == zcr


def test_trim_silence_hand_example() -> None:
    """[0,0,0.5,1,0.2,0,0] at threshold 0.1 keeps [0.5,1,0.2] shifted to the start, NaN after."""
    X = np.array([[0, 0, 0.5, 1, 0.2, 0, 0]], dtype=np.float64)
    out = kernels.trim_silence(X, 0.1)
    np.testing.assert_array_equal(out, [[0.5, 1, 0.2, np.nan, np.nan, np.nan, np.nan]])


def test_trim_silence_keeps_samples_exactly_at_the_threshold() -> None:
    """Only |x| strictly below threshold * max|x| is silence; a sample equal to it is kept."""
    X = np.array([[0.1, 0.25, 1.0, -0.25, 0.0]])
    out = kernels.trim_silence(X, 0.25)
    np.testing.assert_array_equal(out, [[0.25, 1.0, -0.25, np.nan, np.nan]])


def test_trim_silence_empties_silent_rows() -> None:
    """All-zero and empty rows trim to empty rows (all NaN)."""
    X = np.array([[0.0, 0.0, 0.0], [np.nan, 1.0, 2.0]])
    assert np.isnan(kernels.trim_silence(X, 0.5)).all()


def test_normalizers_hand_examples() -> None:
    """peak scales max|x| to target, rms scales RMS to target, zero/empty rows pass unchanged."""
    X = np.array([[1.0, -2.0, np.nan], [2.0, 2.0, 2.0], [0.0, 0.0, np.nan], [np.nan] * 3])
    peak = kernels.peak_normalize(X, 1.0)
    np.testing.assert_array_equal(peak[0], [0.5, -1.0, np.nan])
    np.testing.assert_array_equal(peak[1], [1.0, 1.0, 1.0])
    rms = kernels.rms_normalize(X, 0.1)
    np.testing.assert_allclose(rms[1], [0.1, 0.1, 0.1], rtol=1e-15)
    for out in (peak, rms):
        np.testing.assert_array_equal(out[2:], X[2:])


def test_constant_rows_have_exactly_zero_shape_features() -> None:
    """A constant row has skew, kurtosis, zcr and every band exactly 0, not rounding noise."""
    feats = _features([0.1] * 7)
    assert feats["mean"] == 0.1
    assert feats["std"] == 0.0
    assert feats["crest"] == pytest.approx(1.0, rel=1e-15)
    for name in ("skew", "kurtosis", "ptp", "zcr", "band_0", "band_1", "band_2", "band_3"):
        assert feats[name] == 0.0, name


def test_short_and_empty_rows() -> None:
    """Length 0 gives NaN everywhere; length 1 gives its value, zero spread and zero ratios."""
    X = np.array([[np.nan, 1.0], [-3.0, np.nan]])
    out = kernels.window_features(X, _codes(list(WINDOW_FEATURES)), 2)
    assert np.isnan(out[0]).all()
    # mean std rms skew kurtosis ptp crest zcr band_0 band_1
    np.testing.assert_array_equal(out[1], [-3.0, 0.0, 3.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])


def test_values_after_the_first_nan_are_ignored() -> None:
    """Samples after a row's first NaN are not part of its signal for any kernel."""
    X = np.array([[1.0, -2.0, np.nan, 50.0, 60.0]])
    clean = np.array([[1.0, -2.0, np.nan, np.nan, np.nan]])
    codes = _codes(list(WINDOW_FEATURES))
    np.testing.assert_array_equal(
        kernels.window_features(X, codes, 4), kernels.window_features(clean, codes, 4)
    )
    for out in (kernels.peak_normalize(X, 1.0), kernels.trim_silence(X, 0.1)):
        assert np.isnan(out[0, 2:]).all()


def test_kernels_do_not_modify_their_input() -> None:
    """Every kernel returns a new array and leaves its input untouched."""
    X = np.array([[0.0, 0.5, -1.0, 0.25, np.nan]])
    before = X.copy()
    kernels.peak_normalize(X, 2.0)
    kernels.rms_normalize(X, 2.0)
    kernels.trim_silence(X, 0.3)
    kernels.window_features(X, _codes(list(WINDOW_FEATURES)), 4)
    np.testing.assert_array_equal(X, before)
