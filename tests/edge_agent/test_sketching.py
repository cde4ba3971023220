"""The batch sketch kernel agrees with Sketch.update_numeric / update_codes; the row buffer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.errors import AgentError
from edge_agent.sketching import KernelLayout, RowBuffer, update_sketch, warmup
from fleet_protocol.errors import SketchError
from fleet_protocol.sketch import MOMENT_LIMIT, FeatureLayout, Sketch, SketchLayout

# Compilation (or loading numba's cache) happens on the first example, so no per-example deadline.
SETTINGS = settings(deadline=None, max_examples=200)
NAN, INF = math.nan, math.inf
TINY = 1e-300

# Values a device might see: ordinary, huge, tiny, non-finite, at and beyond the moment limit.
SPECIAL = [NAN, INF, -INF, 1e200, -1e200, MOMENT_LIMIT, -MOMENT_LIMIT, 1.0000000000000002e100,
           0.0, -0.0, 5e-324, 1e-300]
ordinary = st.one_of(
    st.floats(-1e6, 1e6, allow_nan=False),
    st.integers(-50, 50).map(float),
    st.floats(-1e-300, 1e-300, allow_nan=False),
)


@st.composite
def edges_st(draw: st.DrawFn) -> tuple[float, ...]:
    """2..40 strictly increasing finite edges (more than 24 exercises the bisection path)."""
    raw = draw(st.lists(st.one_of(st.integers(-100, 100).map(float),
                                  st.floats(-1e6, 1e6, allow_nan=False)),
                        min_size=2, max_size=40, unique=True))
    edges = tuple(sorted(set(raw)))
    if len(edges) < 2:
        edges = (edges[0], edges[0] + 1.0)
    return edges


@st.composite
def feature_st(draw: st.DrawFn, name: str) -> FeatureLayout:
    if draw(st.booleans()):
        return FeatureLayout(name, "numeric", edges=draw(edges_st()))
    k = draw(st.integers(1, 5))
    return FeatureLayout(name, "categorical", categories=tuple(f"c{i}" for i in range(k)))


@dataclass
class Case:
    layout: SketchLayout
    batches: list[np.ndarray]


@st.composite
def cases(draw: st.DrawFn, max_batches: int = 4, max_rows: int = 40) -> Case:
    """A random layout and a few (n_rows, n_features) batches of values and codes."""
    n_features = draw(st.integers(1, 5))
    layout = SketchLayout(tuple(draw(feature_st(f"f{j}")) for j in range(n_features)))
    batches = []
    for _ in range(draw(st.integers(1, max_batches))):
        n_rows = draw(st.integers(0, max_rows))
        cols = []
        for f in layout.features:
            if f.kind == "numeric":
                elem = st.one_of(ordinary, st.sampled_from(SPECIAL), st.sampled_from(f.edges))
            else:
                elem = st.one_of(st.integers(-1, len(f.categories)).map(float), st.just(NAN))
            if draw(st.booleans()):  # a constant column
                cols.append([draw(elem)] * n_rows)
            else:
                cols.append(draw(st.lists(elem, min_size=n_rows, max_size=n_rows)))
        batches.append(np.array(cols, dtype=np.float64).T.reshape(n_rows, n_features))
    return Case(layout, batches)


def reference_update(sketch: Sketch, batch: np.ndarray) -> None:
    """The numpy reference, one column at a time (NaN codes are passed as -1)."""
    for j, f in enumerate(sketch.layout.features):
        col = batch[:, j]
        if f.kind == "numeric":
            sketch.update_numeric(j, col)
        else:
            sketch.update_codes(j, np.where(np.isnan(col), -1, col).astype(np.int64))


def assert_agree(kernel: Sketch, ref: Sketch, data: list[np.ndarray]) -> None:
    """Counts, missing, moment count/min/max exact; mean and M2 to rounding at the data's scale."""
    np.testing.assert_array_equal(kernel.counts, ref.counts)
    np.testing.assert_array_equal(kernel.missing, ref.missing)
    for col in (0, 3, 4):
        np.testing.assert_array_equal(kernel.moments[:, col], ref.moments[:, col])
    for j in range(kernel.layout.n_features):
        x = np.concatenate([b[:, j] for b in data]) if data else np.zeros(0)
        x = x[np.abs(x) <= MOMENT_LIMIT]
        scale = float(np.max(np.abs(x))) if x.size else 0.0
        n = x.size
        mean_k, m2_k = kernel.moments[j, 1], kernel.moments[j, 2]
        mean_r, m2_r = ref.moments[j, 1], ref.moments[j, 2]
        # TINY absorbs the last-bit rounding of subnormal values, where relative bounds fail.
        assert abs(mean_k - mean_r) <= 1e-12 * scale + TINY, (j, mean_k, mean_r)
        assert abs(m2_k - m2_r) <= 1e-9 * m2_r + 1e-12 * n * scale * scale + TINY, (j, m2_k, m2_r)
    kernel.check()


@pytest.fixture(scope="module", autouse=True)
def _compiled() -> None:
    warmup()


@SETTINGS
@given(case=cases())
def test_batches_match_reference(case: Case) -> None:
    """Folding each batch with the kernel equals the reference applied to the same batches."""
    kl = KernelLayout.from_layout(case.layout)
    kernel, ref = Sketch.empty(case.layout), Sketch.empty(case.layout)
    for batch in case.batches:
        update_sketch(kernel, kl, batch)
        reference_update(ref, batch)
        assert_agree(kernel, ref, case.batches)


@SETTINGS
@given(case=cases())
def test_several_batches_equal_one(case: Case) -> None:
    """Folding batches one by one equals folding their concatenation in one call."""
    kl = KernelLayout.from_layout(case.layout)
    several, one = Sketch.empty(case.layout), Sketch.empty(case.layout)
    for batch in case.batches:
        update_sketch(several, kl, batch)
    update_sketch(one, kl, np.concatenate(case.batches))
    assert_agree(several, one, case.batches)


@SETTINGS
@given(case=cases(max_batches=1))
def test_empty_batch_changes_nothing(case: Case) -> None:
    """A batch of zero rows leaves counts, missing and moments bit-for-bit unchanged."""
    kl = KernelLayout.from_layout(case.layout)
    sketch = Sketch.empty(case.layout)
    update_sketch(sketch, kl, case.batches[0])
    before = sketch.copy()
    update_sketch(sketch, kl, np.zeros((0, case.layout.n_features)))
    assert sketch == before


@SETTINGS
@given(case=cases(max_batches=1), order=st.sampled_from(["F", "sliced", "unaligned"]))
def test_non_contiguous_values_give_the_same_result(case: Case, order: str) -> None:
    """Fortran-ordered, strided or unaligned input is folded exactly like the same values in
    aligned C order (the ahead-of-time build is compiled for aligned C order only)."""
    kl = KernelLayout.from_layout(case.layout)
    batch = case.batches[0]
    if order == "F":
        other = np.asfortranarray(batch)
    elif order == "unaligned":
        raw = np.zeros(batch.nbytes + 1, dtype=np.uint8)
        other = raw[1:].view(np.float64).reshape(batch.shape)
        other[...] = batch
        assert not other.flags.aligned or batch.size == 0
    else:
        wide = np.zeros((batch.shape[0], 2 * batch.shape[1]))
        wide[:, ::2] = batch
        other = wide[:, ::2]
    a, b = Sketch.empty(case.layout), Sketch.empty(case.layout)
    update_sketch(a, kl, batch)
    update_sketch(b, kl, other)
    assert a == b


def _layout() -> SketchLayout:
    return SketchLayout(
        (
            FeatureLayout("temp", "numeric", edges=(-10.0, 0.0, 5.0, 20.0)),
            FeatureLayout("colour", "categorical", categories=("red", "green", "blue")),
            FeatureLayout("load", "numeric", edges=(0.0, 0.5, 1.0)),
        )
    )


@st.composite
def float32_cases(draw: st.DrawFn) -> tuple[SketchLayout, np.ndarray]:
    """A layout whose edges float32 cannot hold (and some beyond float32's range, and one
    long list for the bisection path), with float32 values at, next to and between them."""
    n_features = draw(st.integers(1, 4))
    features = []
    for j in range(n_features):
        if draw(st.integers(0, 4)) == 0:
            features.append(FeatureLayout(f"f{j}", "categorical", categories=("a", "b")))
            continue
        raw = draw(edges_st())
        # nudge each edge off the float32 grid (or far outside it)
        edges = sorted({e + draw(st.sampled_from([0.0, 1e-9, -1e-9, 1e-12])) * max(1.0, abs(e))
                        for e in raw} | set(draw(st.lists(st.sampled_from(
                            [1e39, -1e39, 3.4028235e38, 1e-40]), max_size=2))))
        if len(edges) < 2:
            edges.append(edges[-1] + 1.0)
        if draw(st.integers(0, 9)) == 0:  # over _LINEAR_MAX_EDGES: the bisection path
            edges = sorted(set(edges) | set(np.linspace(-5e5, 5e5, 600).tolist()))
        features.append(FeatureLayout(f"f{j}", "numeric", edges=tuple(edges)))
    layout = SketchLayout(tuple(features))
    n_rows = draw(st.integers(0, 50))
    cols = []
    for f in layout.features:
        if f.kind == "numeric":
            with np.errstate(over="ignore"):
                near = [float(np.nextafter(np.float32(e), np.float32(d)))
                        for e in f.edges[:40] for d in (-np.inf, np.inf)]
            elem = st.one_of(ordinary, st.sampled_from(SPECIAL), st.sampled_from(f.edges),
                             st.sampled_from(near))
        else:
            elem = st.one_of(st.integers(-1, 2).map(float), st.just(NAN))
        cols.append(draw(st.lists(elem, min_size=n_rows, max_size=n_rows)))
    with np.errstate(over="ignore"):
        values = np.array(cols, dtype=np.float64).T.reshape(n_rows, n_features)
        return layout, values.astype(np.float32)


@SETTINGS
@given(case=float32_cases())
def test_float32_values_fold_like_their_float64_values(
        case: tuple[SketchLayout, np.ndarray]) -> None:
    """The agent stages float32 rows: they fold to the same bits as the same values widened
    to float64, next to edges float32 cannot hold too."""
    layout, values = case
    kl = KernelLayout.from_layout(layout)
    narrow, wide = Sketch.empty(layout), Sketch.empty(layout)
    update_sketch(narrow, kl, values)
    update_sketch(wide, kl, values.astype(np.float64))
    np.testing.assert_array_equal(narrow.counts, wide.counts)
    np.testing.assert_array_equal(narrow.missing, wide.missing)
    assert narrow.moments.tobytes() == wide.moments.tobytes()
    ref = Sketch.empty(layout)
    reference_update(ref, values.astype(np.float64))
    np.testing.assert_array_equal(narrow.counts, ref.counts)


def test_bin_rule_by_hand() -> None:
    """Edges, the last edge, ±inf, the moment limit and codes land in the documented slots."""
    layout = _layout()
    sketch = Sketch.empty(layout)
    rows = np.array(
        [
            [-10.0, 0.0, 1.0],  # first edge -> bin 1; code 0; last edge -> last inner bin
            [20.0, 3.0, 1.5],  # last edge -> bin 3; other; overflow
            [-INF, -1.0, -0.0],  # underflow; missing; -0.0 is on edge 0.0 -> bin 1
            [INF, NAN, NAN],  # overflow; NaN code missing; missing
            [1e200, 2.0, 0.5],  # overflow, not in moments; blue; edge 0.5 -> bin 2
        ]
    )
    update_sketch(sketch, KernelLayout.from_layout(layout), rows)
    assert sketch.feature_counts(0).tolist() == [1, 1, 0, 1, 2]
    assert sketch.feature_counts(1).tolist() == [1, 0, 1, 1]
    assert sketch.feature_counts(2).tolist() == [0, 1, 2, 1]
    assert sketch.missing.tolist() == [0, 2, 1]
    assert sketch.moments[0].tolist() == [2.0, 5.0, 450.0, -10.0, 20.0]
    assert sketch.moments[1].tolist() == [0.0, 0.0, 0.0, INF, -INF]
    assert sketch.moments[2, 0] == 4.0 and sketch.moments[2, 3] == -0.0


def test_constant_batch_has_zero_m2() -> None:
    """A batch of one repeated value merges with an M2 of exactly 0 (the shifted mean)."""
    layout = _layout()
    sketch = Sketch.empty(layout)
    rows = np.tile([0.1, 0.0, 0.7], (300, 1))
    update_sketch(sketch, KernelLayout.from_layout(layout), rows)
    assert sketch.moments[0].tolist() == [300.0, 0.1, 0.0, 0.1, 0.1]
    assert sketch.moments[2].tolist() == [300.0, 0.7, 0.0, 0.7, 0.7]


@pytest.mark.parametrize("code", [1.5, 4.0, -2.0, INF, -INF])
def test_invalid_code_raises_and_counts_nothing(code: float) -> None:
    """A code outside -1..k, or not an integer, raises SketchError and counts nothing."""
    layout = _layout()
    sketch = Sketch.empty(layout)
    before = sketch.copy()
    rows = np.array([[1.0, 0.0, 0.2], [2.0, code, 0.3]])
    with pytest.raises(SketchError, match=r"'colour': row 1 has code"):
        update_sketch(sketch, KernelLayout.from_layout(layout), rows)
    assert sketch == before


def test_layout_mismatch_and_bad_shape_raise() -> None:
    """Another layout's kernel layout, or values of the wrong shape or type, raise SketchError."""
    layout = _layout()
    other = SketchLayout((FeatureLayout("x", "numeric", edges=(0.0, 1.0)),))
    sketch = Sketch.empty(layout)
    with pytest.raises(SketchError, match="does not match"):
        update_sketch(sketch, KernelLayout.from_layout(other), np.zeros((1, 1)))
    kl = KernelLayout.from_layout(layout)
    for bad in (np.zeros((2, 2)), np.zeros(3), np.zeros((1, 3, 1))):
        with pytest.raises(SketchError, match="expected"):
            update_sketch(sketch, kl, bad)
    with pytest.raises(SketchError, match="not float64 numbers"):
        update_sketch(sketch, kl, [["a", "b", "c"]])
    assert sketch == Sketch.empty(layout)


def test_kernel_layout_flattens_the_layout() -> None:
    """from_layout records offsets, concatenated edges, starts, counts and slots per feature."""
    kl = KernelLayout.from_layout(_layout())
    assert kl.offsets.tolist() == [0, 5, 9]
    assert kl.edges.tolist() == [-10.0, 0.0, 5.0, 20.0, 0.0, 0.5, 1.0]
    assert kl.edge_start.tolist() == [0, -1, 4]
    assert kl.edge_count.tolist() == [4, 0, 3]
    assert kl.numeric.tolist() == [True, False, True]
    assert kl.n_slots.tolist() == [5, 4, 4]
    assert not kl.edges.flags.writeable


def test_kernel_layout_arrays_are_made_what_the_kernels_expect() -> None:
    """A KernelLayout built field by field gets read-only, C-contiguous arrays of its dtypes
    (the ahead-of-time build checks them only here); a 2-D array raises SketchError."""
    kl = KernelLayout.from_layout(_layout())
    fields = {name: getattr(kl, name) for name in
              ("offsets", "edges", "edge_start", "edge_count", "numeric", "n_slots", "last")}
    # lists, and a strided writable float32 array
    given: dict[str, Any] = {name: a.tolist() for name, a in fields.items()}
    given["edges"] = np.repeat(fields["edges"].astype(np.float32), 2)[::2]
    loose = KernelLayout(**given, fingerprint=kl.fingerprint)
    for name, a in fields.items():
        b = getattr(loose, name)
        assert b.dtype == a.dtype and b.flags.c_contiguous and not b.flags.writeable, name
        assert b.tolist() == a.tolist(), name
    assert kl.offsets is fields["offsets"]  # from_layout's arrays are kept, not copied again
    with pytest.raises(SketchError, match="offsets has shape"):
        KernelLayout(**{**fields, "offsets": fields["offsets"][None, :]},
                     fingerprint=kl.fingerprint)


def test_row_buffer_fills_drains_and_refuses_overflow() -> None:
    """append reports full on the last row; drain returns rows in order; full refuses."""
    buf = RowBuffer(3, 2)
    assert buf.append(np.array([1.0, 2.0])) is False
    assert buf.append([3.0, 4.0]) is False
    assert buf.append(np.array([5.0, 6.0])) is True
    assert buf.full and len(buf) == 3
    with pytest.raises(AgentError, match="full"):
        buf.append(np.array([7.0, 8.0]))
    out = buf.drain()
    assert out.tolist() == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    assert out.flags.c_contiguous
    assert len(buf) == 0 and not buf.full
    assert buf.drain().shape == (0, 2)
    with pytest.raises(AgentError, match="2 features"):
        buf.append(np.array([1.0, 2.0, 3.0]))


def test_row_buffer_append_many_takes_what_fits() -> None:
    """append_many copies as many rows as fit and returns that number."""
    buf = RowBuffer(4, 2)
    rows = np.arange(12.0).reshape(6, 2)
    assert buf.append_many(rows[:1]) == 1
    assert buf.append_many(rows[1:]) == 3
    assert buf.full
    assert buf.drain().tolist() == rows[:4].tolist()
    assert buf.append_many(rows[4:]) == 2
    assert buf.drain().tolist() == rows[4:].tolist()
    with pytest.raises(AgentError, match="shape"):
        buf.append_many(np.zeros((2, 3)))
    with pytest.raises(AgentError, match="capacity"):
        RowBuffer(0, 2)


@SETTINGS
@given(case=cases(max_batches=1, max_rows=60), capacity=st.integers(1, 16))
def test_buffered_rows_sketch_like_the_whole_batch(case: Case, capacity: int) -> None:
    """Rows appended one by one and folded at each drain give the sketch of the whole batch."""
    kl = KernelLayout.from_layout(case.layout)
    batch = case.batches[0]
    buffered, whole = Sketch.empty(case.layout), Sketch.empty(case.layout)
    buf = RowBuffer(capacity, case.layout.n_features)
    for row in batch:
        if buf.append(row):
            update_sketch(buffered, kl, buf.drain())
    update_sketch(buffered, kl, buf.drain())
    update_sketch(whole, kl, batch)
    assert_agree(buffered, whole, [batch])


def test_inconsistent_kernel_layouts_and_sketches_are_refused() -> None:
    """The kernels index without bounds checks: a layout whose arrays disagree (a last edge
    that is not the last edge, a short per-feature array, offsets with a gap, edges past the
    end) or a sketch whose arrays are not of the layout's shape is refused before any fold."""
    from dataclasses import asdict, replace

    layout = _layout()
    kl = KernelLayout.from_layout(layout)
    fields = asdict(kl)
    bad = [
        {"last": np.array([1.0, 0.0, 0.5])},
        {"edge_start": np.array([0, -1])},
        {"offsets": np.array([0, 6, 9])},
        {"edge_count": np.array([4, 0, 9])},
        {"n_slots": np.array([5, 4, 9])},
    ]
    for change in bad:
        with pytest.raises(SketchError, match="kernel layout"):
            KernelLayout(**{**fields, **change})
    sketch = Sketch.empty(layout)
    sketch.moments = np.zeros((1, 5))
    with pytest.raises(SketchError, match="do not fit layout"):
        update_sketch(sketch, kl, np.zeros((2, 3)))
    assert replace(kl).total_slots == len(Sketch.empty(layout).counts)
