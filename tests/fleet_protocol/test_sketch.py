"""Sketch layout validation, the bin rule, updates and the exact, order-free merge."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fleet_protocol.errors import SketchError
from fleet_protocol.sketch import (
    MOMENT_LIMIT,
    FeatureLayout,
    Sketch,
    SketchLayout,
    merge_moments,
    numeric_slot,
)

NAN, INF = math.nan, math.inf
CATS = ("red", "green", "blue")


def make_layout() -> SketchLayout:
    return SketchLayout(
        (
            FeatureLayout("temp", "numeric", edges=(-10.0, 0.0, 5.0, 20.0)),
            FeatureLayout("colour", "categorical", categories=CATS),
            FeatureLayout("load", "numeric", edges=(0.0, 0.5, 1.0)),
        )
    )


def reference_slot(edges: list[float], x: float) -> int:
    """The bin rule, one value at a time, written as plainly as possible."""
    if math.isnan(x):
        return -1
    if x < edges[0]:
        return 0
    if x > edges[-1]:
        return len(edges)
    if x == edges[-1]:
        return len(edges) - 1
    for i in range(1, len(edges)):
        if edges[i - 1] <= x < edges[i]:
            return i
    raise AssertionError("unreachable")


# Values a device might see: ordinary, huge, tiny, non-finite, and exactly on an edge.
values_st = st.one_of(
    st.floats(-1e12, 1e12),
    st.floats(-1e-300, 1e-300),
    st.sampled_from([NAN, INF, -INF, 1e300, -1e300, -10.0, 0.0, 5.0, 20.0, 0.5, 1.0]),
)
categories_st = st.one_of(
    st.sampled_from([*CATS, "purple", "", None, NAN, 7]),
    st.text(max_size=3),
)


@st.composite
def edges_st(draw: st.DrawFn) -> list[float]:
    edges = sorted(draw(st.lists(st.floats(-1e6, 1e6), min_size=2, max_size=12, unique=True)))
    assume(all(b > a for a, b in itertools.pairwise(edges)))
    return edges


# --- layout --------------------------------------------------------------------------------


def test_slot_counts_and_offsets_follow_the_layout() -> None:
    """n_slots is edges+1 / categories+1, and offsets are the running sums of n_slots."""
    layout = make_layout()
    assert [f.n_slots for f in layout.features] == [5, 4, 4]
    assert layout.offsets == (0, 5, 9)
    assert layout.total_slots == 13
    assert layout.index("colour") == 1


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"kind": "numeric", "edges": (1.0,)}, ["'f'", "(1.0,)", "at least 2"]),
        ({"kind": "numeric", "edges": (0.0, 2.0, 2.0)}, ["'f'", "2.0", "strictly increasing"]),
        ({"kind": "numeric", "edges": (0.0, NAN)}, ["'f'", "nan", "finite"]),
        ({"kind": "numeric", "edges": (-INF, 0.0)}, ["'f'", "-inf", "finite"]),
        ({"kind": "numeric", "edges": (0.0, 1.0), "categories": ("a",)}, ["'f'", "('a',)"]),
        ({"kind": "categorical", "categories": ()}, ["'f'", "at least 1"]),
        ({"kind": "categorical", "categories": ("a", "a")}, ["'f'", "'a'", "unique"]),
        ({"kind": "categorical", "categories": ("a", "")}, ["'f'", "''", "missing"]),
        ({"kind": "categorical", "categories": ("a", 3)}, ["'f'", "3", "string"]),
        ({"kind": "categorical", "categories": ("a",), "edges": (0.0, 1.0)}, ["'f'", "edges"]),
        ({"kind": "ordinal"}, ["'f'", "'ordinal'", "numeric"]),
    ],
)
def test_invalid_feature_layout_names_feature_and_value(
    kwargs: dict[str, Any], fragments: list[str]
) -> None:
    """A bad feature layout raises SketchError naming the feature, the value and what is wanted."""
    with pytest.raises(SketchError) as info:
        FeatureLayout("f", **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_invalid_sketch_layout_is_rejected() -> None:
    """An empty layout, or one with a repeated feature name, raises SketchError naming it."""
    with pytest.raises(SketchError, match="at least one feature"):
        SketchLayout(())
    f = FeatureLayout("dup", "numeric", edges=(0.0, 1.0))
    with pytest.raises(SketchError, match="'dup' appears twice"):
        SketchLayout((f, f))
    with pytest.raises(SketchError, match="no feature named 'nope'"):
        make_layout().index("nope")


def test_fingerprint_is_stable_and_content_addressed() -> None:
    """Equal layouts share a pinned 16-hex fingerprint; any change to the layout changes it."""
    a, b = make_layout(), make_layout()
    # Pinned: a change here orphans every stored sketch and baseline of this layout.
    assert a.fingerprint() == b.fingerprint() == "a288ba670398bf59"
    changed = SketchLayout(
        (
            FeatureLayout("temp", "numeric", edges=(-10.0, 0.0, 5.0, 20.5)),
            *a.features[1:],
        )
    )
    assert changed.fingerprint() != a.fingerprint()
    reordered = SketchLayout((a.features[1], a.features[0], a.features[2]))
    assert reordered.fingerprint() != a.fingerprint()


def test_fingerprint_hashes_the_canonical_json() -> None:
    """The fingerprint is sha256 of the sorted-key, compact JSON of version and features."""
    layout = SketchLayout((FeatureLayout("x", "numeric", edges=(0, 1.5)),))
    canonical = (
        '{"features":[{"categories":[],"edges":[0.0,1.5],"kind":"numeric","name":"x"}],"v":1}'
    )
    assert layout.fingerprint() == hashlib.sha256(canonical.encode()).hexdigest()[:16]


def test_layout_dict_roundtrips_through_json() -> None:
    """to_dict is JSON-safe and from_dict rebuilds an equal layout with the same fingerprint."""
    layout = make_layout()
    again = SketchLayout.from_dict(json.loads(json.dumps(layout.to_dict())))
    assert again == layout
    assert again.fingerprint() == layout.fingerprint()


def test_layout_dict_with_a_stale_fingerprint_is_rejected() -> None:
    """from_dict refuses a dict whose features were edited after its fingerprint was taken."""
    d = make_layout().to_dict()
    d["features"][0]["edges"][1] = 0.25
    with pytest.raises(SketchError, match="does not match"):
        SketchLayout.from_dict(d)


# --- the bin rule --------------------------------------------------------------------------


def test_numeric_slot_on_the_boundaries() -> None:
    """Edges are closed on the left, the last edge joins the last inner bin, NaN is -1."""
    edges = np.array([0.0, 1.0, 2.0])
    values = np.array([-INF, -1.0, 0.0, 0.5, 1.0, 1.5, 2.0, 2.0001, INF, NAN])
    assert numeric_slot(edges, values).tolist() == [0, 0, 1, 1, 2, 2, 2, 3, 3, -1]


@given(data=st.data(), edges=edges_st())
def test_numeric_slot_matches_reference_loop(data: st.DataObject, edges: list[float]) -> None:
    """numeric_slot agrees with a plain-Python loop for any values, including the edges."""
    values = data.draw(st.lists(st.one_of(values_st, st.sampled_from(edges)), max_size=50))
    got = numeric_slot(np.array(edges), np.array(values, dtype=np.float64))
    assert got.dtype == np.int64
    assert got.tolist() == [reference_slot(edges, v) for v in values]


# --- updates -------------------------------------------------------------------------------


def test_update_numeric_counts_slots_missing_and_moments() -> None:
    """Numeric updates count slots and NaNs, and moments leave out NaN and ±inf."""
    s = Sketch.empty(make_layout())
    s.update_numeric(0, np.array([-20.0, -10.0, 3.0, 20.0, 21.0, INF, -INF, NAN]))
    assert s.feature_counts(0).tolist() == [2, 1, 1, 1, 2]
    assert s.missing.tolist() == [1, 0, 0]
    assert s.n_rows(0) == 8
    finite = np.array([-20.0, -10.0, 3.0, 20.0, 21.0])
    n, mean, m2, lo, hi = s.moments[0]
    assert (n, lo, hi) == (5.0, -20.0, 21.0)
    assert mean == pytest.approx(finite.mean(), rel=1e-12)
    assert m2 == pytest.approx(finite.var() * 5, rel=1e-12)


def test_absurd_values_are_counted_but_kept_out_of_the_moments() -> None:
    """Values beyond ±MOMENT_LIMIT fill the tail slots but leave the moments finite."""
    s = Sketch.empty(make_layout())
    s.update_numeric(0, np.array([1e300, -1e300, 1.7e308, 2.0, 4.0]))
    assert s.feature_counts(0).tolist() == [1, 0, 2, 0, 2]
    assert s.moments[0].tolist() == [2.0, 3.0, 2.0, 2.0, 4.0]


def test_update_categorical_maps_missing_known_and_other() -> None:
    """None, NaN and '' are missing; unknown values count as other; non-strings match by str."""
    layout = SketchLayout((FeatureLayout("c", "categorical", categories=("a", "b", "7")),))
    s = Sketch.empty(layout)
    s.update_categorical(0, ["a", "b", "b", "zzz", None, NAN, "", 7, np.str_("a")])
    assert s.feature_counts(0).tolist() == [2, 2, 1, 1]
    assert s.missing.tolist() == [3]
    assert s.moments[0].tolist() == [0.0, 0.0, 0.0, INF, -INF]


def test_update_codes_counts_premapped_codes_and_rejects_out_of_range() -> None:
    """Codes -1..k are counted as missing/category/other; anything outside raises SketchError."""
    s = Sketch.empty(make_layout())
    s.update_codes(1, np.array([-1, 0, 0, 2, 3, 3, 3]))
    assert s.feature_counts(1).tolist() == [2, 0, 1, 3]
    assert s.missing[1] == 1
    with pytest.raises(SketchError, match=r"'colour'.*\[0, 4\].*-1\.\.3"):
        s.update_codes(1, np.array([0, 4]))
    with pytest.raises(SketchError, match="integers"):
        s.update_codes(1, np.array([0.5]))


def test_updates_reject_the_wrong_kind_and_index() -> None:
    """Numeric updates on a categorical feature (and vice versa) or a bad index raise."""
    s = Sketch.empty(make_layout())
    with pytest.raises(SketchError, match=r"'colour' .* is categorical, not numeric"):
        s.update_numeric(1, np.array([1.0]))
    with pytest.raises(SketchError, match=r"'temp' .* is numeric, not categorical"):
        s.update_categorical(0, ["a"])
    with pytest.raises(SketchError, match="index 3 is out of range"):
        s.update(3, [1.0])
    with pytest.raises(SketchError, match="'temp': values are not numbers"):
        s.update_numeric(0, np.array(["x"]))


def test_update_dispatches_on_feature_kind() -> None:
    """update() routes numeric and categorical features to the matching method."""
    a, b = Sketch.empty(make_layout()), Sketch.empty(make_layout())
    a.update(0, [1.0, NAN])
    a.update(1, ["red", None])
    b.update_numeric(0, np.array([1.0, NAN]))
    b.update_categorical(1, ["red", None])
    assert a == b


# --- merge ---------------------------------------------------------------------------------


def sketch_of(layout: SketchLayout, nums: list[float], cats: list[Any]) -> Sketch:
    s = Sketch.empty(layout)
    s.update_numeric(0, np.array(nums, dtype=np.float64))
    s.update_categorical(1, cats)
    s.update_numeric(2, np.array(nums, dtype=np.float64) * 1e-3)
    return s


def assert_same_window(merged: Sketch, whole: Sketch) -> None:
    """Counts, missing, count/min/max exactly; mean and M2 up to rounding on the data's scale."""
    assert np.array_equal(merged.counts, whole.counts)
    assert np.array_equal(merged.missing, whole.missing)
    exact = [0, 3, 4]
    assert np.array_equal(merged.moments[:, exact], whole.moments[:, exact])
    for j in range(whole.layout.n_features):
        n, _, _, lo, hi = whole.moments[j]
        scale = max(abs(lo), abs(hi), 1e-300) if n else 1.0
        assert merged.moments[j, 1] == pytest.approx(
            whole.moments[j, 1], rel=1e-9, abs=1e-9 * scale
        )
        assert merged.moments[j, 2] == pytest.approx(
            whole.moments[j, 2], rel=1e-9, abs=1e-9 * max(n, 1) * scale * scale
        )


@settings(deadline=None)
@given(
    nums=st.lists(values_st, max_size=60),
    cats=st.lists(categories_st, max_size=60),
    cuts=st.lists(st.integers(0, 60), max_size=4),
    order=st.randoms(use_true_random=False),
)
def test_merging_parts_in_any_order_equals_the_whole(
    nums: list[float], cats: list[Any], cuts: list[int], order: Any
) -> None:
    """Sketches of any split of a stream, merged in any order, equal the sketch of the whole."""
    layout = make_layout()
    whole = sketch_of(layout, nums, cats)
    bounds = sorted({0, len(nums), *(min(c, len(nums)) for c in cuts)})
    cbounds = sorted({0, len(cats), *(min(c, len(cats)) for c in cuts)})
    parts = [sketch_of(layout, nums[a:b], []) for a, b in itertools.pairwise(bounds)]
    parts += [sketch_of(layout, [], cats[a:b]) for a, b in itertools.pairwise(cbounds)]
    for ordering in (parts, parts[::-1], order.sample(parts, len(parts))):
        merged = Sketch.empty(layout)
        for part in ordering:
            merged += part
        assert_same_window(merged, whole)


@settings(deadline=None)
@given(nums=st.lists(values_st, min_size=1, max_size=80))
def test_moments_equal_numpy_on_the_finite_values(nums: list[float]) -> None:
    """count, mean, M2 = var * count, min and max match numpy over the values within the limit."""
    layout = make_layout()
    s = Sketch.empty(layout)
    for x in nums:  # one value at a time: the most merges possible
        s.update_numeric(0, np.array([x]))
    finite = np.array([x for x in nums if abs(x) <= MOMENT_LIMIT])
    n, mean, m2, lo, hi = s.moments[0]
    assert n == finite.size
    if finite.size == 0:
        assert (mean, m2, lo, hi) == (0.0, 0.0, INF, -INF)
        return
    scale = float(np.abs(finite).max()) or 1.0
    assert (lo, hi) == (finite.min(), finite.max())
    assert mean == pytest.approx(finite.mean(), rel=1e-9, abs=1e-9 * scale)
    assert m2 == pytest.approx(finite.var() * n, rel=1e-9, abs=1e-9 * n * scale * scale)


def test_merge_moments_with_an_empty_side_is_identity() -> None:
    """Merging moments with an empty row returns the other row unchanged, either way round."""
    row = np.array([3.0, 2.0, 8.0, -1.0, 5.0])
    empty = np.array([0.0, 0.0, 0.0, INF, -INF])
    assert merge_moments(row, empty).tolist() == row.tolist()
    assert merge_moments(empty, row).tolist() == row.tolist()
    assert merge_moments(empty, empty).tolist() == empty.tolist()


def test_merge_moments_follows_chan() -> None:
    """Two halves' moments merge to the whole's mean and M2 (Chan et al.)."""
    a, b = np.array([1.0, 2.0, 3.0]), np.array([10.0, 20.0])
    ma = np.array([3, a.mean(), a.var() * 3, a.min(), a.max()])
    mb = np.array([2, b.mean(), b.var() * 2, b.min(), b.max()])
    whole = np.concatenate([a, b])
    got = merge_moments(ma, mb)
    assert got[[0, 3, 4]].tolist() == [5.0, 1.0, 20.0]
    assert got[1] == pytest.approx(whole.mean(), rel=1e-15)
    assert got[2] == pytest.approx(whole.var() * 5, rel=1e-14)


def test_merge_returns_a_new_sketch_and_iadd_mutates() -> None:
    """merge leaves both operands untouched; += adds into the left operand."""
    layout = make_layout()
    a, b = sketch_of(layout, [1.0, 2.0], ["red"]), sketch_of(layout, [30.0], [None])
    a0, b0 = a.copy(), b.copy()
    m = a.merge(b)
    assert a == a0 and b == b0
    assert m.n_rows(0) == 3
    a += b
    assert a == m


def test_merge_of_different_layouts_raises() -> None:
    """Sketches of layouts with different fingerprints refuse to merge, naming both prints."""
    a = Sketch.empty(make_layout())
    other = SketchLayout((FeatureLayout("temp", "numeric", edges=(0.0, 1.0)),))
    with pytest.raises(SketchError, match=other.fingerprint()):
        a.merge(Sketch.empty(other))
    with pytest.raises(SketchError, match="different layouts"):
        a += Sketch.empty(other)


def test_copy_is_independent_and_equality_is_exact() -> None:
    """copy() shares no arrays, and == compares counts, missing and moments exactly."""
    a = sketch_of(make_layout(), [1.0, 2.0], ["red"])
    b = a.copy()
    assert a == b
    b.counts[0] += 1
    assert a != b
    c = a.copy()
    c.moments[0, 1] = np.nextafter(c.moments[0, 1], INF)
    assert a != c


def test_feature_counts_is_a_view() -> None:
    """feature_counts returns a view into the flat counts array, not a copy."""
    s = Sketch.empty(make_layout())
    s.feature_counts(1)[2] = 5
    assert s.counts[5 + 2] == 5


def test_constructor_checks_shapes_and_signs() -> None:
    """Arrays of the wrong shape or negative counts raise SketchError."""
    layout = make_layout()
    e = Sketch.empty(layout)
    with pytest.raises(SketchError, match="counts has shape"):
        Sketch(layout, e.counts[:-1], e.missing, e.moments)
    bad = e.counts.copy()
    bad[0] = -1
    with pytest.raises(SketchError, match="non-negative"):
        Sketch(layout, bad, e.missing, e.moments)
