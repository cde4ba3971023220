"""The residual sketch: relative accuracy against numpy, exact merges, the wire form."""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet_protocol.errors import SketchError
from fleet_protocol.residuals import (
    ALPHA,
    MAX_BUCKETS,
    MIN_MAGNITUDE,
    ResidualSketch,
    bucket_of,
    bucket_value,
)

SETTINGS = settings(max_examples=200, deadline=None)

# residuals at very different scales, with exact zeros and signs mixed
magnitude = st.floats(1e-9, 1e9, allow_nan=False, allow_infinity=False)
residual = st.one_of(magnitude, magnitude.map(lambda m: -m), st.just(0.0), st.just(-0.0))
residuals = st.lists(residual, min_size=1, max_size=300)


def _close(estimate: float | None, truth: float) -> bool:
    """Within ALPHA relative error (to rounding), zeros exactly; a true value within
    MIN_MAGNITUDE of zero may be reported as zero. None (an empty sketch's answer) is not."""
    if estimate is None:
        return False
    if abs(truth) <= MIN_MAGNITUDE:
        return estimate == 0.0
    return abs(estimate - truth) <= ALPHA * abs(truth) * (1 + 1e-9)


@SETTINGS
@given(values=residuals, q=st.floats(0.0, 1.0))
def test_quantiles_are_within_the_relative_accuracy(values: list[float], q: float) -> None:
    """Signed and absolute quantiles within ALPHA of numpy's inverted_cdf, at any scale."""
    sketch = ResidualSketch.of(values)
    x = np.array(values)
    assert _close(sketch.quantile(q), float(np.quantile(x, q, method="inverted_cdf")))
    assert _close(sketch.abs_quantile(q),
                  float(np.quantile(np.abs(x), q, method="inverted_cdf")))


@SETTINGS
@given(values=residuals)
def test_exact_summaries(values: list[float]) -> None:
    sketch = ResidualSketch.of(values)
    x = np.array(values)
    assert sketch.count == len(values)
    assert sketch.mae == pytest.approx(float(np.mean(np.abs(x))), rel=1e-9, abs=1e-300)
    assert sketch.rmse == pytest.approx(float(np.sqrt(np.mean(x * x))), rel=1e-9, abs=1e-300)
    assert sketch.bias == pytest.approx(float(np.mean(x)), rel=1e-9,
                                        abs=1e-9 * float(np.max(np.abs(x))) + 1e-300)


@SETTINGS
@given(values=residuals, cuts=st.lists(st.integers(0, 300), max_size=4))
def test_merging_parts_equals_sketching_all(values: list[float], cuts: list[int]) -> None:
    """Buckets and counts merge exactly, in any split and order; sums to rounding."""
    edges = sorted({0, len(values), *(min(c, len(values)) for c in cuts)})
    parts = [ResidualSketch.of(values[a:b]) for a, b in itertools.pairwise(edges)]
    merged = ResidualSketch()
    for part in reversed(parts):
        merged += part
    whole = ResidualSketch.of(values)
    assert (merged.positive, merged.negative, merged.zero, merged.count) == (
        whole.positive, whole.negative, whole.zero, whole.count)
    assert merged.sum_abs == pytest.approx(whole.sum_abs, rel=1e-9)


@SETTINGS
@given(values=st.lists(residual, max_size=100))
def test_wire_form_round_trips_through_json(values: list[float]) -> None:
    sketch = ResidualSketch.of(values)
    back = ResidualSketch.from_dict(json.loads(json.dumps(sketch.to_dict())))
    assert back == sketch
    assert back.to_dict() == sketch.to_dict()


def test_bucket_value_is_within_alpha_of_its_bucket() -> None:
    for m in (MIN_MAGNITUDE * 1.0001, 1e-6, 0.37, 1.0, 1.0000001, 2.5, 1e3, 7.7e8, 1e300):
        assert abs(bucket_value(bucket_of(m)) - m) <= ALPHA * m * (1 + 1e-12)


def test_size_is_bounded_and_large_errors_keep_their_accuracy() -> None:
    """Past MAX_BUCKETS per sign the smallest magnitudes collapse; the top quantiles of
    the absolute error stay within ALPHA and every residual is still counted."""
    values = list(np.geomspace(1e-11, 1e11, 4000))  # ~22 decades: far more buckets than kept
    sketch = ResidualSketch.of(values)
    assert len(sketch.positive) == MAX_BUCKETS
    assert sketch.count == sum(sketch.positive.values()) == 4000
    for q in (0.7, 0.9, 0.99, 1.0):  # the top ~8.9 decades (values above ~1.3e2) are kept
        truth = float(np.quantile(values, q, method="inverted_cdf"))
        estimate = sketch.abs_quantile(q)
        assert estimate is not None and abs(estimate - truth) <= ALPHA * truth * (1 + 1e-9)
    # below, the collapsed magnitudes read as the smallest kept bucket: an overestimate
    assert sketch.abs_quantile(0.0) == bucket_value(min(sketch.positive)) > 1e2
    merged = ResidualSketch.of(values[::2])
    merged += ResidualSketch.of(values[1::2])
    assert len(merged.positive) == MAX_BUCKETS and merged.count == 4000


def test_empty_and_bad_residuals() -> None:
    sketch = ResidualSketch()
    assert sketch.quantile(0.5) is None and sketch.mae is None and sketch.rmse is None
    assert sketch.summary()["abs_error_p90"] is None
    for bad in (math.nan, math.inf, -math.inf, 1e101, -1e200):
        with pytest.raises(SketchError, match="not a finite number within 1e"):
            sketch.add(bad)
    assert sketch.count == 0
    with pytest.raises(SketchError, match=r"quantile 1.5 is outside \[0, 1\]"):
        ResidualSketch.of([1.0]).quantile(1.5)


def _good() -> dict[str, Any]:
    return ResidualSketch.of([0.0, -2.0, 3.0, 3.1]).to_dict()


@pytest.mark.parametrize(("change", "message"), [
    ({"extra": 1}, r"unknown \['extra'\]"),
    ({"version": 2}, "version 2 is not 1"),
    ({"version": True}, "version True is not 1"),
    ({"alpha": 0.01}, "alpha 0.01 is not 0.02"),
    ({"count": 5}, "count 5 is not the sum of its buckets and zero \\(4\\)"),
    ({"count": -1}, "count -1 is not an integer >= 0"),
    ({"zero": 1.0}, "zero 1.0 is not an integer >= 0"),
    ({"sum": math.nan}, "sum nan is not a finite number"),
    ({"sum_sq": -1.0}, "must be >= 0"),
    ({"positive": [1]}, "positive must be an object"),
    ({"positive": {"+5": 2}}, "positive key '\\+5' is not a canonical integer"),
    ({"positive": {"05": 2}}, "positive key '05' is not a canonical integer"),
    ({"negative": {"999999": 2}}, "negative key '999999' is outside"),
    ({"negative": {"35": 0}}, r"negative\['35'\] 0 is not an integer >= 1"),
    ({"positive": {"--1": 1}}, "positive key '--1' is not a canonical integer"),
    ({"positive": {"-0": 1}}, "positive key '-0' is not a canonical integer"),
    ({"positive": {"\u00b2": 1}}, "positive key '\u00b2' is not a canonical integer"),
    ({"positive": {"9" * 5000: 1}}, "positive key '9999.* is not a canonical integer"),
    ({"sum": 10**400}, "sum 1000.* is not a finite number"),
    ({"sum_abs": "1.0"}, "sum_abs '1.0' is not a finite number"),
])
def test_from_dict_names_the_bad_key_and_value(change: dict[str, Any], message: str) -> None:
    d = {**_good(), **change}
    with pytest.raises(SketchError, match=message):
        ResidualSketch.from_dict(d)


def test_from_dict_refuses_missing_keys_and_too_many_buckets() -> None:
    d = _good()
    del d["zero"]
    with pytest.raises(SketchError, match=r"missing \['zero'\]"):
        ResidualSketch.from_dict(d)
    d = _good()
    d["positive"] = {str(k): 1 for k in range(MAX_BUCKETS + 1)}
    with pytest.raises(SketchError, match=f"has {MAX_BUCKETS + 1} buckets"):
        ResidualSketch.from_dict(d)
