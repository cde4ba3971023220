"""What a compiled bundle's manifest carries: spec, baseline, evidence and provenance."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from compiler.export import split_pipeline
from compiler.preprocessing import PeakNormalizer, SilenceTrimmer, WindowFeatures
from edge_agent.bundle import load_public_key, read_bundle
from edge_agent.model import BundleModel
from edge_agent.preprocess import run_spec
from fleet_protocol.manifest import canonical_json, parse_manifest
from tests.conftest import signal_windows


def _signals(n: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Vibration-like windows with leading silence for the trimmer to remove."""
    X, y = signal_windows(n, length, seed)
    X[:, :8] = 0.0
    return X, y


def test_signal_pipeline_splits_numba_ops_into_the_spec(compile_fast: Any,
                                                        keypair: Any) -> None:
    """Leading numba transformers become the preprocessing spec; the rest becomes ONNX."""
    X, y = _signals(450, 128, 0)
    model = Pipeline([
        ("trim", SilenceTrimmer(threshold=0.05)),
        ("peak", PeakNormalizer()),
        ("feat", WindowFeatures(n_bands=4)),
        ("scale", StandardScaler()),
        ("clf", LogisticRegression()),
    ]).fit(X[:300], y[:300])
    result = compile_fast(model, X, y, name="vibration")
    m = result.manifest
    assert [op.op for op in m.preprocessing] == ["trim_silence", "peak_normalize",
                                                  "window_features"]
    assert m.inputs[0].kind == "signal" and m.inputs[0].length == 128
    names = [f.name for f in m.model_features]
    assert names[:3] == ["mean", "std", "rms"] and names[-1] == "band_3"
    assert m.model.inputs == ("input",)
    assert m.parity.passed and m.metrics["accuracy"] > 0.9
    # The device runs exactly the training pipeline's transform.
    ops = [op.model_dump() for op in m.preprocessing]
    head = Pipeline(model.steps[:3])
    np.testing.assert_array_equal(run_spec(ops, X[300:]), head.transform(X[300:]))
    verified = read_bundle(result.path, [load_public_key(keypair.public_path)])
    assert not BundleModel.from_bundle(verified).replay_test_vectors(m.test_vectors)


def test_edge_transformer_after_model_steps_is_refused() -> None:
    """A numba transformer in the middle of the pipeline cannot run on the device path."""
    from compiler.errors import UnsupportedModelError

    X, y = _signals(60, 32, 1)
    model = Pipeline([("scale", StandardScaler()), ("feat", WindowFeatures()),
                      ("clf", LogisticRegression())])
    model.fit(X, y)
    with pytest.raises(UnsupportedModelError, match="must lead the pipeline"):
        split_pipeline(model)


def test_manifest_evidence_and_provenance(small_bundle: Any) -> None:
    """The manifest holds metrics, 32 test vectors, latency, baseline and full provenance."""
    m = small_bundle.manifest
    assert m.name == "small" and m.version == "1.2.0"
    assert len(m.test_vectors) == 32
    assert m.latency_us["bundle_p50"] > 0 and m.latency_us["sklearn_p50"] > 0
    assert len(m.baseline.features) == 6 and m.baseline.rows == 400
    assert [o.name for o in m.baseline.outputs] == ["label", "confidence"]
    for fb in m.baseline.features:
        assert sum(fb.counts) == 400 and fb.counts[0] == 0 and fb.counts[-1] == 0
        assert fb.moments is not None and fb.moments[0] == 400
        assert fb.thresholds.window_sizes[0] == 100 and fb.thresholds.window_sizes[-1] == 100_000
    pv = m.provenance
    assert pv.training_rows == 400 and pv.holdout_rows == 200
    assert len(pv.training_sha256) == 64 and pv.training_sha256 != pv.holdout_sha256
    assert {"scikit-learn", "skl2onnx", "onnxruntime", "numpy"} <= set(pv.libraries)
    assert pv.params["logisticregression__C"] == 1.0
    assert pv.estimator == "Pipeline" and pv.created_at.endswith("+00:00")


def test_manifest_is_canonical_and_strict(small_bundle: Any) -> None:
    """The signed bytes are canonical JSON, and unknown fields are refused by name."""
    import json

    from fleet_protocol.errors import ManifestError

    m = small_bundle.manifest
    raw = canonical_json(m)
    assert parse_manifest(raw) == m
    data = json.loads(raw)
    data["surprise"] = 1
    with pytest.raises(ManifestError, match="surprise"):
        parse_manifest(json.dumps(data))
    data.pop("surprise")
    data["version"] = "1.2"
    with pytest.raises(ManifestError, match=r"version.*not a semantic version"):
        parse_manifest(json.dumps(data))


def test_git_commit_recorded_when_there_is_one(compile_fast: Any, tmp_path: Path) -> None:
    """Provenance records the training repository's HEAD, and None outside a repository."""
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin"}
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True, env=env)
    subprocess.run(["git", "commit", "-q", "--allow-empty", "-m", "x"], cwd=repo, check=True,
                   env=env)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, check=True, env=env,
                          capture_output=True, text=True).stdout.strip()
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 3)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int)
    model = RandomForestClassifier(n_estimators=5, random_state=0).fit(X[:200], y[:200])
    with_git = compile_fast(model, X, y, name="git", git_dir=repo)
    assert with_git.manifest.provenance.git_commit == head
    plain = tmp_path / "plain"
    plain.mkdir()
    without = compile_fast(model, X, y, name="nogit", git_dir=plain)
    assert without.manifest.provenance.git_commit is None
