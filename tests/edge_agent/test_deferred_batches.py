"""Batches whose label codes are decoded by the fold, not by the request (see
edge_agent.telemetry's record_deferred): what the caller, the sketches, the window's counts and
the prediction log see is what decoding on the request gave."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.agent import Agent
from edge_agent.config import AgentConfig, TelemetryConfig
from edge_agent.model import CodeTable, Prediction, UndecodedPrediction
from tests.conftest import make_classification_data
from tests.edge_agent.test_perf_paths import Clock


def _rows(n: int, seed: int = 0) -> np.ndarray:
    X, _ = make_classification_data(n=max(n, 10), d=6, seed=seed)
    return np.ascontiguousarray(X[:n], dtype=np.float32)


@pytest.fixture(params=[True, False], ids=["fold-thread", "no-fold-thread"])
def agent(request: Any, tmp_path: Path, keypair: Any, small_bundle: Any) -> Iterator[Agent]:
    """With the fold thread, and without (deferred batches are decoded only when a flush, the
    queue's bound or feedback folds them)."""
    cfg = AgentConfig(data_dir=tmp_path / "agent", trusted_keys=(keypair.public_path,),
                      bundle=small_bundle.path,
                      telemetry=TelemetryConfig(window_seconds=60, flush_interval_seconds=0.05))
    with Agent(cfg, clock=Clock(), start_writer=False, fold_thread=request.param) as made:
        yield made


def _stored_labels(agent: Agent, ids: list[str]) -> list[str]:
    out = []
    for pid in ids:
        found = agent.store.prediction(pid)
        assert found is not None, pid
        out.append(found["label"])
    return out


def test_a_long_batch_is_not_decoded_on_the_request(agent: Agent) -> None:
    X = _rows(200)
    result = agent.predict(X)
    pred = result.prediction
    assert isinstance(pred, UndecodedPrediction)
    assert pred.raw_labels is not None and pred._codes is None  # nothing decoded yet
    assert result.n == 200 and pred._codes is None  # its length needs no decoding
    singles = [agent.predict(x).labels[0] for x in X]
    assert result.labels.tolist() == singles  # decoded when the caller reads them
    agent.flush()
    assert _stored_labels(agent, result.ids) == singles
    found = agent.store.prediction(result.ids[7])
    assert found is not None and result.probabilities is not None
    assert found["score"] == pytest.approx(float(result.probabilities[7].max()), rel=1e-6)


def test_feedback_right_after_a_deferred_batch_finds_it(agent: Agent) -> None:
    """The log entry is filled by the fold: feedback, which writes the pending log first,
    folds what it needs before reading it."""
    result = agent.predict(_rows(64, seed=3))
    label = result.labels[5]
    answer = agent.feedback(result.ids[5], label)
    assert answer["correct"] == 1


def test_nonfinite_scores_of_a_deferred_batch_are_counted(agent: Agent) -> None:
    X = _rows(50, seed=5)
    X[:12, 0] = np.nan  # no imputer in the pipeline: NaN in, NaN out
    result = agent.predict(X)
    assert result.prediction.raw_labels is not None and result.probabilities is not None
    nonfinite = int((~np.isfinite(result.probabilities.max(axis=1))).sum())
    assert nonfinite == 12
    agent.flush()
    (window,) = agent.store.windows()
    assert window.metrics["nonfinite_outputs"] == nonfinite
    assert window.rows == 50


def test_log_entries_read_while_batches_are_served_are_complete(agent: Agent) -> None:
    """Flushes and feedback racing a serving thread: every stored prediction has the label
    the caller got, never a byte of an entry the fold had not filled yet."""
    results: list[Any] = []
    done = threading.Event()
    X = _rows(400, seed=9)

    def serve() -> None:
        try:
            for i in range(150):
                results.append(agent.predict(np.roll(X, -i, axis=0)[:64 + i % 40]))
        finally:
            done.set()

    server = threading.Thread(target=serve)
    server.start()
    flushes = 0
    while not done.is_set() or flushes < 3:
        agent.flush()
        flushes += 1
        if results:
            last = results[-1]
            try:
                agent.feedback(last.ids[0], last.labels[0])
            except Exception as err:  # the same id twice is refused; nothing else may be
                assert "already recorded" in str(err)
    server.join()
    agent.flush()
    assert len(results) == 150
    for r in results[::7]:
        assert _stored_labels(agent, r.ids[::5]) == r.labels[::5].tolist()


def test_the_lazy_codes_are_the_table_s() -> None:
    table = CodeTable(-1, np.array([2, 0, 1, 2], dtype=np.int64))  # classes 0, 1; unknown 2
    raw = np.array([0, 1, 1, 7, -4, 0] * 5, dtype=np.int64)
    text = np.array(["0", "1", "?"], dtype=object)
    pred = UndecodedPrediction(np.zeros((30, 2), np.float32), text, raw, table)
    assert isinstance(pred, Prediction) and pred.raw_labels is raw and pred.decoder is table
    assert len(pred) == 30 and pred._codes is None
    assert pred.codes.tolist() == [0, 1, 1, 2, 2, 0] * 5
    assert pred.labels.tolist() == ["0", "1", "1", "?", "?", "0"] * 5
    plain = Prediction(None, None, None, np.array([1]), label_text=text)
    assert plain.raw_labels is None and plain.decoder is None  # nothing to decode later


def test_batches_are_decoded_on_the_request_while_the_fold_is_behind(
        tmp_path: Path, keypair: Any, small_bundle: Any) -> None:
    """Deferring costs the fold thread what it saves the request: once more than a stage
    waits for the fold, batches decode their own codes (and are logged and sketched alike)."""
    cfg = AgentConfig(data_dir=tmp_path / "agent", trusted_keys=(keypair.public_path,),
                      bundle=small_bundle.path,
                      telemetry=TelemetryConfig(window_seconds=60, flush_interval_seconds=0.05))
    X = _rows(64, seed=4)
    with Agent(cfg, clock=Clock(), start_writer=False, fold_thread=False, stage_rows=64,
               fold_queue_stages=1000) as agent:
        results = [agent.predict(X) for _ in range(4)]
        # queued, not folded: 0, 1, 2, 3 stages of 64 rows when each batch came
        undecoded = [cast(UndecodedPrediction, r.prediction) for r in results]
        assert [p._codes is None for p in undecoded] == [True, True, False, False]
        singles = [agent.predict(x).labels[0] for x in X]
        agent.flush()
        for r in results:
            assert r.labels.tolist() == singles
            assert _stored_labels(agent, r.ids) == singles
        (window,) = agent.store.windows()
        assert window.rows == 4 * 64 + 64


def test_a_batch_that_cannot_be_staged_reserves_no_log_entry(agent: Agent) -> None:
    """The log entry is reserved after the rows are staged: a failed staging leaves no entry
    for the writer to read unfilled, and the agent goes on."""
    X = _rows(40, seed=6)
    undecoded = agent.predict(X).prediction
    assert undecoded.raw_labels is not None
    reserved: list[Any] = []

    def reserve(*args: Any) -> Any:
        reserved.append(args)
        raise AssertionError("reserve must not be reached")

    with pytest.raises(ValueError):  # 30 rows of features for 40 labels
        agent.recorder.record_deferred(agent.serving().telemetry, agent.clock(), X[:30],
                                       undecoded, 1.0, reserve, None)
    assert reserved == []
    result = agent.predict(X)
    agent.flush()
    assert _stored_labels(agent, result.ids) == result.labels.tolist()


@st.composite
def deferred_stages(draw: st.DrawFn) -> dict[str, Any]:
    """A stage's deferred batches: raw label outputs around (and far outside) a code table,
    float32 probabilities with NaN and infinities, a few row ranges, a log code width."""
    n_classes = draw(st.integers(1, 5))
    lo = draw(st.integers(-3, 3))
    table = np.array([n_classes, *draw(st.permutations(range(n_classes))), n_classes],
                     dtype=np.int64)
    n = draw(st.integers(1, 40))
    raw = np.array(draw(st.lists(st.one_of(st.integers(lo - 3, lo + n_classes + 3),
                                           st.integers(-2**62, 2**62)),
                                 min_size=n, max_size=n)), dtype=np.int64)
    cols = draw(st.integers(1, 4))
    p = st.one_of(st.floats(0, 1, width=32), st.sampled_from([np.nan, np.inf, -np.inf, -0.0]))
    probs = np.array(draw(st.lists(p, min_size=n * cols, max_size=n * cols)),
                     dtype=np.float32).reshape(n, cols)
    cuts = sorted(draw(st.sets(st.integers(0, n), max_size=6)) | {0, n})
    ranges = [(a, b) for a, b in itertools.pairwise(cuts) if draw(st.booleans())]
    return {"table": table, "shift": lo - 1, "raw": raw, "probs": probs,
            "ranges": np.array(ranges, dtype=np.int64).reshape(-1, 2),
            "code_bytes": draw(st.sampled_from([1, 2, 4]))}


def decode_with(kernel: Any, case: dict[str, Any]) -> tuple[np.ndarray, ...]:
    """Run a decode kernel on ``case`` into arrays prefilled with a marker: (result, outputs,
    log scores, log codes as integers)."""
    n, cb = len(case["raw"]), case["code_bytes"]
    outputs = np.full((n, 2), -7.0)
    log_scores = np.full(n, -7.0, dtype=np.float32)
    log_codes = np.full(n * cb, 0xAB, dtype=np.uint8)
    bad = kernel(case["raw"], case["probs"], case["table"], case["shift"], case["ranges"],
                 outputs, log_scores, log_codes, cb)
    return (np.array(bad), outputs, log_scores,
            log_codes.view(np.dtype(f"<u{cb}")).astype(np.int64))


@settings(deadline=None, max_examples=200)
@given(case=deferred_stages())
def test_the_decode_kernel_is_the_table_and_numpy_s_row_maximum(case: dict[str, Any]) -> None:
    """Against the request's own decode (CodeTable, row_scores): codes, scores (NaN wins, as
    numpy's maximum), the count of non-finite scores, the log's narrow codes; rows outside the
    ranges untouched."""
    from edge_agent.model import row_scores
    from edge_agent.sketch_kernels import _decode_kernel

    bad, outputs, log_scores, log_codes = decode_with(_decode_kernel, case)
    table = CodeTable(case["shift"], case["table"])
    inside = np.zeros(len(case["raw"]), dtype=bool)
    expected_bad = 0
    for a, b in case["ranges"]:
        inside[a:b] = True
        codes = table(case["raw"][a:b])
        scores = row_scores(case["probs"][a:b])
        assert outputs[a:b, 0].tolist() == codes.tolist()
        # the bytes: -0.0 and +0.0 compare equal, and numpy's maximum picks between them
        assert outputs[a:b, 1].tobytes() == scores.astype(np.float64).tobytes()
        assert log_scores[a:b].tobytes() == scores.tobytes()
        assert log_codes[a:b].tolist() == codes.tolist()
        expected_bad += int((~np.isfinite(scores)).sum())
    assert int(bad) == expected_bad
    assert (outputs[~inside] == -7.0).all() and (log_scores[~inside] == -7.0).all()
    marker = int.from_bytes(b"\xab" * case["code_bytes"], "little")
    assert (log_codes[~inside] == marker).all()


def test_a_failed_decode_logs_unknown_labels_never_stale_bytes(
        tmp_path: Path, keypair: Any, small_bundle: Any, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """If the decode kernel fails (a bug), the stage's log entries are filled with the
    "unknown" label and NaN scores before the error goes on: the writer never stores the
    uninitialised bytes of the stage's log arrays, and the agent keeps serving."""
    import edge_agent.stage as stage

    def broken(*args: Any) -> int:
        raise RuntimeError("decode kernel failed")

    cfg = AgentConfig(data_dir=tmp_path / "agent", trusted_keys=(keypair.public_path,),
                      bundle=small_bundle.path,
                      telemetry=TelemetryConfig(window_seconds=60, flush_interval_seconds=0.05))
    with Agent(cfg, clock=Clock(), start_writer=False, fold_thread=False) as agent:
        monkeypatch.setattr(stage, "decode_deferred", broken)
        result = agent.predict(_rows(80, seed=8))
        assert isinstance(result.prediction, UndecodedPrediction)
        agent.flush()
        assert "decode kernel failed" in caplog.text
        for pid in result.ids[::9]:
            found = agent.store.prediction(pid)
            assert found is not None and found["label"] == "?" and np.isnan(found["score"])
        monkeypatch.undo()
        again = agent.predict(_rows(80, seed=8))
        agent.flush()
        assert _stored_labels(agent, again.ids[::9]) == again.labels[::9].tolist()


def test_a_deferred_batch_the_kernel_could_not_bound_is_refused_before_staging() -> None:
    """The decode kernel has no bounds checks: a stage checks every shape it relies on
    (a second output column for the score, one probability column at least, one label per
    probability row) and stages nothing when one is off."""
    from edge_agent.stage import Stage

    table = CodeTable(-1, np.array([2, 0, 1, 2], dtype=np.int64))
    window: Any = object()
    rows = np.zeros((10, 3), np.float32)
    raw = np.zeros(10, np.int64)
    bad = [(np.empty((64, 1)), np.zeros((10, 2), np.float32)),  # no score column
           (np.empty((64, 2)), np.zeros((10, 0), np.float32)),  # no probabilities
           (np.empty((64, 2)), np.zeros((9, 2), np.float32))]  # a row short
    for outputs, probs in bad:
        stage = Stage(window, np.empty((64, 3), np.float32), outputs)
        with pytest.raises(ValueError, match="does not fit a stage"):
            stage.add_deferred(rows, raw, probs, table, 3)
        assert stage.n == 0 and stage.deferred == [] and stage.log_scores is None
    stage = Stage(window, np.empty((64, 3), np.float32), np.empty((64, 2)))
    scores, codes = stage.add_deferred(rows, raw, np.zeros((10, 2), np.float32), table, 3)
    assert (len(scores), len(codes), stage.n) == (10, 10, 10)
    assert not stage.takes(table, 3, 3) and stage.takes(table, 3, 2)
