"""Shared fixtures: signing keys, small real datasets, and a cache of compiled bundles."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import settings

# No per-example deadline anywhere: a loaded 2-core CI machine (or numba loading its cache on
# the first example) can exceed hypothesis' 200 ms default without anything being wrong.
settings.register_profile("edgefleet", deadline=None)
settings.load_profile("edgefleet")

# numba writes its on-disk cache here unless the test command chose a folder already.
os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(__file__).resolve().parent.parent
                                             / ".cache" / "numba"))


@pytest.fixture(scope="session")
def keypair(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One Ed25519 key pair for the whole run (generation is cheap, but bundles share it)."""
    from compiler.signing import generate_keys

    return generate_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session")
def other_keypair(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from compiler.signing import generate_keys

    return generate_keys(tmp_path_factory.mktemp("other-keys"), "other")


def make_classification_data(n: int = 600, d: int = 6, seed: int = 0,
                             n_classes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_classification

    X, y = make_classification(n_samples=n, n_features=d, n_informative=min(d, 4),
                               n_redundant=0, n_classes=n_classes, random_state=seed)
    return X.astype(np.float32), y


def make_regression_data(n: int = 600, d: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_regression

    X, y = make_regression(n_samples=n, n_features=d, noise=5.0, random_state=seed)
    return X.astype(np.float32), y


def signal_windows(n: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Vibration-like windows: class 1 carries a high-frequency tone."""
    rng = np.random.default_rng(seed)
    t = np.arange(length)
    y = rng.integers(0, 2, n)
    freq = np.where(y == 1, 0.35, 0.05)[:, None]
    amp = rng.uniform(0.2, 3.0, (n, 1))
    X = amp * np.sin(2 * np.pi * freq * t + rng.uniform(0, 6.28, (n, 1)))
    return X + rng.normal(0, 0.05, X.shape), y


FAST = {"resamples": 100, "latency_runs": 20}


@pytest.fixture(scope="session")
def compile_fast(keypair: Any, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Any]:
    """Compile a fitted model on (X, y) split 2:1 into train/holdout, with fast options."""
    from compiler.compile import CompileOptions, compile_bundle
    from compiler.data import dataset_from_arrays
    from compiler.signing import load_private_key

    key = load_private_key(keypair.private_path)

    def _compile(model: Any, X: Any, y: Any, *, name: str = "m", version: str = "1.0.0",
                 out: Path | None = None, **opts: Any) -> Any:
        n = len(y)
        cut = (2 * n) // 3
        if hasattr(X, "iloc"):
            Xtr, Xho = X.iloc[:cut], X.iloc[cut:]
        else:
            Xtr, Xho = X[:cut], X[cut:]
        options = CompileOptions(**{**FAST, **opts})
        return compile_bundle(
            model,
            dataset_from_arrays(Xtr, y[:cut], source="train"),
            dataset_from_arrays(Xho, y[cut:], source="holdout", require_labels=True),
            name=name, version=version, signing_key=key,
            output=out or tmp_path_factory.mktemp("bundles"), options=options,
        )

    return _compile


@pytest.fixture(scope="session")
def small_bundle(compile_fast: Callable[..., Any]) -> Any:
    """A real bundle: StandardScaler + LogisticRegression on 6 features (CompileResult)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = make_classification_data(n=600, d=6, seed=11)
    model = make_pipeline(StandardScaler(), LogisticRegression()).fit(X[:400], y[:400])
    return compile_fast(model, X, y, name="small", version="1.2.0")


@pytest.fixture
def mosquitto(tmp_path: Path) -> Any:
    """A real Mosquitto on a free loopback port, persistence on, stopped after the test.

    Fails (never skips) when Mosquitto is missing: scripts/setup installs it where it can.
    ``mosquitto.kill()`` / ``mosquitto.start()`` crash and restart it on the same port.
    """
    from cloud_hub.mosquitto import MosquittoProcess

    broker = MosquittoProcess(tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()


@pytest.fixture
def postgres_url() -> str:
    """The PostgreSQL server the hub's scale path is tested on (.ci/run sets the variable).

    Skipped only when the variable is unset (a laptop without PostgreSQL); .ci/run always sets
    it, and a set URL whose server does not answer fails the test.
    """
    url = os.environ.get("EDGEFLEET_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("EDGEFLEET_TEST_POSTGRES_URL is not set (.ci/run sets it)")
    return url
