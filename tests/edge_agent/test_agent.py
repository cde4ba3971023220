"""The agent in-process: serving, validation, telemetry windows in SQLite, feedback, privacy."""

from __future__ import annotations

import shutil
import sqlite3
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.agent import Agent
from edge_agent.bundle import load_public_key, read_bundle
from edge_agent.config import AgentConfig, PrivacyConfig, TelemetryConfig
from edge_agent.drift_report import drift_report
from edge_agent.errors import FeedbackError, InputError, NotReadyError
from edge_agent.model import BundleModel
from edge_agent.telemetry import layouts_of
from fleet_protocol.sketch import Sketch
from tests.conftest import make_classification_data


class Clock:
    """A settable clock so tests move windows forward without waiting."""

    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _config(tmp_path: Path, keypair: Any, bundle: Path | None, **kw: Any) -> AgentConfig:
    return AgentConfig(data_dir=tmp_path / "data", trusted_keys=(keypair.public_path,),
                       bundle=bundle, device_id="dev-1",
                       telemetry=TelemetryConfig(window_seconds=60, flush_interval_seconds=0.05),
                       **kw)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def agent(tmp_path: Path, keypair: Any, small_bundle: Any, clock: Clock) -> Any:
    a = Agent(_config(tmp_path, keypair, small_bundle.path), clock=clock, start_writer=False)
    yield a
    a.close()


def _rows(n: int = 50) -> np.ndarray:
    X, _ = make_classification_data(n=600, d=6, seed=11)
    return X[400:400 + n]


def test_predict_matches_the_bundle(agent: Agent, small_bundle: Any, keypair: Any) -> None:
    """Single rows, named rows and batches give the bundle's own outputs, with unique ids."""
    X = _rows(20)
    ref = BundleModel.from_bundle(read_bundle(small_bundle.path,
                                              [load_public_key(keypair.public_path)])).predict(X)
    batch = agent.predict(X)
    assert batch.probabilities is not None and ref.probabilities is not None
    np.testing.assert_allclose(batch.probabilities, ref.probabilities, atol=1e-6)
    assert list(batch.labels) == list(ref.labels)
    one = agent.predict(X[0])
    named = agent.predict({f"f{i}": float(X[0, i]) for i in range(6)})
    rows = agent.predict([{f"f{i}": float(x[i]) for i in range(6)} for x in X[:3]])
    assert one.labels[0] == named.labels[0] == ref.labels[0]
    assert list(rows.labels) == list(ref.labels[:3])
    ids = batch.ids + one.ids + named.ids + rows.ids
    assert len(set(ids)) == len(ids) == 25


@pytest.mark.parametrize(("bad", "expected"), [
    ({"f0": 1.0}, "feature 'f1' is absent"),
    ({**{f"f{i}": 0.0 for i in range(6)}, "colour": 1}, "unknown feature 'colour'"),
    ({**{f"f{i}": 0.0 for i in range(5)}, "f5": "hot"}, "feature 'f5' = 'hot': expected a number"),
    ({**{f"f{i}": 0.0 for i in range(5)}, "f5": True}, "feature 'f5' = True: expected a number"),
    ({**{f"f{i}": 0.0 for i in range(5)}, "f5": 10**400}, "feature 'f5' = 1000.*: expected a "
     "number within float range"),
    ({**{f"f{i}": 0.0 for i in range(5)}, "f5": [1.0]},
     r"feature 'f5' = \[1.0\]: expected a number"),
    (np.zeros((2, 5)), r"shape \[2, 5\]; expected \[rows, 6\]"),
    ("text", "input is not numeric"),
])
def test_bad_input_names_the_feature(agent: Agent, bad: Any, expected: str) -> None:
    """A request that does not fit the schema is refused naming the feature and expectation."""
    with pytest.raises(InputError, match=expected):
        agent.predict(bad)
    agent.flush()
    (w,) = agent.store.windows(closed=False)
    assert w.metrics["rejected"] == 1 and w.metrics["requests"] == 0


def test_a_named_row_is_the_same_row_as_an_array(agent: Agent) -> None:
    """One row of named scalars (ints, floats, numpy scalars, None) reaches the model exactly
    as the same values in an array, in the bundle's feature order whatever the key order."""
    x = _rows(1)[0]
    values: list[Any] = [float(x[0]), 3, np.float32(x[2]), np.float64(x[3]), None,
                         float(x[5])]
    named = {f"f{i}": values[i] for i in reversed(range(6))}
    model_in = agent.serving().validator.validate(named)
    expected = np.array([[values[0], 3.0, x[2], x[3], np.nan, values[5]]], dtype=np.float32)
    assert isinstance(model_in, np.ndarray)
    assert model_in.dtype == np.float32 and model_in.shape == (1, 6)
    np.testing.assert_array_equal(model_in, expected)
    assert agent.predict(named).labels[0] == agent.predict(expected[0]).labels[0]


def test_missing_and_out_of_range_are_served_and_counted(agent: Agent, clock: Clock) -> None:
    """NaN and far-out values are served; the window's input sketch counts them per feature
    (its missing counts, its overflow slot), as the drift report reads them."""
    row = _rows(1)[0].copy()
    row[0] = np.nan
    row[1] = 1e6
    res = agent.predict(row)
    assert res.labels[0] in ("0", "1")
    agent.flush()
    (w,) = agent.store.windows(closed=False)
    f0, f1, f2 = drift_report(agent.serving().bundle.manifest, [w]).features[:3]
    assert (f0.missing, f0.rows, f0.out_of_range) == (1, 0, 0)
    assert (f1.missing, f1.rows, f1.out_of_range) == (0, 1, 1)
    assert (f2.missing, f2.rows, f2.out_of_range) == (0, 1, 0)
    assert "inputs" not in w.metrics  # the sketch holds them; the metrics do not repeat them


def test_windows_are_sketched_checkpointed_and_closed(agent: Agent, clock: Clock) -> None:
    """Requests land in the open window's sketches; a new period closes it durably."""
    X = _rows(40)
    for x in X[:30]:
        agent.predict(x)
    agent.predict(X[30:])
    agent.flush()
    (open_w,) = agent.store.windows()
    assert not open_w.closed and open_w.rows == 40 and open_w.metrics["requests"] == 31
    clock.t += 60
    agent.predict(X[0])
    agent.flush()
    closed = agent.store.windows(closed=True)
    assert len(closed) == 1
    w = closed[0]
    in_layout, out_layout = layouts_of(agent.serving().bundle.manifest)
    sk = Sketch.from_bytes(in_layout, w.inputs)
    for j in range(6):
        assert int(sk.feature_counts(j).sum()) == 40
    out = Sketch.from_bytes(out_layout, w.outputs)
    assert int(out.feature_counts(0).sum()) == 40
    assert w.metrics["latency_p99_us"] > 0 and w.metrics["rss_bytes"] > 10_000_000
    assert len(agent.store.windows(closed=False)) == 1


def test_feedback_builds_confusion_and_refuses_nonsense(agent: Agent) -> None:
    """Feedback joins a prediction by id; unknown ids, duplicates and bad labels are refused."""
    res = agent.predict(_rows(4))
    agent.flush()
    predicted = res.labels[0]
    wrong = "1" if predicted == "0" else "0"
    out = agent.feedback(res.ids[0], predicted)
    assert out["correct"] == 1
    assert agent.feedback(res.ids[1], wrong if res.labels[1] == predicted else predicted)[
        "correct"] in (0, 1)
    with pytest.raises(FeedbackError, match="already recorded") as dup:
        agent.feedback(res.ids[0], predicted)
    assert dup.value.status == 409
    with pytest.raises(FeedbackError, match="unknown") as unknown:
        agent.feedback("nope-1", "0")
    assert unknown.value.status == 404
    with pytest.raises(FeedbackError, match="not one of the model's labels"):
        agent.feedback(res.ids[2], "banana")
    agent.flush()
    (w,) = agent.store.windows(closed=False)
    assert w.metrics["feedback"]["count"] == 2
    assert int(np.sum(w.metrics["feedback"]["confusion"])) == 2
    assert agent.store.count("feedback") == 2


def _db_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    wal = path.with_name(path.name + "-wal")
    return data + (wal.read_bytes() if wal.exists() else b"")


def test_raw_inputs_are_not_stored_by_default(agent: Agent) -> None:
    """With default privacy settings no input value reaches the database file.

    (Window summaries hold each feature's min and max, so the tracer value is a middle one.)
    """
    rows = np.zeros((3, 6), dtype=np.float32)
    rows[:, 0] = [-10000.0, 12345.678, 20000.0]
    agent.predict(rows)
    agent.flush()
    assert agent.store.count("samples") == 0
    blob = _db_bytes(agent.config.db_path)
    tracer = rows[1, 0]
    assert b"12345.67" not in blob
    assert struct.pack("<f", tracer) not in blob
    assert struct.pack("<d", float(tracer)) not in blob


def test_sampling_when_switched_on(tmp_path: Path, keypair: Any, small_bundle: Any) -> None:
    """Turning sampling on stores the sampled raw inputs, linked to their prediction ids."""
    cfg = _config(tmp_path, keypair, small_bundle.path,
                  privacy=PrivacyConfig(sample_inputs=True, sample_rate=1.0))
    with Agent(cfg, start_writer=False) as a:
        res = a.predict(_rows(3))
        a.flush()
        assert a.store.count("samples") == 3
        rows = list(a.store.db["samples"].rows)
        assert {r["prediction_id"] for r in rows} == set(res.ids)


def test_refused_bundle_keeps_previous_model(tmp_path: Path, keypair: Any, small_bundle: Any,
                                             other_keypair: Any, compile_fast: Any) -> None:
    """A bundle that fails verification is refused with its reason; the old model serves on."""
    with Agent(_config(tmp_path, keypair, small_bundle.path), start_writer=False) as a:
        assert a.serving().version == "1.2.0"
    bad = tmp_path / "bad.edgebundle"
    shutil.copy(small_bundle.path, bad)
    bad.write_bytes(bad.read_bytes()[:-200])
    with Agent(_config(tmp_path, keypair, bad), start_writer=False) as a:
        assert a.ready and a.serving().version == "1.2.0"
        assert "truncated" in a.refusals[0]
        (failed,) = a.store.events(["stage_failed"])
        assert "truncated" in failed["detail"]["reason"]


def test_no_bundle_is_not_ready(tmp_path: Path, keypair: Any) -> None:
    """Without any verified bundle the agent is not ready and says why."""
    with Agent(_config(tmp_path, keypair, None), start_writer=False) as a:
        assert not a.ready
        with pytest.raises(NotReadyError, match="no bundle installed"):
            a.predict(np.zeros(6))


def test_restart_resumes_the_open_window(tmp_path: Path, keypair: Any, small_bundle: Any,
                                         clock: Clock) -> None:
    """A restart within the same period continues the checkpointed window, losing nothing."""
    cfg = _config(tmp_path, keypair, small_bundle.path)
    with Agent(cfg, clock=clock, start_writer=False) as a:
        a.predict(_rows(10))
    with Agent(cfg, clock=clock, start_writer=False) as b:
        b.predict(_rows(5))
        b.flush()
        windows = b.store.windows()
    assert len(windows) == 1 and windows[0].rows == 15


def test_writer_thread_commits_without_being_asked(tmp_path: Path, keypair: Any,
                                                   small_bundle: Any) -> None:
    """The background writer checkpoints the open window within its flush interval."""
    import threading

    with Agent(_config(tmp_path, keypair, small_bundle.path)) as a:
        a.predict(_rows(7))
        seen = threading.Event()
        reader = sqlite3.connect(a.config.db_path)
        for _ in range(200):
            row = reader.execute("SELECT rows FROM windows").fetchone()
            if row and row[0] == 7:
                seen.set()
                break
            seen.wait(0.05)
        reader.close()
        assert seen.is_set()


def test_feedback_waits_for_a_flush_in_progress(agent: Agent) -> None:
    """Feedback for a prediction the writer has taken but not yet committed still finds it."""
    import threading

    res = agent.predict(_rows(1)[0])
    started, release = threading.Event(), threading.Event()
    original = agent.store.write

    def slow_write(batch: Any) -> None:
        if batch.predictions:
            started.set()
            release.wait(10)
        original(batch)

    agent.store.write = slow_write  # type: ignore[method-assign]
    writer = threading.Thread(target=agent.flush)
    writer.start()
    assert started.wait(10)
    outcome: dict[str, Any] = {}

    def give_feedback() -> None:
        try:
            outcome["ok"] = agent.feedback(res.id, str(res.labels[0]))
        except FeedbackError as err:
            outcome["error"] = err

    asker = threading.Thread(target=give_feedback)
    asker.start()
    asker.join(timeout=0.5)  # without the flush lock it has already failed by now
    release.set()
    asker.join(timeout=10)
    writer.join(timeout=10)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["ok"]["correct"] == 1
