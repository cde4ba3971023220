"""The swap on a real agent: stage, shadow, promote, commit, rollback, health gates."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from edge_agent.agent import Agent
from edge_agent.swap_events import Commit, Promote, Rollback, Shadow, Stage, SwapPhase
from tests.conftest import make_classification_data
from tests.edge_agent.conftest import swap_config


@pytest.fixture(scope="module")
def v2_bundle(compile_fast: Any) -> Any:
    """Version 1.3.0 of the 'small' model (retrained with other regularisation)."""
    X, y = make_classification_data(n=600, d=6, seed=11)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1)).fit(X[:400], y[:400])
    return compile_fast(model, X, y, name="small", version="1.3.0")


_config = swap_config


def _rows(n: int) -> np.ndarray:
    X, _ = make_classification_data(n=600, d=6, seed=11)
    return X[400:400 + n]


def test_stage_shadow_promote_commit(tmp_path: Path, keypair: Any, small_bundle: Any,
                                     v2_bundle: Any) -> None:
    """The whole happy path: green loads beside blue, shadows, answers, then becomes blue."""
    with Agent(_config(tmp_path, keypair, small_bundle.path), start_writer=False) as agent:
        r = agent.swap.handle(Stage(id="s1", source=str(v2_bundle.path)))
        assert r.outcome == "applied" and agent.swap.state.phase is SwapPhase.STAGED
        assert agent.slots["green"] is not None and agent.serving().version == "1.2.0"
        agent.swap.handle(Shadow(id="sh1"))
        for x in _rows(30):
            assert agent.predict(x).model_version == "1.2.0"
        assert agent.wait_shadow_idle()
        agent.flush()
        (green_w,) = agent.store.windows(model_version="1.3.0")
        shadow = green_w.metrics["shadow"]
        assert shadow["compared"] == 30 and 0.5 < shadow["agreement"] <= 1.0
        assert green_w.metrics["latency_p50_us"] > 0  # green's latency beside blue's
        agent.swap.handle(Promote(id="p1"))
        assert agent.serving().version == "1.3.0" and agent.slots["blue"] is not None
        assert agent.predict(_rows(1)[0]).model_version == "1.3.0"
        agent.swap.handle(Commit(id="c1"))
        assert agent.swap.state.phase is SwapPhase.COMMITTED
        assert agent.slots["blue"].version == "1.3.0" and agent.slots["green"] is None
        files = sorted(p.name for p in agent.config.bundles_dir.iterdir())
        assert len(files) == 1 and "1.3.0" in files[0]
        again = agent.swap.handle(Commit(id="c1"))
        assert again.outcome == "duplicate"


def test_rollback_returns_to_blue(tmp_path: Path, keypair: Any, small_bundle: Any,
                                  v2_bundle: Any) -> None:
    """After a promotion an operator rollback puts blue back and removes green."""
    with Agent(_config(tmp_path, keypair, small_bundle.path), start_writer=False) as agent:
        agent.swap.handle(Stage(id="s1", source=str(v2_bundle.path)))
        agent.swap.handle(Promote(id="p1"))
        assert agent.serving().version == "1.3.0"
        agent.swap.handle(Rollback(id="r1"))
        assert agent.swap.state.phase is SwapPhase.ROLLED_BACK
        assert agent.serving().version == "1.2.0" and agent.slots["green"] is None
        blue = agent.slots["blue"]
        assert blue is not None
        assert [p.name for p in agent.config.bundles_dir.iterdir()] == [Path(blue.path).name]


def test_downgrade_refused_unless_forced(tmp_path: Path, keypair: Any, small_bundle: Any,
                                         v2_bundle: Any) -> None:
    """A bundle older than the committed one is refused after verification unless forced."""
    with Agent(_config(tmp_path, keypair, v2_bundle.path), start_writer=False) as agent:
        assert agent.serving().version == "1.3.0"
        r = agent.swap.handle(Stage(id="s1", source=str(small_bundle.path)))
        assert agent.swap.state.phase is not SwapPhase.STAGED
        assert "older" in (r.reason + agent.swap.state.last_reason)
        agent.swap.handle(Stage(id="s2", source=str(small_bundle.path), force=True))
        assert agent.swap.state.phase is SwapPhase.STAGED


def test_health_gate_rolls_back_on_nan(tmp_path: Path, keypair: Any, small_bundle: Any,
                                       v2_bundle: Any) -> None:
    """Green answering NaN after promotion trips the gate; the device rolls back on its own,
    recording why with numbers."""
    cfg = _config(tmp_path, keypair, small_bundle.path, min_requests_for_gates=20)
    with Agent(cfg, start_writer=False) as agent:
        agent.swap.handle(Stage(id="s1", source=str(v2_bundle.path)))
        agent.swap.handle(Promote(id="p1"))
        rows = _rows(40).copy()
        rows[:, 0] = np.nan  # this pipeline has no imputer: NaN in, NaN out
        for x in rows:
            agent.predict(x)
        agent.flush()
        result = agent.swap.check_health()
        assert result is not None
        state = agent.swap.state
        assert state.phase is SwapPhase.ROLLED_BACK
        assert agent.serving().version == "1.2.0"
        assert "nonfinite" in state.last_reason or state.last_numbers


def test_config_bundle_change_goes_through_the_swap(tmp_path: Path, keypair: Any,
                                                    small_bundle: Any, v2_bundle: Any) -> None:
    """Restarting with a newer configured bundle stages, promotes and commits it."""
    with Agent(_config(tmp_path, keypair, small_bundle.path), start_writer=False):
        pass
    with Agent(_config(tmp_path, keypair, v2_bundle.path), start_writer=False) as agent:
        assert agent.serving().version == "1.3.0"
        assert agent.swap.state.phase is SwapPhase.COMMITTED


def test_bad_candidate_never_serves(tmp_path: Path, keypair: Any, small_bundle: Any,
                                    v2_bundle: Any) -> None:
    """A truncated candidate fails staging with its reason; blue keeps serving."""
    bad = tmp_path / "bad.edgebundle"
    shutil.copy(v2_bundle.path, bad)
    bad.write_bytes(bad.read_bytes()[:-100])
    with Agent(_config(tmp_path, keypair, small_bundle.path), start_writer=False) as agent:
        agent.swap.handle(Stage(id="s1", source=str(bad)))
        assert agent.swap.state.phase is SwapPhase.FAILED
        assert "truncated" in agent.swap.state.last_reason
        r = agent.swap.handle(Promote(id="p1"))
        assert r.outcome == "refused" and agent.serving().version == "1.2.0"


def test_canary_split_is_sticky_by_key(tmp_path: Path, keypair: Any, small_bundle: Any,
                                       v2_bundle: Any) -> None:
    """During shadow a canary fraction of requests is answered by green, the same key always
    by the same slot; green's answers are recorded in its own window."""
    cfg = _config(tmp_path, keypair, small_bundle.path, canary_fraction=0.3)
    with Agent(cfg, start_writer=False) as agent:
        agent.swap.handle(Stage(id="s1", source=str(v2_bundle.path)))
        agent.swap.handle(Shadow(id="sh1"))
        row = _rows(1)[0]
        first = {f"device-{k}": agent.predict(row, key=f"device-{k}").model_version
                 for k in range(200)}
        again = {k: agent.predict(row, key=k).model_version for k in first}
        assert first == again
        share = sum(v == "1.3.0" for v in first.values()) / len(first)
        assert 0.18 < share < 0.42
        assert agent.wait_shadow_idle()
        agent.flush()
        green_rows = sum(w.rows for w in agent.store.windows(model_version="1.3.0"))
        canary = sum(v == "1.3.0" for v in first.values()) * 2
        assert green_rows >= canary  # canary answers plus shadow runs of blue's answers
