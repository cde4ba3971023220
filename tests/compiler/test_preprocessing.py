"""The sklearn transformers that wrap the numba preprocessing ops."""

from __future__ import annotations

from pathlib import Path

import joblib
import numpy as np
import pytest
import scipy.sparse
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from compiler.preprocessing import (
    EDGE_TRANSFORMERS,
    PeakNormalizer,
    RMSNormalizer,
    SilenceTrimmer,
    WindowFeatures,
    is_edge_transformer,
)
from edge_agent.errors import PreprocessError
from edge_agent.preprocess import WINDOW_FEATURES, run_spec

WIDTH = 256


def _signals(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Tones of low (class 0) or high (class 1) pitch, with silence, noise and NaN-padded ends."""
    rng = np.random.default_rng(seed)
    X = np.full((n, WIDTH), np.nan)
    y = rng.integers(0, 2, size=n)
    for i in range(n):
        length = int(rng.integers(96, WIDTH + 1))
        lead, trail = (int(v) for v in rng.integers(0, 24, size=2))
        active = length - lead - trail
        cycles = rng.uniform(4, 16) if y[i] == 0 else rng.uniform(50, 90)
        t = np.arange(active)
        tone = rng.uniform(0.05, 3.0) * np.sin(2 * np.pi * cycles * t / WIDTH + rng.uniform(0, 6))
        X[i, :length] = 0.0
        X[i, lead : lead + active] = tone + rng.normal(0, 0.02, size=active)
    return X, y


def _pipeline() -> Pipeline:
    return Pipeline(
        [
            ("trim", SilenceTrimmer(threshold=0.05)),
            ("peak", PeakNormalizer()),
            ("features", WindowFeatures(n_bands=8)),
            ("scale", StandardScaler()),
            ("clf", LogisticRegression(max_iter=1000)),
        ]
    )


@pytest.fixture(scope="module")
def fitted() -> tuple[Pipeline, np.ndarray, np.ndarray]:
    X_train, y_train = _signals(160, seed=1)
    X_test, y_test = _signals(80, seed=2)
    return _pipeline().fit(X_train, y_train), X_test, y_test


def test_pipeline_learns_pitch_from_signals(
    fitted: tuple[Pipeline, np.ndarray, np.ndarray],
) -> None:
    """In a Pipeline with StandardScaler and LogisticRegression the features tell pitch apart."""
    pipe, X_test, y_test = fitted
    assert (pipe.predict(X_test) == y_test).mean() >= 0.95


def test_pipeline_preprocessing_is_run_spec(
    fitted: tuple[Pipeline, np.ndarray, np.ndarray],
) -> None:
    """The pipeline's edge steps compute exactly run_spec over their edge_op() chain."""
    pipe, X_test, _ = fitted
    spec = [step.edge_op() for _, step in pipe.steps if is_edge_transformer(step)]
    assert [op["op"] for op in spec] == ["trim_silence", "peak_normalize", "window_features"]
    np.testing.assert_array_equal(pipe[:3].transform(X_test), run_spec(spec, X_test))


def test_joblib_roundtrip_keeps_predictions(
    fitted: tuple[Pipeline, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """A fitted pipeline dumped and loaded with joblib predicts the same probabilities."""
    pipe, X_test, _ = fitted
    path = tmp_path / "pipe.joblib"
    joblib.dump(pipe, path)
    loaded = joblib.load(path)
    np.testing.assert_array_equal(loaded.predict_proba(X_test), pipe.predict_proba(X_test))
    assert loaded[2].edge_op() == pipe[2].edge_op()


@pytest.mark.parametrize(
    "transformer",
    [
        PeakNormalizer(target=2.0),
        RMSNormalizer(target=0.5),
        SilenceTrimmer(threshold=0.2),
        WindowFeatures(features=("zcr", "bands"), n_bands=3),
    ],
)
def test_clone_keeps_params(transformer: object) -> None:
    """clone() gives an unfitted copy with identical params and the same edge_op()."""
    copy = clone(transformer)
    assert copy.get_params() == transformer.get_params()  # type: ignore[attr-defined]
    assert copy.edge_op() == transformer.edge_op()  # type: ignore[attr-defined]
    assert not hasattr(copy, "n_features_in_")


def test_edge_op_returns_the_validated_op() -> None:
    """edge_op() is the normalised op dict, defaults filled, ready for the bundle manifest."""
    assert PeakNormalizer().edge_op() == {"op": "peak_normalize", "params": {"target": 1.0}}
    assert RMSNormalizer(target=1).edge_op() == {"op": "rms_normalize", "params": {"target": 1.0}}
    assert SilenceTrimmer().edge_op() == {"op": "trim_silence", "params": {"threshold": 0.01}}
    assert WindowFeatures().edge_op() == {
        "op": "window_features",
        "params": {"features": list(WINDOW_FEATURES), "n_bands": 4},
    }


@pytest.mark.parametrize(
    ("transformer", "fragment"),
    [
        (PeakNormalizer(target=-1.0), r"'target'.*-1\.0"),
        (SilenceTrimmer(threshold=1.5), r"'threshold'.*1\.5"),
        (WindowFeatures(features=("mean", "loud")), r"'features'.*'loud'"),
        (WindowFeatures(n_bands=0), r"'n_bands'.*got 0"),
    ],
)
def test_fit_refuses_bad_params(transformer: object, fragment: str) -> None:
    """fit() validates the params and names the bad one and its value."""
    with pytest.raises(PreprocessError, match=fragment):
        transformer.fit(np.zeros((2, 4)))  # type: ignore[attr-defined]


def test_transform_checks_width_and_shape() -> None:
    """transform() refuses a width other than the one seen in fit, and non-2-D input."""
    step = PeakNormalizer().fit(np.zeros((2, 8)))
    with pytest.raises(PreprocessError, match="has 5 columns, expected 8"):
        step.transform(np.zeros((2, 5)))
    with pytest.raises(PreprocessError, match=r"got shape \(8,\)"):
        step.transform(np.zeros(8))


def test_fit_refuses_sparse_and_empty_input() -> None:
    """fit() says plainly that sparse input is unsupported and that it needs at least one row."""
    with pytest.raises(PreprocessError, match="sparse input is not supported"):
        WindowFeatures().fit(scipy.sparse.csr_matrix(np.ones((2, 3))))
    with pytest.raises(PreprocessError, match=r"at least one row, got shape \(0, 3\)"):
        WindowFeatures().fit(np.zeros((0, 3)))


def test_get_feature_names_out() -> None:
    """Signal steps keep x0..x{L-1}; WindowFeatures names its features with bands expanded."""
    X = np.zeros((3, 4))
    names = PeakNormalizer().fit(X).get_feature_names_out()
    assert names.tolist() == ["x0", "x1", "x2", "x3"]
    assert names.dtype == object
    custom = SilenceTrimmer().fit(X).get_feature_names_out(["a", "b", "c", "d"])
    assert custom.tolist() == ["a", "b", "c", "d"]
    features = WindowFeatures(features=("rms", "bands", "zcr"), n_bands=2).fit(X)
    assert features.get_feature_names_out().tolist() == ["rms", "band_0", "band_1", "zcr"]
    with pytest.raises(PreprocessError, match="has 2 names, expected 4"):
        features.get_feature_names_out(["a", "b"])


def test_pipeline_feature_names_flow_through(
    fitted: tuple[Pipeline, np.ndarray, np.ndarray],
) -> None:
    """sklearn's Pipeline.get_feature_names_out carries the feature names past StandardScaler."""
    pipe, _, _ = fitted
    expected = [*WINDOW_FEATURES[:-1], *(f"band_{b}" for b in range(8))]
    assert pipe[:-1].get_feature_names_out().tolist() == expected


def test_dataframe_columns_become_feature_names_in() -> None:
    """Fitting on a DataFrame records its column names and uses them as output names."""
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame(np.ones((2, 3)), columns=["s0", "s1", "s2"])
    step = RMSNormalizer().fit(frame)
    assert step.feature_names_in_.tolist() == ["s0", "s1", "s2"]
    assert step.get_feature_names_out().tolist() == ["s0", "s1", "s2"]
    np.testing.assert_allclose(step.transform(frame), 0.1)


def test_edge_transformer_registry() -> None:
    """EDGE_TRANSFORMERS lists the four classes and is_edge_transformer recognises instances."""
    expected = (PeakNormalizer, RMSNormalizer, SilenceTrimmer, WindowFeatures)
    assert expected == EDGE_TRANSFORMERS
    assert all(is_edge_transformer(cls()) for cls in EDGE_TRANSFORMERS)
    assert not is_edge_transformer(StandardScaler())
    assert not is_edge_transformer(PeakNormalizer)
