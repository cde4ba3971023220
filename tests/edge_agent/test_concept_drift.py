"""ADWIN on an error stream: false alarms, detection delay, exact window statistics, persistence."""

from __future__ import annotations

import doctest
import json
import math
import random
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent import concept_drift
from edge_agent.concept_drift import Adwin
from edge_agent.errors import AgentError

SETTINGS = settings(deadline=None, max_examples=150)


def bernoulli(rng: random.Random, p: float, n: int) -> list[float]:
    return [float(rng.random() < p) for _ in range(n)]


def test_docstring_examples_run() -> None:
    """The module's docstring example runs and prints what it claims."""
    result = doctest.testmod(concept_drift, raise_on_error=False, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0


@pytest.mark.parametrize("seed", range(5))
def test_stationary_error_stream_raises_at_most_one_false_alarm(seed: int) -> None:
    """5,000 draws of a stationary 10% error rate give no more than one (false) detection.

    ADWIN's bound holds the false-alarm probability of each check below delta = 0.002 (with
    the union over cut points folded into dd); 5,000 values make about 156 checks, so a stray
    alarm is possible in principle. In practice the bound is conservative (0 alarms on each of
    200 seeds when this test was written), so one alarm is tolerated and two mean it is broken.
    """
    detector = Adwin()
    stream = bernoulli(random.Random(seed), 0.1, 5000)
    alarms = sum(detector.update(x) for x in stream)
    assert alarms == detector.n_detections <= 1
    assert detector.width >= 4000


@pytest.mark.parametrize("seed", range(10))
def test_abrupt_change_is_detected_within_a_bounded_delay(seed: int) -> None:
    """An error rate jumping from 10% to 50% is detected within 160 updates (5 checks).

    Over 200 seeds the delay was 47-111 updates: the first check with at least ~48 new values
    in W1 usually fires, so 160 leaves margin but fails for a detector that is much slower.
    """
    rng = random.Random(1000 + seed)
    detector = Adwin()
    for x in bernoulli(rng, 0.1, 2000):
        assert not detector.update(x)
    width_before = detector.width
    delay = next((i for i, x in enumerate(bernoulli(rng, 0.5, 1000)) if detector.update(x)), None)
    assert delay is not None and delay < 160
    assert detector.width < width_before + delay + 1  # the window shrank
    assert detector.n_detections == 1


def test_first_detection_matches_rivers_documented_output() -> None:
    """On river's documented ADWIN streams the first change is at index 1023, as river reports."""
    rng = random.Random(12345)
    stream = rng.choices([0, 1], k=1000) + rng.choices(range(4, 8), k=1000)
    detector = Adwin()
    assert next(i for i, x in enumerate(stream) if detector.update(x)) == 1023
    legacy = np.random.RandomState(12345)
    stream2 = np.concatenate((legacy.randint(2, size=1000), legacy.randint(8, size=1000)))
    detector = Adwin()
    assert next(i for i, x in enumerate(stream2) if detector.update(float(x))) == 1023


def test_first_detection_after_each_change_matches_river() -> None:
    """On river's multi-drift stream, the first detection after each change is river's.

    river resets after a detection and reports [1023, 2015, 3007]; this ADWIN keeps W1 and
    reports further shrinks too, so only the first detection after each change is compared.
    """
    rng = random.Random(42)
    stream = (rng.choices([0, 1], k=1000) + rng.choices(range(4, 8), k=1000)
              + rng.choices([0, 1], k=1000) + rng.choices(range(4, 8), k=1000))
    detector = Adwin()
    hits = [i for i, x in enumerate(stream) if detector.update(x)]
    firsts = [min(i for i in hits if i >= change) for change in (1000, 2000, 3000)]
    assert firsts == [1023, 2015, 3007]


def check_against_brute_force(detector: Adwin, seen: list[float], exact: bool) -> None:
    """The window is the last `width` values: mean, total, variance and every bucket agree."""
    w = detector.width
    window = seen[len(seen) - w:]
    assert 0 < w <= len(seen)
    if exact:
        assert detector.total == sum(window)
        assert detector.mean == sum(window) / w
    else:
        assert detector.mean == pytest.approx(sum(window) / w, rel=1e-9, abs=1e-9)
    assert detector.variance == pytest.approx(float(np.var(window)), rel=1e-7, abs=1e-9)
    # Buckets cover the window contiguously, oldest row first, each bucket oldest first.
    pos = 0
    rows = detector.to_dict()["rows"]
    for i in range(len(rows) - 1, -1, -1):
        for total, m2 in rows[i]:
            chunk = window[pos : pos + 2**i]
            pos += 2**i
            if exact:
                assert total == sum(chunk)
            assert m2 == pytest.approx(float(np.var(chunk)) * len(chunk), rel=1e-7, abs=1e-9)
    assert pos == w


@SETTINGS
@given(
    stream=st.lists(st.integers(0, 3).map(float), min_size=1, max_size=400),
    clock=st.integers(1, 8),
    max_buckets=st.integers(2, 5),
)
def test_window_statistics_equal_brute_force_exactly(
    stream: list[float], clock: int, max_buckets: int
) -> None:
    """On small-integer streams the mean and total equal the brute-force window's exactly."""
    detector = Adwin(delta=0.2, clock=clock, max_buckets=max_buckets, grace_period=4,
                     min_window_length=2)
    seen: list[float] = []
    for x in stream:
        width_before = detector.width
        shrank = detector.update(x)
        seen.append(x)
        assert shrank == (detector.width < width_before + 1)
        check_against_brute_force(detector, seen, exact=True)


@SETTINGS
@given(stream=st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=300))
def test_window_statistics_on_floats_match_to_rounding(stream: list[float]) -> None:
    """On arbitrary floats the window statistics match brute force up to rounding."""
    detector = Adwin(delta=0.2, clock=4, max_buckets=3, grace_period=4, min_window_length=2)
    seen: list[float] = []
    for x in stream:
        detector.update(x)
        seen.append(x)
    check_against_brute_force(detector, seen, exact=False)


def test_stream_with_a_change_shrinks_to_the_new_regime() -> None:
    """After a big level shift the window holds mostly post-change values, checked exactly."""
    rng = random.Random(3)
    stream = bernoulli(rng, 0.1, 1500) + bernoulli(rng, 0.9, 600)
    detector = Adwin()
    for x in stream:
        detector.update(x)
    check_against_brute_force(detector, stream, exact=True)
    assert detector.width <= 700
    assert detector.mean > 0.8


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), cut=st.integers(0, 1500))
def test_state_roundtrip_preserves_behaviour(seed: int, cut: int) -> None:
    """A detector restored from JSON state continues exactly like the original."""
    rng = random.Random(seed)
    stream = bernoulli(rng, 0.1, 900) + [rng.gauss(0.5, 0.3) for _ in range(600)]
    original = Adwin(clock=8)
    for x in stream[:cut]:
        original.update(x)
    restored = Adwin.from_dict(json.loads(json.dumps(original.to_dict(), allow_nan=False)))
    assert restored.to_dict() == original.to_dict()
    for x in stream[cut:]:
        assert restored.update(x) == original.update(x)
    assert restored.to_dict() == original.to_dict()
    assert (restored.mean, restored.variance, restored.n_detections) == (
        original.mean, original.variance, original.n_detections)


def test_no_check_before_the_clock_or_inside_the_grace_period() -> None:
    """A jump is not reported before the clock ticks, nor while the window is within grace."""
    detector = Adwin(clock=32, grace_period=10)
    for _ in range(20):
        assert not detector.update(0.0)
    for _ in range(11):
        assert not detector.update(100.0)  # updates 21..31: no check yet
    assert detector.update(100.0)  # update 32: the first check fires
    late = Adwin(clock=1, grace_period=100)
    assert not any(late.update(x) for x in [0.0] * 50 + [1000.0] * 50)
    assert late.width == 100


def test_empty_detector() -> None:
    """A fresh detector has width 0, mean 0 and variance 0, like river's estimation."""
    detector = Adwin()
    assert (detector.width, detector.mean, detector.variance, detector.n_detections) == (0, 0, 0, 0)
    assert Adwin.from_dict(detector.to_dict()).to_dict() == detector.to_dict()


@pytest.mark.parametrize(
    "kwargs",
    [{"delta": 0.0}, {"delta": 1.0}, {"clock": 0}, {"max_buckets": 1},
     {"min_window_length": 0}, {"grace_period": -1}, {"clock": 2.5}, {"clock": True}],
)
def test_bad_parameters_are_refused(kwargs: dict[str, Any]) -> None:
    """Parameters outside their domain raise AgentError naming the parameter."""
    with pytest.raises(AgentError, match=next(iter(kwargs))):
        Adwin(**kwargs)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_values_are_refused(bad: float) -> None:
    """NaN or infinite errors raise AgentError and leave the window unchanged."""
    detector = Adwin()
    detector.update(1.0)
    with pytest.raises(AgentError, match="not a finite number"):
        detector.update(bad)
    assert (detector.width, detector.total) == (1, 1.0)


def _state() -> dict[str, Any]:
    detector = Adwin()
    for x in bernoulli(random.Random(0), 0.3, 100):
        detector.update(x)
    return detector.to_dict()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"version": 2}, "this build reads"),
        ({"width": 99}, "does not match its buckets"),
        ({"total": math.nan}, "'total'"),
        ({"tick": -1}, "'tick'"),
        ({"rows": []}, "non-empty list"),
        ({"rows": [[[1.0, 0.0]] * 6]}, "at most 5"),
        ({"delta": 2.0}, "delta"),
        ({"unknown": 1}, "expected"),
    ],
)
def test_from_dict_refuses_inconsistent_state(change: dict[str, Any], match: str) -> None:
    """from_dict names the bad key or value instead of restoring a broken detector."""
    with pytest.raises(AgentError, match=match):
        Adwin.from_dict({**_state(), **change})
