"""Drift statistics from binned counts, checked against scipy on the same bins."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import stats
from scipy.spatial.distance import jensenshannon

from fleet_protocol import drift
from fleet_protocol.errors import SketchError
from fleet_protocol.sketch import FeatureLayout, Sketch, SketchLayout


@st.composite
def count_pairs(draw: st.DrawFn, max_count: int = 10**6) -> tuple[np.ndarray, np.ndarray]:
    """Two count vectors over the same slots, each with at least one observation."""
    k = draw(st.integers(1, 24))
    cell = st.one_of(st.just(0), st.integers(0, 5), st.integers(0, max_count))
    e = np.array(draw(st.lists(cell, min_size=k, max_size=k)), dtype=np.int64)
    a = np.array(draw(st.lists(cell, min_size=k, max_size=k)), dtype=np.int64)
    assume(e.sum() > 0 and a.sum() > 0)
    return e, a


def expand(counts: np.ndarray) -> np.ndarray:
    """Samples whose value is the slot index, repeated by the slot's count."""
    return np.repeat(np.arange(counts.size, dtype=np.float64), counts)


# --- PSI ----------------------------------------------------------------------------------


def test_psi_matches_the_formula_by_hand() -> None:
    """PSI is sum((a - e) * ln(a / e)) over proportions, with empty proportions set to eps."""
    e, a = np.array([50, 30, 20, 0]), np.array([25, 25, 25, 25])
    pe, pa = np.array([0.5, 0.3, 0.2, 1e-4]), np.array([0.25, 0.25, 0.25, 0.25])
    assert drift.psi(e, a) == pytest.approx(float(np.sum((pa - pe) * np.log(pa / pe))), rel=1e-12)


@given(count_pairs())
def test_psi_is_non_negative_and_finite(pair: tuple[np.ndarray, np.ndarray]) -> None:
    """PSI is finite and >= 0 for any counts, empty slots included."""
    value = drift.psi(*pair)
    assert math.isfinite(value)
    assert value >= 0.0


@given(count_pairs(), st.integers(1, 1000))
def test_psi_of_the_same_proportions_is_exactly_zero(
    pair: tuple[np.ndarray, np.ndarray], scale: int
) -> None:
    """PSI of a distribution with itself, at the same or a scaled-up total, is exactly 0."""
    e, _ = pair
    assert drift.psi(e, e) == 0.0
    assert drift.psi(e, e * scale) == 0.0


def test_psi_eps_must_be_a_proportion() -> None:
    """An eps outside (0, 1) raises SketchError naming it."""
    with pytest.raises(SketchError, match="eps is 0"):
        drift.psi([1, 2], [2, 1], eps=0)


# --- Jensen-Shannon -----------------------------------------------------------------------


@given(count_pairs())
def test_js_distance_matches_scipy(pair: tuple[np.ndarray, np.ndarray]) -> None:
    """js_distance equals scipy's jensenshannon(base=2) and lies in [0, 1]."""
    e, a = pair
    got = drift.js_distance(e, a)
    assert 0.0 <= got <= 1.0
    want = float(jensenshannon(e.astype(float), a.astype(float), base=2))
    if math.isnan(want):  # scipy takes sqrt of a tiny negative rounding error
        assert got == pytest.approx(0.0, abs=1e-7)
    else:
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_js_distance_extremes() -> None:
    """Identical distributions are at distance 0, disjoint ones at distance 1."""
    assert drift.js_distance([1, 2, 3], [2, 4, 6]) == 0.0
    assert drift.js_distance([5, 0], [0, 7]) == pytest.approx(1.0, abs=1e-15)


# --- chi-square ---------------------------------------------------------------------------


@settings(deadline=None)
@given(count_pairs())
def test_chi_square_matches_scipy(pair: tuple[np.ndarray, np.ndarray]) -> None:
    """chi_square equals chi2_contingency(correction=False) on the non-empty slots."""
    e, a = pair
    got = drift.chi_square(e, a)
    keep = (e + a) > 0
    want = stats.chi2_contingency(np.vstack([e[keep], a[keep]]), correction=False)
    assert got.dof == want.dof
    assert got.statistic == pytest.approx(want.statistic, rel=1e-9, abs=1e-9)
    if want.pvalue > 1e-300:
        assert got.p_value == pytest.approx(want.pvalue, rel=1e-6)
    else:
        assert got.p_value < 1e-290


def test_chi_square_single_slot_has_no_degrees_of_freedom() -> None:
    """With one non-empty slot the statistic is 0, the p-value 1 and dof 0."""
    assert drift.chi_square([0, 4, 0], [0, 9, 0]) == drift.ChiSquareResult(0.0, 1.0, 0)


@pytest.mark.parametrize("shift", [0.0, 0.01, 0.03, 0.06, 0.1, 0.15, 0.2, 0.3])
def test_chi_square_p_value_holds_in_the_far_tail(shift: float) -> None:
    """Tiny p-values (down to 1e-300) agree with scipy to 1e-6 relative."""
    e = np.full(10, 10_000)
    a = np.round(10_000 * (1 + shift * np.linspace(-1, 1, 10))).astype(np.int64)
    got = drift.chi_square(e, a).p_value
    want = stats.chi2_contingency(np.vstack([e, a]), correction=False).pvalue
    assert want > 1e-300 or got < 1e-290
    if want > 1e-300:
        assert got == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("dof", [1, 2, 3, 5, 9, 30, 101, 1000, 20_000])
def test_chi2_sf_matches_scipy_over_the_range(dof: int) -> None:
    """The incomplete-gamma survival function equals scipy's chi2.sf from the body to the tail."""
    xs = np.concatenate([[1e-12, 0.5, dof - 1e-9, dof + 1.0], np.linspace(0.1, 6 * dof + 80, 60)])
    for x in xs:
        want = float(stats.chi2.sf(x, dof))
        got = drift.chi2_sf(float(x), dof)
        if want > 1e-300:
            assert got == pytest.approx(want, rel=1e-9), x
        else:
            assert got < 1e-290


# --- Kolmogorov-Smirnov -------------------------------------------------------------------


@settings(deadline=None)
@given(count_pairs(max_count=400))
def test_ks_binned_matches_ks_2samp_on_expanded_samples(
    pair: tuple[np.ndarray, np.ndarray],
) -> None:
    """The statistic equals ks_2samp on the expanded samples; the p-value its 'asymp' one."""
    e, a = pair
    # One row a side gives n_eff = 0.5, which scipy rounds to 0 (NaN, with a warning).
    assume(round(e.sum() * a.sum() / (e.sum() + a.sum())) >= 1)
    got = drift.ks_binned(e, a)
    want = stats.ks_2samp(expand(e), expand(a), method="asymp")
    assert got.statistic == pytest.approx(want.statistic, rel=1e-12, abs=1e-15)
    assert got.p_value == pytest.approx(want.pvalue, rel=1e-6, abs=1e-300)


@settings(deadline=None)
@given(count_pairs())
def test_ks_p_value_uses_scipy_asymptotic_distribution(
    pair: tuple[np.ndarray, np.ndarray],
) -> None:
    """For any window size the p-value is kstwo.sf(D, round(n*m/(n+m))), as in ks_2samp."""
    e, a = pair
    n, m = int(e.sum()), int(a.sum())
    got = drift.ks_binned(e, a)
    n_eff = max(1, round(n * m / (n + m)))
    want = float(stats.kstwo.sf(got.statistic, n_eff))
    assert got.p_value == pytest.approx(want, rel=1e-6, abs=1e-300)


@pytest.mark.parametrize("n", [1, 2, 7, 40, 140, 141, 1000, 20_000, 100_001, 2_000_000])
def test_kolmogorov_smirnov_sf_matches_kstwo_in_every_regime(n: int) -> None:
    """kolmogorov_smirnov_sf(n, d) equals kstwo.sf(d, n) on every exact and asymptotic route."""
    rng = np.random.default_rng(n)
    ds = np.concatenate(
        [
            [0.0, 0.4 / n, 0.5 / n, 0.9 / n, 1.0 / n, 0.5, 0.75, (n - 1) / n, 1.0],
            rng.uniform(0, 1, 10),
            np.sqrt(rng.uniform(0.05, 30, 20) / n),
        ]
    )
    for d in np.clip(ds, 0.0, 1.0):
        want = float(stats.kstwo.sf(d, n))
        got = drift.kolmogorov_smirnov_sf(n, float(d))
        assert got == pytest.approx(want, rel=1e-8, abs=1e-300), d


# --- Wasserstein --------------------------------------------------------------------------


def test_bin_positions_put_tails_half_a_bin_outside() -> None:
    """Inner bins sit at midpoints; underflow/overflow half the first/last inner width outside."""
    assert drift.bin_positions([0.0, 1.0, 3.0]).tolist() == [-0.5, 0.5, 2.0, 4.0]


@pytest.mark.parametrize("edges", [[1.0], [0.0, 0.0], [0.0, math.nan], [[0.0, 1.0]]])
def test_bin_positions_reject_bad_edges(edges: list[float]) -> None:
    """Edges that are too few, not increasing or not finite raise SketchError."""
    with pytest.raises(SketchError, match="strictly increasing"):
        drift.bin_positions(edges)


@given(count_pairs(), st.data())
def test_wasserstein_binned_matches_scipy(
    pair: tuple[np.ndarray, np.ndarray], data: st.DataObject
) -> None:
    """W1 with each slot's mass at its position (any order) equals scipy's wasserstein_distance."""
    e, a = pair
    positions = np.array(
        data.draw(st.lists(st.floats(-1e3, 1e3), min_size=e.size, max_size=e.size, unique=True))
    )
    got = drift.wasserstein_binned(e, a, positions)
    want = stats.wasserstein_distance(positions, positions, e, a)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_wasserstein_of_a_point_shift() -> None:
    """Moving all mass from position 0 to position 3 costs exactly 3."""
    assert drift.wasserstein_binned([1, 0, 0], [0, 0, 2], [0.0, 1.0, 3.0]) == 3.0


# --- validation and the convenience layer -------------------------------------------------


@pytest.mark.parametrize(
    ("e", "a", "message"),
    [
        ([1, 2], [1, 2, 3], "expected has 2 slots and actual 3"),
        ([1, -2], [1, 2], "expected count 1 is -2.0"),
        ([1, 2], [1, math.nan], "actual count 1 is nan"),
        ([1, 2], [math.inf, 2], "actual count 0 is inf"),
        ([0, 0], [1, 2], "expected counts have no observations"),
        ([[1, 2]], [[1, 2]], "1-D"),
        ([], [], "non-empty"),
    ],
)
def test_invalid_counts_raise_with_a_clear_message(
    e: list[Any], a: list[Any], message: str
) -> None:
    """Every statistic rejects mismatched, negative, non-finite or empty counts the same way."""
    for fn in (drift.psi, drift.js_distance, drift.chi_square, drift.ks_binned):
        with pytest.raises(SketchError, match=message):
            fn(e, a)


def test_compare_bundles_every_statistic() -> None:
    """compare() returns the individual statistics, W1 only when positions are given."""
    e, a = np.array([10, 40, 30, 20]), np.array([5, 20, 45, 30])
    pos = drift.bin_positions([0.0, 1.0, 2.0])
    got = drift.compare(e, a, pos)
    ks = drift.ks_binned(e, a)
    assert got == drift.DriftStats(
        psi=drift.psi(e, a),
        js=drift.js_distance(e, a),
        chi2_p=drift.chi_square(e, a).p_value,
        ks=ks.statistic,
        ks_p=ks.p_value,
        wasserstein=drift.wasserstein_binned(e, a, pos),
        n_expected=100.0,
        n_actual=100.0,
    )
    assert drift.compare(e, a).wasserstein is None


def test_compare_feature_reads_sketches() -> None:
    """compare_feature uses a feature's slot counts, with W1 for numeric features only."""
    layout = SketchLayout(
        (
            FeatureLayout("x", "numeric", edges=(0.0, 1.0, 2.0)),
            FeatureLayout("c", "categorical", categories=("a", "b")),
        )
    )
    base, cur = Sketch.empty(layout), Sketch.empty(layout)
    base.update(0, [0.5, 1.5, 1.5, np.nan])
    cur.update(0, [0.5, 0.5, 2.5])
    base.update(1, ["a", "b"])
    cur.update(1, ["a", "zzz"])
    num = drift.compare_feature(base, cur, 0)
    assert num == drift.compare(
        base.feature_counts(0), cur.feature_counts(0), drift.bin_positions([0.0, 1.0, 2.0])
    )
    assert num.n_expected == 3.0
    assert drift.compare_feature(base, cur, 1).wasserstein is None
    with pytest.raises(SketchError, match=r"feature 'c'.*actual counts have no observations"):
        drift.compare_feature(base, Sketch.empty(layout), 1)
