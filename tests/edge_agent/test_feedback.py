"""Feedback in the agent's windows: a regressor's residual sketch, concept drift on the error
stream, errors counted, and all of it carried across a restart within a window."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.agent import Agent
from edge_agent.config import AgentConfig, TelemetryConfig
from fleet_protocol.residuals import ALPHA, ResidualSketch
from tests.conftest import make_classification_data, make_regression_data


class Clock:
    def __init__(self, t: float = 1_700_000_010.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _agent(data_dir: Path, keypair: Any, bundle: Path, clock: Clock) -> Agent:
    config = AgentConfig(data_dir=data_dir, trusted_keys=(keypair.public_path,), bundle=bundle,
                         device_id="dev-fb",
                         telemetry=TelemetryConfig(window_seconds=60, flush_interval_seconds=0.05))
    return Agent(config, clock=clock, start_writer=False)


def _open_window(agent: Agent) -> Any:
    agent.flush()
    (w,) = agent.store.windows(closed=False)
    return w


def _regression_feedback(agent: Agent, rows: np.ndarray, truth: np.ndarray) -> list[float]:
    res = agent.predict(rows)
    residuals = []
    for pid, t in zip(res.ids, truth, strict=True):
        out = agent.feedback(pid, float(t))
        residuals.append(out["residual"])
    np.testing.assert_allclose(residuals, truth - np.asarray(res.values, dtype=np.float64))
    return residuals


def test_regression_feedback_keeps_a_residual_sketch(tmp_path: Path, keypair: Any,
                                                     regressor_bundle: Any) -> None:
    """MAE, RMSE and bias exact; the sketch in the window's metrics is the residuals' own, and
    its absolute-error quantiles are within the sketch's relative accuracy."""
    X, y = make_regression_data(n=450, d=4, seed=7)
    agent = _agent(tmp_path / "data", keypair, regressor_bundle.path, Clock())
    try:
        residuals = _regression_feedback(agent, X[300:400], y[300:400])
        fb = _open_window(agent).metrics["feedback"]
    finally:
        agent.close()
    e = np.array(residuals)
    assert fb["count"] == 100
    assert fb["mae"] == pytest.approx(float(np.mean(np.abs(e))), rel=1e-12)
    assert fb["rmse"] == pytest.approx(float(np.sqrt(np.mean(e * e))), rel=1e-12)
    assert fb["bias"] == pytest.approx(float(np.mean(e)), rel=1e-9, abs=1e-9)
    assert ResidualSketch.from_dict(fb["residuals"]) == ResidualSketch.of(residuals)
    for q, key in ((0.5, "abs_error_p50"), (0.9, "abs_error_p90"), (0.99, "abs_error_p99")):
        truth = float(np.quantile(np.abs(e), q, method="inverted_cdf"))
        assert abs(fb[key] - truth) <= ALPHA * truth * (1 + 1e-9)


def test_residuals_and_confusion_survive_a_restart_within_the_window(
        tmp_path: Path, keypair: Any, regressor_bundle: Any, small_bundle: Any) -> None:
    """A restart restores the open window's checkpoint: feedback before it still counts."""
    X, y = make_regression_data(n=450, d=4, seed=7)
    clock = Clock()
    first = _agent(tmp_path / "reg", keypair, regressor_bundle.path, clock)
    try:
        before = _regression_feedback(first, X[300:340], y[300:340])
        first.flush()
    finally:
        first.close()
    clock.t += 5  # the same 60 s window
    second = _agent(tmp_path / "reg", keypair, regressor_bundle.path, clock)
    try:
        after = _regression_feedback(second, X[340:360], y[340:360])
        fb = _open_window(second).metrics["feedback"]
    finally:
        second.close()
    assert fb["count"] == 60
    assert ResidualSketch.from_dict(fb["residuals"]) == ResidualSketch.of(before + after)

    Xc, _ = make_classification_data(n=600, d=6, seed=11)
    first = _agent(tmp_path / "cls", keypair, small_bundle.path, clock)
    try:
        res = first.predict(Xc[400:410])
        for pid, label in zip(res.ids, res.labels, strict=True):
            first.feedback(pid, label)
        first.flush()
    finally:
        first.close()
    second = _agent(tmp_path / "cls", keypair, small_bundle.path, clock)
    try:
        res = second.predict(Xc[410:414])
        for pid, label in zip(res.ids, res.labels, strict=True):
            second.feedback(pid, label)
        fb = _open_window(second).metrics["feedback"]
    finally:
        second.close()
    assert fb["count"] == 14
    assert int(np.trace(np.array(fb["confusion"]))) == 14 and fb["accuracy"] == 1.0


def test_concept_drift_on_the_error_stream_is_detected_counted_and_reported(
        tmp_path: Path, keypair: Any, small_bundle: Any) -> None:
    """Right answers, then wrong ones: ADWIN on the error stream fires, the window counts it,
    and a concept_drift event is stored for the hub."""
    X, _ = make_classification_data(n=600, d=6, seed=11)
    agent = _agent(tmp_path / "data", keypair, small_bundle.path, Clock())
    try:
        res = agent.predict(np.resize(X[400:], (400, 6)))
        fired = []
        for i, (pid, label) in enumerate(zip(res.ids, res.labels, strict=True)):
            truth = label if i < 200 else ("1" if label == "0" else "0")
            if agent.feedback(pid, truth)["concept_drift"]:
                fired.append(i)
        fb = _open_window(agent).metrics["feedback"]
        events = agent.store.events(["concept_drift"])
    finally:
        agent.close()
    assert fired and min(fired) >= 200, fired  # never on the stable stretch
    assert min(fired) < 260  # and soon after the change
    assert fb["concept_drift_detections"] == len(fired)
    assert len(events) == len(fired)
    assert fb["accuracy"] == pytest.approx(0.5)


def test_a_model_error_is_counted_in_the_window(tmp_path: Path, keypair: Any,
                                                small_bundle: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    X, _ = make_classification_data(n=600, d=6, seed=11)
    agent = _agent(tmp_path / "data", keypair, small_bundle.path, Clock())
    try:
        agent.predict(X[400:405])
        model = agent.serving().model

        def broken(feats: Any) -> Any:
            raise RuntimeError("onnxruntime failed")

        monkeypatch.setattr(model, "run_features", broken)
        for rows in (X[410], X[410:420]):
            with pytest.raises(RuntimeError, match="onnxruntime failed"):
                agent.predict(rows)
        monkeypatch.undo()
        agent.predict(X[420])
        m = _open_window(agent).metrics
    finally:
        agent.close()
    assert m["errors"] == 2
    assert m["requests"] == 2 and m["rows"] == 6  # failed requests are errors, not served


def test_a_non_finite_prediction_adds_no_residual(tmp_path: Path, keypair: Any,
                                                  regressor_bundle: Any) -> None:
    """Feedback on a prediction that was NaN, or with an absurd error, is counted, but adds
    nothing to the sketch or the drift detector (it would poison both)."""
    agent = _agent(tmp_path / "data", keypair, regressor_bundle.path, Clock())
    try:
        tel = agent.serving().telemetry
        assert agent.recorder.record_feedback(tel, "", 1.0, float("nan")) == (None, None, False)
        # a finite but absurd truth: its square would overflow the RMSE
        assert agent.recorder.record_feedback(tel, "", 1e200, 3.0) == (None, None, False)
        fb = _open_window(agent).metrics["feedback"]
    finally:
        agent.close()
    assert fb["count"] == 2
    assert fb["residuals"]["count"] == 0 and fb["mae"] is None
