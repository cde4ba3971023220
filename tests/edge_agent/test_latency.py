"""The latency histogram: its buckets, exact merges, quantile bounds and its JSON form."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.errors import AgentError
from edge_agent.latency import N_BUCKETS, LatencyHistogram

SETTINGS = settings(deadline=None, max_examples=300)
EDGES = LatencyHistogram.edges
RATIO = 10**0.1  # adjacent edges differ by this factor (up to rounding of the edges)

# Latencies from well below 1 µs to well above 100 s, plus every edge exactly.
latency = st.one_of(
    st.floats(0.0, 1e9, allow_nan=False),
    st.floats(0.0, 2.0, allow_nan=False),
    st.floats(1.0, 1e4, allow_nan=False),
    st.sampled_from([float(e) for e in EDGES]),
)
latencies = st.lists(latency, min_size=1, max_size=200)


def hist_of(values: list[float]) -> LatencyHistogram:
    h = LatencyHistogram()
    h.record_many(np.array(values))
    return h


def test_edges_are_ten_per_decade_from_1us_to_100s() -> None:
    """The shared edges are 10**(i/10) µs for i = 0..80, exact at every decade, increasing."""
    assert EDGES.shape == (81,)
    assert N_BUCKETS == 82
    np.testing.assert_allclose(EDGES, 10.0 ** (np.arange(81) / 10), rtol=1e-15)
    assert [EDGES[10 * k] for k in range(9)] == [10.0**k for k in range(9)]
    assert np.all(np.diff(EDGES) > 0)
    assert not EDGES.flags.writeable


@pytest.mark.parametrize(
    ("us", "bucket"),
    [(0.0, 0), (0.5, 0), (1.0, 0), (1.0000001, 1), (float(EDGES[1]), 1), (10.0, 10),
     (10.000001, 11), (1e8, 80), (1e8 + 1, 81), (1e12, 81)],
)
def test_buckets_are_closed_on_the_right(us: float, bucket: int) -> None:
    """A value on an edge counts in the bucket that edge closes; above 100 s is the overflow."""
    h = LatencyHistogram()
    h.record(us)
    assert LatencyHistogram.bucket_of(us) == bucket
    assert np.flatnonzero(h.counts).tolist() == [bucket]


@SETTINGS
@given(values=latencies)
def test_record_and_record_many_agree(values: list[float]) -> None:
    """Recording one value at a time counts the same buckets, count and max as a batch."""
    one = LatencyHistogram()
    for v in values:
        one.record(v)
    batch = hist_of(values)
    np.testing.assert_array_equal(one.counts, batch.counts)
    assert (one.count, one.max) == (batch.count, batch.max) == (len(values), max(values))
    assert one.sum == pytest.approx(sum(values), rel=1e-12)
    assert batch.sum == pytest.approx(sum(values), rel=1e-12)


@SETTINGS
@given(values=latencies, cuts=st.lists(st.integers(0, 200), max_size=4))
def test_merge_of_any_split_equals_the_whole(values: list[float], cuts: list[int]) -> None:
    """Merging the histograms of any split of a stream, in any order, equals the whole."""
    bounds = sorted({0, len(values), *[min(c, len(values)) for c in cuts]})
    parts = [hist_of(values[a:b]) for a, b in itertools.pairwise(bounds)]
    merged = LatencyHistogram()
    for part in reversed(parts):
        merged.merge(part)
    whole = hist_of(values)
    np.testing.assert_array_equal(merged.counts, whole.counts)
    assert (merged.count, merged.max) == (whole.count, whole.max)
    assert merged.sum == pytest.approx(whole.sum, rel=1e-12)
    for q in (0.0, 0.5, 0.9, 0.99, 1.0):
        assert merged.quantile(q) == whole.quantile(q)
    pair = parts[0].copy()
    pair.merge(parts[-1])
    assert pair.count == parts[0].count + parts[-1].count
    again = LatencyHistogram()
    again += whole
    assert again == whole
    with pytest.raises(AgentError, match="cannot merge"):
        pair.merge({"count": 1})  # type: ignore[arg-type]


@SETTINGS
@given(values=latencies, q=st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.5, 0.95, 0.99])))
def test_quantile_within_the_bucket_bound(values: list[float], q: float) -> None:
    """The estimate is >= numpy's exact inverted-CDF quantile and < 10**0.1 times it in range."""
    h = hist_of(values)
    exact = float(np.quantile(np.array(values), q, method="inverted_cdf"))
    est = h.quantile(q)
    assert exact <= est <= h.max
    if exact <= 1.0:
        assert est <= 1.0
    elif exact <= 1e8:
        assert est < exact * RATIO * (1 + 1e-15)
    else:
        assert est == h.max


def test_quantile_helpers_on_a_known_stream() -> None:
    """p50/p95/p99 return the upper edge of the bucket holding that rank, capped at the max."""
    h = LatencyHistogram()
    h.record_many(np.arange(1, 101) * 100.0)  # 100 µs .. 10 ms
    assert h.p50() == pytest.approx(EDGES[int(np.searchsorted(EDGES, 5000.0))])
    assert h.p95() == pytest.approx(10 ** (40 / 10))  # 9500 µs is in (7943, 10000]
    assert h.p99() == 10_000.0
    assert h.quantile(1.0) == h.max == 10_000.0
    assert h.mean == pytest.approx(5050.0)
    assert math.isnan(LatencyHistogram().p50())
    assert math.isnan(LatencyHistogram().mean)
    with pytest.raises(AgentError, match="outside"):
        h.quantile(1.5)


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, -math.inf, "fast"])
def test_bad_latencies_are_refused(bad: object) -> None:
    """Negative, NaN, infinite or non-numeric latencies raise AgentError and count nothing."""
    h = LatencyHistogram()
    with pytest.raises(AgentError, match="not a finite number"):
        h.record(bad)  # type: ignore[arg-type]
    if not isinstance(bad, str):
        with pytest.raises(AgentError, match="nothing was recorded"):
            h.record_many(np.array([1.0, bad]))
    assert h == LatencyHistogram()


@SETTINGS
@given(values=st.lists(latency, max_size=100))
def test_dict_roundtrip(values: list[float]) -> None:
    """to_dict survives JSON and from_dict restores an equal histogram."""
    h = hist_of(values) if values else LatencyHistogram()
    d = json.loads(json.dumps(h.to_dict(), allow_nan=False))
    assert len(d["counts"]) == int(np.count_nonzero(h.counts))
    assert LatencyHistogram.from_dict(d) == h


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"counts": {"82": 1}}, "not an index"),
        ({"counts": {"-1": 1}}, "not an index"),
        ({"counts": {"3": -1}}, "not an integer"),
        ({"counts": {"3": True}}, "not an integer"),
        ({"count": 3}, "does not equal"),
        ({"max": 1e9}, "highest non-empty bucket"),
        ({"sum": math.inf}, "not a finite number"),
        ({"buckets_per_decade": 20}, "this build reads"),
        ({"extra": 1}, "expected"),
    ],
)
def test_from_dict_refuses_inconsistent_data(change: dict[str, object], match: str) -> None:
    """from_dict names the bad key or value instead of loading an inconsistent histogram."""
    h = LatencyHistogram()
    h.record_many([2.0, 3.0])
    d = {**h.to_dict(), **change}
    with pytest.raises(AgentError, match=match):
        LatencyHistogram.from_dict(d)
