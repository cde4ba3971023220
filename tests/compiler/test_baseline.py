"""Baselines: quantile bins, calibrated thresholds that alarm at most 1% on training-like data."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compiler.baseline import BaselineOptions, calibrate, feature_baselines, numeric_layout
from fleet_protocol.drift import js_distance, js_rows, psi, psi_rows
from fleet_protocol.sketch import FeatureLayout, Sketch, SketchLayout
from fleet_protocol.verdict import judge_feature, threshold_at

counts_pairs = st.integers(2, 20).flatmap(lambda k: st.tuples(
    st.lists(st.integers(0, 1000), min_size=k, max_size=k).filter(lambda c: sum(c) > 0),
    st.lists(st.integers(0, 1000), min_size=k, max_size=k).filter(lambda c: sum(c) > 0),
))


@given(counts_pairs)
@settings(max_examples=200, deadline=None)
def test_vectorised_statistics_match_fleet_protocol(pair: tuple[list[int], list[int]]) -> None:
    """The calibration's row-wise PSI and JS equal the hub/device definitions exactly."""
    e, a = (np.array(x) for x in pair)
    assert psi_rows(e[None], a[None])[0] == pytest.approx(psi(e, a), rel=1e-9, abs=1e-12)
    assert js_rows(e[None], a[None])[0] == pytest.approx(js_distance(e, a), rel=1e-9,
                                                          abs=1e-9)


def test_numeric_layout_uses_quantiles_and_handles_constants() -> None:
    """Edges are unique training quantiles; a constant feature still gets a usable bin."""
    lay = numeric_layout("x", np.arange(1000.0), 4)
    assert lay.edges == pytest.approx((0.0, 249.75, 499.5, 749.25, 999.0))
    const = numeric_layout("c", np.full(50, 3.0), 16)
    assert len(const.edges) == 2 and const.edges[0] == 3.0 and const.edges[1] > 3.0


def _population(rng: np.random.Generator, n: int, shift: float = 0.0) -> list[np.ndarray]:
    """Three features: a skewed continuous one, a bimodal one, and a small-integer one."""
    return [
        rng.lognormal(0.0, 0.7, n) + shift,
        np.where(rng.random(n) < 0.3, rng.normal(-2, 0.5, n), rng.normal(1, 1, n)) + shift,
        rng.poisson(3.0 + shift, n).astype(np.float64),
    ]


def _alarm_rate(baselines: tuple, layouts: list[FeatureLayout], rng: np.random.Generator,
                window: int, trials: int, shift: float = 0.0) -> float:
    layout = SketchLayout(tuple(layouts))
    alarms = 0
    for _ in range(trials):
        sk = Sketch.empty(layout)
        for j, col in enumerate(_population(rng, window, shift)):
            sk.update_numeric(j, col)
        for j, fb in enumerate(baselines):
            if judge_feature(fb, sk.feature_counts(j), min_evidence=100).drifted:
                alarms += 1
    return alarms / (trials * len(baselines))


@pytest.mark.parametrize("window", [100, 1000, 20_000])
def test_windows_from_training_distribution_alarm_at_most_one_percent(window: int) -> None:
    """Fresh windows from the training distribution alarm at most 1% of the time, at any size."""
    rng = np.random.default_rng(123)
    train = _population(rng, 5000)
    layouts = [numeric_layout(f"f{j}", c, 16) for j, c in enumerate(train)]
    baselines = feature_baselines(layouts, train, BaselineOptions(resamples=400),
                                  np.random.default_rng(1))
    trials = 300 if window < 20_000 else 60
    rate = _alarm_rate(baselines, layouts, np.random.default_rng(window), window, trials)
    assert rate <= 0.01


def test_shifted_distribution_alarms() -> None:
    """A moderate shift (the lighting change) is caught in a window of 1,000 rows."""
    rng = np.random.default_rng(5)
    train = _population(rng, 5000)
    layouts = [numeric_layout(f"f{j}", c, 16) for j, c in enumerate(train)]
    baselines = feature_baselines(layouts, train, BaselineOptions(resamples=200),
                                  np.random.default_rng(2))
    rate = _alarm_rate(baselines, layouts, np.random.default_rng(9), 1000, 30, shift=0.5)
    assert rate >= 0.9


def test_thresholds_shrink_with_evidence_and_respect_floor() -> None:
    """Bigger windows get tighter thresholds, never below the effect-size floor."""
    counts = np.array([0, 100, 300, 400, 150, 50, 0])
    thr = calibrate(counts, BaselineOptions(resamples=200), np.random.default_rng(0))
    assert list(thr.psi) == sorted(thr.psi, reverse=True)
    assert min(thr.psi) >= 0.05 and min(thr.js) >= 0.1
    assert threshold_at(thr, 50, "psi") == pytest.approx(thr.psi[0])
    assert threshold_at(thr, 10**7, "psi") == pytest.approx(thr.psi[-1])
    mid = threshold_at(thr, 500, "psi")
    assert thr.psi[2] <= mid <= thr.psi[1]


def test_too_few_rows_is_not_a_verdict() -> None:
    """Below the minimum evidence a feature is 'insufficient', whatever its counts."""
    rng = np.random.default_rng(0)
    col = rng.normal(size=2000)
    lay = numeric_layout("x", col, 8)
    (fb,) = feature_baselines([lay], [col], BaselineOptions(resamples=50), rng)
    skewed = np.zeros(len(fb.counts), dtype=np.int64)
    skewed[-1] = 50
    v = judge_feature(fb, skewed, min_evidence=100)
    assert v.status == "insufficient" and v.psi is None
    skewed[-1] = 500
    assert judge_feature(fb, skewed, min_evidence=100).status == "drift"
