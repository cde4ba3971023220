"""Drift verdicts carry the data-quality counts beside them: missing and out-of-range rows."""

from __future__ import annotations

import numpy as np
import pytest

from fleet_protocol.manifest import DriftThresholds, FeatureBaseline
from fleet_protocol.verdict import format_rate, judge_feature

THRESHOLDS = DriftThresholds(window_sizes=(100, 10_000), psi=(0.2, 0.02), js=(0.2, 0.02),
                             false_alarm_rate=0.01, resamples=200)


def numeric(counts: tuple[int, ...]) -> FeatureBaseline:
    return FeatureBaseline(name="temp", kind="numeric", edges=(0.0, 1.0, 2.0),
                           counts=counts, missing=0, thresholds=THRESHOLDS)


def test_numeric_out_of_range_is_the_underflow_and_overflow_slots() -> None:
    """Slots [under, bin, bin, over]: the rows outside the training range are under + over;
    missing rows count toward the share of all rows, outside ones toward rows with a value."""
    v = judge_feature(numeric((0, 50, 50, 0)), np.array([7, 400, 500, 93]), 100, missing=250)
    assert (v.rows, v.missing, v.out_of_range) == (1000, 250, 100)
    assert v.missing_rate == pytest.approx(0.2) and v.out_of_range_rate == pytest.approx(0.1)
    assert v.status == "drift"  # and the drift verdict is judged on the rows with a value


def test_categorical_out_of_range_is_the_other_slot() -> None:
    base = FeatureBaseline(name="site", kind="categorical", categories=("a", "b"),
                           counts=(60, 40, 0), missing=0, thresholds=THRESHOLDS)
    v = judge_feature(base, np.array([55, 40, 5]), 100)
    assert (v.rows, v.missing, v.out_of_range) == (100, 0, 5)
    assert v.missing_rate == 0 and v.out_of_range_rate == pytest.approx(0.05)


def test_categorical_outside_is_the_other_slot_beyond_training_s_own_share() -> None:
    """A high-cardinality feature: training put 10% in "other" (rare categories past the
    vocabulary). A window with that share has nothing outside; one with 30% has the excess,
    20% of its rows; one with less has none (never negative)."""
    base = FeatureBaseline(name="user_agent", kind="categorical", categories=("a", "b"),
                           counts=(50, 40, 10), missing=0, thresholds=THRESHOLDS)
    assert judge_feature(base, np.array([500, 400, 100]), 100).out_of_range == 0
    hot = judge_feature(base, np.array([400, 300, 300]), 100)
    assert hot.out_of_range == 200 and hot.out_of_range_rate == pytest.approx(0.2)
    assert judge_feature(base, np.array([600, 400, 0]), 100).out_of_range == 0
    assert judge_feature(base, np.array([5, 4, 4]), 100).out_of_range == 3  # 4 - 1.3, rounded


def test_too_few_rows_still_reports_the_counts() -> None:
    """'Not enough data' for a verdict is still data about quality: a sensor that sends
    nothing but NaN has no rows to judge and a missing rate of 100%."""
    v = judge_feature(numeric((0, 50, 50, 0)), np.zeros(4, dtype=np.int64), 100, missing=30)
    assert v.status == "insufficient" and (v.rows, v.missing) == (0, 30)
    assert v.missing_rate == 1.0 and v.out_of_range_rate is None
    nothing = judge_feature(numeric((0, 50, 50, 0)), np.zeros(4, dtype=np.int64), 100)
    assert nothing.missing_rate is None


@pytest.mark.parametrize(("rate", "text"), [
    (None, "-"), (0.0, "0"), (0.0004, "<0.1%"), (0.001, "0.1%"), (0.125, "12.5%"),
    (0.999, "99.9%"), (0.9996, ">99.9%"), (1.0, "100%")])
def test_rates_print_so_a_rare_fault_is_not_zero_nor_a_nearly_dead_sensor_all(
        rate: float | None, text: str) -> None:
    assert format_rate(rate) == text
