"""The serving fast paths: sketches folded off the request path, exactly, and nothing lost.

Serving stages rows for a fold thread (edge_agent.telemetry); these tests pin what that must
not change: a flush commits every row predicted before it, a full fold queue makes the request
fold instead of dropping rows, close() folds everything, and the sketches are the same bits as
folding each request's batch synchronously, in order. The kernels' own exactness is pinned
against a plain-Python loop that does the arithmetic the module docstring promises, and the
single-row IO binding against onnxruntime's run().
"""

from __future__ import annotations

import itertools
import math
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings

from edge_agent.agent import Agent, _scores
from edge_agent.config import AgentConfig, TelemetryConfig
from edge_agent.model import Prediction
from edge_agent.sketching import (
    KernelLayout,
    fold_stage,
    update_sketch,
    update_sketch_segments,
    warmup,
)
from edge_agent.telemetry import BUFFER_ROWS, STAGE_BYTES, STAGE_ROWS, TelemetryRecorder
from fleet_protocol.errors import SketchError
from fleet_protocol.sketch import MOMENT_LIMIT, FeatureLayout, Sketch, SketchLayout
from tests.conftest import make_classification_data
from tests.edge_agent.test_sketching import cases

SETTINGS = settings(deadline=None, max_examples=150)
T0 = 1_700_000_000.0


class Clock:
    """A settable clock: every request of a test lands in one window."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _config(data_dir: Path, keypair: Any, bundle: Path) -> AgentConfig:
    return AgentConfig(data_dir=data_dir, trusted_keys=(keypair.public_path,), bundle=bundle,
                       telemetry=TelemetryConfig(window_seconds=60, flush_interval_seconds=0.05))


@pytest.fixture
def make_agent(tmp_path: Path, keypair: Any, small_bundle: Any) -> Iterator[Any]:
    """Agents on the small bundle, each with its own data dir and a fixed clock."""
    made: list[Agent] = []

    def _make(**kwargs: Any) -> Agent:
        kwargs.setdefault("start_writer", False)
        agent = Agent(_config(tmp_path / f"agent{len(made)}", keypair, small_bundle.path),
                      clock=Clock(), **kwargs)
        made.append(agent)
        return agent

    yield _make
    for agent in made:
        if agent._accepting:
            agent.close()


def _rows(n: int, seed: int = 0) -> np.ndarray:
    X, _ = make_classification_data(n=max(n, 10), d=6, seed=seed)
    return np.ascontiguousarray(X[:n], dtype=np.float32)


@dataclass
class Plan:
    """Requests in order: ("row", 1-D row), ("batch", 2-D rows) or ("flush", None)."""

    steps: list[tuple[str, np.ndarray | None]]


def _plan(seed: int, n_steps: int = 60) -> Plan:
    rng = np.random.default_rng(seed)
    X = _rows(4000, seed=seed)
    steps: list[tuple[str, np.ndarray | None]] = []
    at = 0
    for _ in range(n_steps):
        kind = rng.choice(["rows", "batch", "flush"], p=[0.45, 0.45, 0.1])
        if kind == "rows":
            for _ in range(int(rng.integers(1, 90))):
                steps.append(("row", X[at % len(X)]))
                at += 1
        elif kind == "batch":
            k = int(rng.integers(2, 300))
            steps.append(("batch", np.resize(np.roll(X, -at, axis=0), (k, 6))))
            at += k
        else:
            steps.append(("flush", None))
    return Plan(steps)


class Reference:
    """The sketches as synchronous folding builds them: each batch when it is served, single
    rows in blocks of BUFFER_ROWS (and what is left at a flush), with update_sketch."""

    def __init__(self, agent: Agent) -> None:
        self.tel = agent.serving().telemetry
        self.inputs = Sketch.empty(self.tel.input_layout)
        self.outputs = Sketch.empty(self.tel.output_layout)
        self.rows: list[np.ndarray] = []
        self.outs: list[tuple[float, float]] = []
        self.n = 0

    def _fold(self, rows: np.ndarray, outs: np.ndarray) -> None:
        update_sketch(self.inputs, self.tel.k_in, rows.astype(np.float64))
        update_sketch(self.outputs, self.tel.k_out, outs)
        self.n += len(rows)

    def _codes(self, labels: Any) -> list[int]:
        return [self.tel.label_codes.get(str(v), self.tel.other_label) for v in labels]

    def served(self, x: np.ndarray, result: Any) -> None:
        if x.ndim == 1:
            score = max(result.probabilities[0].tolist())
            self.rows.append(x)
            self.outs.append((float(self._codes(result.labels)[0]), score))
            if len(self.rows) == BUFFER_ROWS:
                self.flushed()
            return
        scores = result.probabilities.max(axis=1).astype(np.float64)
        self._fold(x, np.column_stack([np.array(self._codes(result.labels), dtype=np.float64),
                                       scores]))

    def flushed(self) -> None:
        if self.rows:
            self._fold(np.vstack(self.rows), np.array(self.outs, dtype=np.float64))
            self.rows, self.outs = [], []


def _serve(agent: Agent, plan: Plan, ref: Reference | None = None) -> int:
    n = 0
    for kind, x in plan.steps:
        if kind == "flush":
            agent.flush()
            if ref is not None:
                ref.flushed()
            continue
        assert x is not None
        result = agent.predict(x)
        n += result.n
        if ref is not None:
            ref.served(x, result)
    return n


def _committed(db: Path) -> tuple[int, bytes, bytes]:
    """(rows, inputs sketch bytes, outputs sketch bytes) of the one window in the database."""
    with sqlite3.connect(db) as conn:
        (row,) = conn.execute("SELECT rows, inputs, outputs FROM windows").fetchall()
    return int(row[0]), bytes(row[1]), bytes(row[2])


def _assert_committed_equals(agent: Agent, ref: Reference) -> None:
    rows, inputs, outputs = _committed(agent.config.db_path)
    assert rows == ref.n
    assert inputs == ref.inputs.to_bytes()
    assert outputs == ref.outputs.to_bytes()


# --- flush, backpressure, close ---------------------------------------------------------------


def test_the_sketch_kernels_load_before_the_model_serves(make_agent: Any,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """Loaded when the model is registered (numba's cache takes ~0.5 s, the GIL held in
    slices), not by the request that stages first, which made every concurrent request wait."""
    import edge_agent.telemetry as telemetry

    loads: list[str] = []
    monkeypatch.setattr(telemetry, "warmup", lambda: loads.append(
        threading.current_thread().name))
    agent = make_agent()
    assert loads == [threading.current_thread().name]  # in the constructor, once
    agent.predict(_rows(300))
    for x in _rows(BUFFER_ROWS + 1, seed=2):
        agent.predict(x)
    agent.flush()
    assert len(loads) == 1


def test_rows_predicted_right_before_a_flush_are_in_its_window(make_agent: Any) -> None:
    """With the fold thread running, a flush right after serving commits every row served, the
    same bits as synchronous folding (staged and queued rows are folded before it snapshots)."""
    agent = make_agent()
    ref = Reference(agent)
    plan = Plan([("row", x) for x in _rows(300, seed=1)]
                + [("batch", _rows(700, seed=k)) for k in (2, 3, 4)]
                + [("row", x) for x in _rows(40, seed=5)])
    served = _serve(agent, plan, ref)
    agent.flush()
    ref.flushed()
    assert served == ref.n == 300 + 3 * 700 + 40
    _assert_committed_equals(agent, ref)
    (window,) = agent.store.windows()
    assert window.metrics["requests"] == 343 and window.metrics["latency_us"]["count"] == 343


def test_a_stage_holds_stage_rows_or_what_fits_stage_bytes(make_agent: Any) -> None:
    """Stages are large (each queued stage wakes the fold thread once, ~20 µs on a small VM)
    but bounded in bytes: a narrow model's stage takes STAGE_ROWS rows, sixteen 1024-row batches
    of six features fill one stage; a wide model's holds what fits STAGE_BYTES, at least a
    buffer of single rows."""
    agent = make_agent(fold_thread=False, fold_queue_stages=100)
    rec = agent.recorder
    for k in range(16):  # one wake-up per 16 batches at most
        assert not rec._jobs
        agent.predict(_rows(1024, seed=k))
    assert [stage.capacity for stage in rec._jobs] == [STAGE_ROWS] == [16 * 1024]
    wide = TelemetryRecorder(60.0)
    assert wide._capacity(16) == STAGE_ROWS
    assert wide._capacity(784) == STAGE_BYTES // (4 * 784) == 334
    assert wide._capacity(100_000) == BUFFER_ROWS
    assert TelemetryRecorder(60.0, stage_rows=64)._capacity(784) == 64


def test_a_full_fold_queue_folds_inline_and_loses_nothing(make_agent: Any) -> None:
    """Without a fold thread to drain it, the queue never holds more than its bound: the request
    that overfills it folds the oldest stage itself; the result is the synchronous sketch."""
    agent = make_agent(fold_thread=False, stage_rows=64, fold_queue_stages=2)
    rec = agent.recorder
    ref = Reference(agent)
    for kind, x in _plan(seed=7).steps:
        if kind == "flush":
            agent.flush()
            ref.flushed()
            continue
        assert x is not None
        ref.served(x, agent.predict(x))
        assert len(rec._jobs) <= 2
    assert rec.inline_folds > 0
    agent.flush()
    ref.flushed()
    _assert_committed_equals(agent, ref)


@pytest.mark.parametrize("seed", [11, 12])
def test_a_running_fold_thread_with_a_tiny_queue_gives_the_same_bits(make_agent: Any,
                                                                   seed: int) -> None:
    """Background folding, inline folding under backpressure, or both racing: the same bits."""
    agent = make_agent(stage_rows=32, fold_queue_stages=1)
    ref = Reference(agent)
    _serve(agent, _plan(seed=seed), ref)
    agent.flush()
    ref.flushed()
    _assert_committed_equals(agent, ref)


def test_close_folds_everything(make_agent: Any) -> None:
    """close() folds what is staged or queued and commits it: a restart reads every row."""
    agent = make_agent(start_writer=True)
    ref = Reference(agent)
    plan = _plan(seed=21)
    plan.steps = [s for s in plan.steps if s[0] != "flush"]  # the writer flushes on its own
    _serve(agent, plan, ref)
    agent.close()
    ref.flushed()
    rows, inputs, outputs = _committed(agent.config.db_path)
    assert rows == ref.n
    in_layout, out_layout = ref.tel.input_layout, ref.tel.output_layout
    for j in range(in_layout.n_features):
        assert int(Sketch.from_bytes(in_layout, inputs).feature_counts(j).sum()) == ref.n
    assert int(Sketch.from_bytes(out_layout, outputs).feature_counts(0).sum()) == ref.n


def test_background_and_inline_folding_commit_the_same_bits(make_agent: Any) -> None:
    """The same requests through the fold thread and through synchronous folding (a queue
    bound of 0, no thread) commit identical windows, equal to the reference."""
    background = make_agent(stage_rows=128)
    inline = make_agent(stage_rows=128, fold_thread=False, fold_queue_stages=0)
    plan = _plan(seed=31)
    ref = Reference(background)
    _serve(background, plan, ref)
    _serve(inline, plan)
    for agent in (background, inline):
        agent.flush()
    ref.flushed()
    assert _committed(background.config.db_path) == _committed(inline.config.db_path)
    _assert_committed_equals(background, ref)
    assert background.recorder._thread is not None and inline.recorder._thread is None
    assert inline.recorder.inline_folds > 0


def test_the_single_request_that_fills_a_stage_folds_it_without_the_fold_thread(
        make_agent: Any) -> None:
    """Single rows never wake the fold thread: the request whose drain fills a stage folds the
    queue itself (one slow request per stage, not a burst of requests slowed by a fold running
    beside them); batches still go to the thread. The sketches are the synchronous ones."""
    from edge_agent.telemetry import SINGLES_DRAIN

    agent = make_agent(stage_rows=2 * SINGLES_DRAIN)
    rec = agent.recorder
    ref = Reference(agent)
    X = _rows(4 * SINGLES_DRAIN)
    for k, row in enumerate(X):
        ref.served(row, agent.predict(row))
        if (k + 1) % (2 * SINGLES_DRAIN) == 0:  # this request's drain filled a stage
            assert rec._rows_folded == rec._rows_queued == k + 1
    assert rec._thread is None and rec.inline_folds == 0
    batch = _rows(3 * SINGLES_DRAIN, seed=1)
    ref.served(batch, agent.predict(batch))
    assert rec._thread is not None  # a full stage of a batch: the thread folds it
    agent.flush()
    ref.flushed()
    _assert_committed_equals(agent, ref)


def test_caller_reusing_its_arrays_does_not_change_the_sketches(make_agent: Any) -> None:
    """Rows are copied when served: overwriting the request's array afterwards (callers reuse
    buffers) changes nothing that is folded later."""
    agent = make_agent()
    ref = Reference(agent)
    batch = _rows(500, seed=41)
    row = np.empty(6, dtype=np.float32)
    for k in range(3):
        ref.served(batch.copy(), agent.predict(batch))
        batch += 1000.0  # the caller's next batch, in the same buffer
        for x in _rows(100, seed=42 + k):
            row[:] = x
            ref.served(row.copy(), agent.predict(row))
        row[:] = 1e9
    agent.flush()
    ref.flushed()
    _assert_committed_equals(agent, ref)


def test_double_scores_are_sketched_unrounded(make_agent: Any) -> None:
    """A model answering in doubles: a score a hair below a bin edge stays below it (outputs
    are staged in float64; float32 would round it onto the edge)."""
    agent = make_agent()
    loaded = agent.serving()
    t = loaded.telemetry
    j = next(i for i, f in enumerate(t.output_layout.features) if f.kind == "numeric")
    edge = t.output_layout.features[j].edges[1]
    below = np.nextafter(edge, -np.inf)
    assert np.float32(below) == edge  # float32 cannot tell them apart
    scores = np.array([below, edge, below], dtype=np.float64)
    codes = np.zeros(3, dtype=np.int64)
    agent.recorder.record(t, _rows(3), codes, scores, 10.0)
    agent.flush()
    (w,) = agent.store.windows(closed=False)
    got = Sketch.from_bytes(t.output_layout, w.outputs)
    ref = Sketch.empty(t.output_layout)
    ref.update_numeric(j, scores)
    np.testing.assert_array_equal(got.feature_counts(j), ref.feature_counts(j))


# --- outputs and labels -------------------------------------------------------------------------


def test_row_maximum_scores_equal_numpy_max() -> None:
    """The per-column maximum used for scores equals probabilities.max(axis=1), NaN included."""
    rng = np.random.default_rng(0)
    for k in (1, 2, 3, 7, 40):
        p = rng.random((50, k)).astype(np.float32)
        p[3, 0] = np.nan
        p[5, k - 1] = np.nan
        got = _scores(Prediction(np.empty(50, dtype=object), p, None))
        np.testing.assert_array_equal(got, p.max(axis=1))
        assert got.dtype == np.float32


def test_label_decoding_paths_agree(small_bundle: Any, keypair: Any) -> None:
    """A single row, a short batch (dict loop) and a long one (lookup table) decode alike."""
    from edge_agent.bundle import load_public_key, read_bundle
    from edge_agent.model import BundleModel

    model = BundleModel.from_bundle(read_bundle(small_bundle.path,
                                                [load_public_key(keypair.public_path)]))
    classes = [int(v) for v in model.spec.labels]
    unknown = len(classes)
    raw = np.array(classes * 20 + [max(classes) + 5, min(classes) - 3, 2**40], dtype=np.int64)
    expected_codes = [classes.index(v) if v in classes else unknown for v in raw.tolist()]
    long_labels, long_codes = model._decode_labels(raw)
    assert long_codes.tolist() == expected_codes
    for i, v in enumerate(raw.tolist()):
        one_labels, one_codes = model._decode_labels(raw[i:i + 1])
        assert one_codes.tolist() == [expected_codes[i]]
        if v in classes:
            assert one_labels.tolist() == [str(v)] == [long_labels[i]]
    short_labels, short_codes = model._decode_labels(raw[:10])
    assert short_codes.tolist() == expected_codes[:10]
    assert short_labels.tolist() == long_labels[:10].tolist()
    again, _ = model._decode_labels(raw[:1])
    again[0] = "changed"  # callers own what they get back
    assert model._decode_labels(raw[:1])[0].tolist() == [str(raw[0])]
    # a long batch keeps only codes; its labels, read later, are the decoded ones
    codes = model._decode_codes(raw)
    assert codes is not None and codes.tolist() == expected_codes
    lazy = Prediction(None, None, None, codes, label_text=model._label_text)
    assert len(lazy) == len(raw)
    assert lazy.labels.tolist() == long_labels.tolist()


def test_a_batch_is_logged_and_answered_with_its_labels(make_agent: Any) -> None:
    """A batch's labels are decoded off the request path, yet the caller, the prediction log
    (feedback finds each row's label) and single rows all see the same labels."""
    agent = make_agent()
    X = _rows(60)
    batch = agent.predict(X)
    assert batch.prediction.codes is not None
    assert batch.prediction._labels is None  # not built on the request path
    singles = [agent.predict(x).labels[0] for x in X]
    assert batch.labels.tolist() == singles
    agent.flush()
    for i in (0, 17, 59):
        found = agent.store.prediction(batch.ids[i])
        assert found is not None and found["label"] == singles[i]


# --- the kernels, bit for bit ---------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _compiled() -> None:
    warmup()


def python_reference(sketch: Sketch, values: np.ndarray) -> None:
    """The documented arithmetic, one column at a time in row order, in plain Python floats."""
    layout = sketch.layout
    for j, f in enumerate(layout.features):
        off = layout.offsets[j]
        col = [float(v) for v in values[:, j]]
        if f.kind != "numeric":
            for c in col:
                if math.isnan(c) or c < 0:
                    sketch.missing[j] += 1
                else:
                    sketch.counts[off + int(c)] += 1
            continue
        edges = f.edges
        m = len(edges)
        kept = []
        for x in col:
            if math.isnan(x):
                sketch.missing[j] += 1
                continue
            if x > edges[-1]:
                slot = m
            elif x == edges[-1]:
                slot = m - 1
            else:
                slot = sum(1 for e in edges[:-1] if e <= x)
            sketch.counts[off + slot] += 1
            if abs(x) <= MOMENT_LIMIT:
                kept.append(x)
        if not kept:
            continue
        shift = kept[0]
        acc = 0.0
        lo, hi = math.inf, -math.inf
        for x in kept:
            acc += x - shift
            # min and max in IEEE 754's total order: -0.0 is below +0.0
            if (x, math.copysign(1.0, x)) < (lo, math.copysign(1.0, lo)):
                lo = x
            if (x, math.copysign(1.0, x)) > (hi, math.copysign(1.0, hi)):
                hi = x
        mean_b = shift + acc / len(kept)
        m2_b = 0.0
        for x in kept:
            d = x - mean_b
            m2_b += d * d
        na, nb = float(sketch.moments[j, 0]), float(len(kept))
        if na == 0.0:
            sketch.moments[j] = (nb, mean_b, m2_b, lo, hi)
            continue
        mean_a, m2_a = float(sketch.moments[j, 1]), float(sketch.moments[j, 2])
        total = na + nb
        delta = mean_b - mean_a
        sketch.moments[j] = (total, mean_a + delta * (nb / total),
                             m2_a + m2_b + delta * delta * (na * nb / total),
                             min(float(sketch.moments[j, 3]), lo),
                             max(float(sketch.moments[j, 4]), hi))


def _same_bits(a: Sketch, b: Sketch) -> None:
    assert a.counts.tobytes() == b.counts.tobytes()
    assert a.missing.tobytes() == b.missing.tobytes()
    assert a.moments.tobytes() == b.moments.tobytes(), (a.moments, b.moments)


@SETTINGS
@given(case=cases(max_batches=4, max_rows=80))
def test_kernel_is_the_plain_python_arithmetic_bit_for_bit(case: Any) -> None:
    """update_sketch gives exactly the bits of the documented per-column loop."""
    kl = KernelLayout.from_layout(case.layout)
    kernel, ref = Sketch.empty(case.layout), Sketch.empty(case.layout)
    for batch in case.batches:
        update_sketch(kernel, kl, batch)
        python_reference(ref, batch)
        _same_bits(kernel, ref)


@SETTINGS
@given(case=cases(max_batches=5, max_rows=60))
def test_segments_are_the_same_bits_as_one_call_per_batch(case: Any) -> None:
    """update_sketch_segments over concatenated batches equals update_sketch batch by batch,
    and so does fold_stage (the recorder's unchecked entry)."""
    kl = KernelLayout.from_layout(case.layout)
    one_by_one, segmented = Sketch.empty(case.layout), Sketch.empty(case.layout)
    staged = Sketch.empty(case.layout)
    for batch in case.batches:
        update_sketch(one_by_one, kl, batch)
    ends = np.cumsum([len(b) for b in case.batches])
    update_sketch_segments(segmented, kl, np.concatenate(case.batches), ends)
    _same_bits(segmented, one_by_one)
    fold_stage(staged, kl, np.ascontiguousarray(np.concatenate(case.batches)),
               np.asarray(ends, dtype=np.int64))
    _same_bits(staged, one_by_one)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_moment_range_and_signed_zeros_by_hand(dtype: type) -> None:
    """The batch min and max: over values within MOMENT_LIMIT only, -0.0 below +0.0 in
    whichever order the zeros come; the shift is the first value within the limit."""
    beyond = np.nextafter(MOMENT_LIMIT, np.inf)
    layout = SketchLayout((FeatureLayout("x", "numeric", edges=(-1.0, 1.0)),))
    kl = KernelLayout.from_layout(layout)
    if dtype is np.float32:
        big = float(np.float32(-3.0e38))
        cases = [([np.inf, np.nan, 0.0, -0.0, 2.5, big], (4.0, big, 2.5)),
                 ([-0.0, 0.0, -np.inf], (2.0, -0.0, 0.0))]
    else:
        cases = [([beyond, np.nan, MOMENT_LIMIT, -MOMENT_LIMIT, -beyond, 0.0, -0.0],
                  (4.0, -MOMENT_LIMIT, MOMENT_LIMIT)),
                 ([0.0, -0.0], (2.0, -0.0, 0.0)), ([-0.0, 0.0], (2.0, -0.0, 0.0)),
                 ([0.0, 0.0], (2.0, 0.0, 0.0)), ([-0.0, -0.0], (2.0, -0.0, -0.0)),
                 ([np.inf, -np.inf, np.nan], (0.0, np.inf, -np.inf))]
    for col, (count, lo, hi) in cases:
        values: np.ndarray = np.array(col, dtype=dtype)[:, None]
        sketch, ref = Sketch.empty(layout), Sketch.empty(layout)
        update_sketch(sketch, kl, values)
        python_reference(ref, values.astype(np.float64))
        _same_bits(sketch, ref)
        got = sketch.moments[0]
        assert got[0] == count, col
        assert np.array([got[3], got[4]]).tobytes() == np.array([lo, hi]).tobytes(), col


@pytest.mark.parametrize("n_edges", [2, 17, 512, 513, 700])
def test_long_edge_lists_bin_like_short_ones(n_edges: int) -> None:
    """Past the linear-count limit the branch-free bisection is used: same slots, same bits."""
    rng = np.random.default_rng(n_edges)
    edges = np.unique(rng.normal(size=3 * n_edges))[:n_edges]
    layout = SketchLayout((FeatureLayout("x", "numeric", edges=tuple(float(e) for e in edges)),
                           FeatureLayout("c", "categorical", categories=("a", "b"))))
    x = np.concatenate([rng.normal(size=400) * 2, rng.choice(edges, 50),
                        [np.nan, np.inf, -np.inf, 1e200, edges[0], edges[-1], -0.0]])
    codes = rng.integers(-1, 3, len(x)).astype(np.float64)
    values = np.column_stack([x, codes])
    kernel, ref = Sketch.empty(layout), Sketch.empty(layout)
    update_sketch(kernel, KernelLayout.from_layout(layout), values)
    python_reference(ref, values)
    _same_bits(kernel, ref)


def test_a_bad_code_in_a_segment_names_it_and_keeps_the_batches_before() -> None:
    """Batches before the bad one are folded; the bad one counts nothing and is named."""
    layout = SketchLayout((FeatureLayout("c", "categorical", categories=("a", "b")),))
    kl = KernelLayout.from_layout(layout)
    values = np.array([[0.0], [1.0], [0.0], [7.0], [1.0]])
    sketch = Sketch.empty(layout)
    with pytest.raises(SketchError, match=r"batch 1 \(rows 2..3\): feature 'c': row 1"):
        update_sketch_segments(sketch, kl, values, [2, 4, 5])
    assert sketch.feature_counts(0).tolist() == [1, 1, 0]
    with pytest.raises(SketchError, match=r"batch 1 \(rows 2..3\): feature 'c': row 1"):
        fold_stage(sketch, kl, values, np.array([2, 4, 5], dtype=np.int64))
    assert sketch.feature_counts(0).tolist() == [2, 2, 0]
    with pytest.raises(SketchError, match="not increasing"):
        update_sketch_segments(sketch, kl, values, [3, 2, 5])


# --- the single-row IO binding --------------------------------------------------------------


def _model(bundle: Any, keypair: Any) -> Any:
    from edge_agent.bundle import load_public_key, read_bundle
    from edge_agent.model import BundleModel

    return BundleModel.from_bundle(read_bundle(bundle.path, [load_public_key(keypair.public_path)]))


@pytest.mark.parametrize("which", ["small_bundle", "regressor_bundle"])
def test_single_rows_through_the_io_binding_give_run_outputs(which: str, keypair: Any,
                                                            request: Any) -> None:
    """A single row goes through the thread's IO binding and gets exactly run()'s outputs,
    in new arrays (the bound buffers are reused by the next row)."""
    model = _model(request.getfixturevalue(which), keypair)
    assert model._row_outputs is not None
    width = model.session.get_inputs()[0].shape[1]
    rng = np.random.default_rng(5)
    rows = rng.normal(0, 2, (60, width)).astype(np.float32)
    rows[3, 0] = np.nan
    seen = []
    for x in rows:
        one = x.reshape(1, -1)
        expected = model._run(model._outputs, {model._input0: one}, None)
        got = model._run_row(one)
        for e, g in zip(expected, got, strict=True):
            np.testing.assert_array_equal(g, np.asarray(e).reshape(g.shape))
        seen.append(got)
    assert not any(np.shares_memory(a[-1], b[-1]) for a, b in itertools.pairwise(seen))


def test_io_bindings_are_per_thread(small_bundle: Any, keypair: Any) -> None:
    """Threads serving single rows at once each get their own row's outputs."""
    import threading

    model = _model(small_bundle, keypair)
    rows = _rows(400, seed=3)
    expected = [model._run(model._outputs, {model._input0: x.reshape(1, -1)}, None)[1]
                for x in rows]
    wrong: list[int] = []

    def serve(part: int) -> None:
        for _ in range(5):
            for i in range(part, len(rows), 4):
                got = model.run_features(rows[i:i + 1]).probabilities
                if not np.array_equal(got, expected[i]):
                    wrong.append(i)

    threads = [threading.Thread(target=serve, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong


def test_named_columns_bundles_do_not_bind(columns_bundle: Any, keypair: Any) -> None:
    """Named-column inputs (text among them) run through run() as before."""
    model = _model(columns_bundle, keypair)
    assert model._row_outputs is None
    pred = model.predict({"temp": [21.0], "pressure": [1.1], "color": ["red"]})
    assert pred.labels.tolist()[0] in ("alarm", "ok")


@pytest.mark.parametrize("n_labels", [3, 300, 70_000])
def test_prediction_log_by_codes_reads_back_each_label(tmp_path: Path, n_labels: int) -> None:
    """A batch logged by its codes (1, 2 or 4 bytes a row, by the size of its label set) and a
    run logged by its labels both read back per prediction id; a database made before codes
    were logged (no codes columns) keeps its rows through the migration."""
    import sqlite3

    from edge_agent.prediction_log import PendingLog, Run, prediction_rows
    from edge_agent.store import AgentStore, WriteBatch

    db = tmp_path / "agent.db"
    AgentStore(db).close()
    with sqlite3.connect(db) as conn:  # as m001-m005 left it, with a row of JSON labels
        conn.execute("ALTER TABLE predictions DROP COLUMN codes")
        conn.execute("ALTER TABLE predictions DROP COLUMN label_set")
        conn.execute("DELETE FROM _sqlite_migrations WHERE name = 'm006_prediction_codes'")
        conn.execute("INSERT INTO predictions (boot, first, n, ts, model_name, model_version, "
                     "labels, scores) VALUES ('old', 0, 2, ?, 'm', '0.9', '[\"x\", \"y\"]', ?)",
                     [T0, np.array([0.75, 0.5], dtype="<f4").tobytes()])
    text = np.array([f"class-{k}" for k in range(n_labels)] + ["?"], dtype=object)
    codes = np.array([0, n_labels - 1, n_labels, 1 % n_labels], dtype=np.int64)

    class _Loaded:
        name, version = "m", "1.0.0"

    loaded: Any = _Loaded()
    log = PendingLog()
    log.add_batch(0, T0, loaded, np.arange(4, dtype=np.float64), codes, text, None)
    run = log.run = Run(100, T0, loaded)
    log.entries.append(run)
    run.labels += ["a", "b"]
    run.scores += [0.5, 0.25]
    rows = prediction_rows("boot", log.take().entries)
    assert rows[0][6] is None and rows[0][8] is not None
    assert len(rows[0][8]) == 4 * (1 if n_labels < 256 else 2 if n_labels < 65536 else 4)
    store = AgentStore(db)
    try:
        store.write(WriteBatch(predictions=rows))
        for i in range(4):
            found = store.prediction(f"boot-{i:x}")
            assert found is not None
            assert (found["label"], found["score"]) == (text[codes[i]], float(i))
        assert store.prediction("boot-64") == {"model_name": "m", "model_version": "1.0.0",
                                               "label": "a", "score": 0.5}
        assert store.prediction("boot-65")["label"] == "b"  # type: ignore[index]
        assert store.prediction("old-1") == {"model_name": "m", "model_version": "0.9",
                                             "label": "y", "score": 0.5}
    finally:
        store.close()
