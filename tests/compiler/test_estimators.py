"""Every supported estimator compiles into a bundle that verifies and passes its own checks."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.calibration import CalibratedClassifierCV
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import (
    GradientBoostingClassifier,
    GradientBoostingRegressor,
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import MinMaxScaler, OneHotEncoder, StandardScaler
from sklearn.svm import SVC, SVR

from edge_agent.bundle import load_public_key, read_bundle
from edge_agent.model import BundleModel
from tests.conftest import make_classification_data, make_regression_data

CLASSIFIERS = {
    "logistic": lambda: make_pipeline(StandardScaler(), LogisticRegression()),
    "random_forest": lambda: RandomForestClassifier(n_estimators=20, max_depth=6,
                                                    random_state=0),
    "gradient_boosting": lambda: GradientBoostingClassifier(n_estimators=20, random_state=0),
    "hist_gradient_boosting": lambda: HistGradientBoostingClassifier(max_iter=20,
                                                                     random_state=0),
    "mlp": lambda: make_pipeline(MinMaxScaler(), MLPClassifier(hidden_layer_sizes=(16,),
                                                               max_iter=300, random_state=0)),
    "svc": lambda: make_pipeline(StandardScaler(), SVC(probability=True, random_state=0)),
    "svc_calibrated": lambda: make_pipeline(
        StandardScaler(), CalibratedClassifierCV(SVC(random_state=0), ensemble=False)),
}
REGRESSORS = {
    "linear": lambda: LinearRegression(),
    "ridge": lambda: make_pipeline(StandardScaler(), Ridge()),
    "random_forest": lambda: RandomForestRegressor(n_estimators=20, max_depth=6, random_state=0),
    "gradient_boosting": lambda: GradientBoostingRegressor(n_estimators=20, random_state=0),
    "hist_gradient_boosting": lambda: HistGradientBoostingRegressor(max_iter=20,
                                                                    random_state=0),
    "mlp": lambda: make_pipeline(StandardScaler(), MLPRegressor(hidden_layer_sizes=(16,),
                                                                max_iter=500, random_state=0)),
    "svr": lambda: make_pipeline(StandardScaler(), SVR()),
}


def _fit(model: Any, X: Any, y: Any) -> Any:
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        # SVC(probability=True) is deprecated in scikit-learn 1.9 but still what users have.
        warnings.filterwarnings("ignore", "The `probability` parameter", FutureWarning)
        return model.fit(X[: (2 * len(y)) // 3], y[: (2 * len(y)) // 3])


def _check_bundle(result: Any, keypair: Any) -> None:
    verified = read_bundle(result.path, [load_public_key(keypair.public_path)])
    assert verified.manifest == result.manifest
    assert not BundleModel.from_bundle(verified).replay_test_vectors(
        verified.manifest.test_vectors)
    assert result.manifest.parity.passed
    assert result.manifest.parity.max_abs_diff <= result.manifest.parity.tolerance
    assert len(result.manifest.test_vectors) == 32


@pytest.mark.parametrize("kind", sorted(CLASSIFIERS))
def test_classifier_compiles(kind: str, compile_fast: Any, keypair: Any) -> None:
    """Each supported classifier compiles, passes parity, and its bundle verifies and replays."""
    X, y = make_classification_data(n=600, d=6, seed=1)
    model = _fit(CLASSIFIERS[kind](), X, y)
    result = compile_fast(model, X, y, name=f"clf-{kind.replace('_', '-')}")
    _check_bundle(result, keypair)
    m = result.manifest
    assert m.task == "classification" and m.labels == ("0", "1")
    assert set(m.metrics) == {"accuracy", "f1_macro", "roc_auc"}
    assert m.metrics["accuracy"] > 0.7
    assert m.model.probability_output is not None


@pytest.mark.parametrize("kind", sorted(REGRESSORS))
def test_regressor_compiles(kind: str, compile_fast: Any, keypair: Any) -> None:
    """Each supported regressor compiles, passes parity, and its bundle verifies and replays."""
    X, y = make_regression_data(n=600, d=6, seed=2)
    model = _fit(REGRESSORS[kind](), X, y)
    result = compile_fast(model, X, y, name=f"reg-{kind.replace('_', '-')}")
    _check_bundle(result, keypair)
    m = result.manifest
    assert m.task == "regression" and m.labels == ()
    assert set(m.metrics) == {"mae", "rmse", "r2"}
    assert [o.name for o in m.baseline.outputs] == ["value"]


def test_multiclass_with_string_labels(compile_fast: Any, keypair: Any) -> None:
    """String class labels survive the round trip and multiclass ROC-AUC is one-vs-rest."""
    X, y = make_classification_data(n=600, d=6, seed=3, n_classes=3)
    names = np.array(["low", "mid", "high"])[y]
    model = _fit(RandomForestClassifier(n_estimators=20, random_state=0), X, names)
    result = compile_fast(model, X, names, name="clf-strings")
    _check_bundle(result, keypair)
    assert result.manifest.labels == ("high", "low", "mid")
    assert {tv.label for tv in result.manifest.test_vectors} <= {"high", "low", "mid"}


def test_hist_gradient_boosting_with_missing_values(compile_fast: Any, keypair: Any) -> None:
    """HistGradientBoosting's learned NaN direction survives export (the bool-attribute fix)."""
    X, y = make_classification_data(n=900, d=5, seed=4)
    rng = np.random.default_rng(0)
    X = X.copy()
    X[rng.random(X.shape) < 0.15] = np.nan
    model = _fit(HistGradientBoostingClassifier(max_iter=30, random_state=0), X, y)
    result = compile_fast(model, X, y, name="hgb-nan")
    _check_bundle(result, keypair)
    assert result.manifest.baseline.features[0].missing > 0


def test_column_transformer_with_categories(compile_fast: Any, keypair: Any) -> None:
    """A DataFrame with string columns compiles to named inputs; unknown categories still serve."""
    rng = np.random.default_rng(5)
    n = 600
    frame = pd.DataFrame({
        "temp": rng.normal(20, 5, n),
        "load": rng.normal(0.5, 0.2, n),
        "site": rng.choice(["north", "south", "east"], n),
    })
    frame.loc[rng.random(n) < 0.05, "load"] = np.nan
    y = ((frame["temp"] > 21) ^ (frame["site"] == "east")).to_numpy().astype(int)
    pre = ColumnTransformer([
        ("num", Pipeline([("impute", SimpleImputer()), ("scale", StandardScaler())]),
         ["temp", "load"]),
        ("cat", OneHotEncoder(handle_unknown="ignore"), ["site"]),
    ])
    model = _fit(Pipeline([("pre", pre), ("clf", LogisticRegression())]), frame, y)
    result = compile_fast(model, frame, y, name="mixed")
    _check_bundle(result, keypair)
    m = result.manifest
    assert m.model.input_mode == "columns"
    assert [f.kind for f in m.model_features] == ["numeric", "numeric", "categorical"]
    assert m.model_features[2].categories == ("east", "north", "south")
    assert [b.kind for b in m.baseline.features] == ["numeric", "numeric", "categorical"]
    served = BundleModel.from_bundle(
        read_bundle(result.path, [load_public_key(keypair.public_path)])
    ).predict({"temp": [25.0], "load": [float("nan")], "site": ["west"]})
    assert served.labels[0] in ("0", "1")
