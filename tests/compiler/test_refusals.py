"""Bad input gets one clear error and leaves nothing behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from compiler.compile import CompileOptions, compile_bundle
from compiler.data import dataset_from_arrays, load_dataset
from compiler.errors import (
    InputDataError,
    ModelNotFittedError,
    ParityError,
    SigningError,
    UnsupportedModelError,
)
from compiler.signing import generate_keys, load_private_key
from tests.conftest import FAST, make_classification_data


def _compile(model: Any, Xtr: Any, ytr: Any, Xho: Any, yho: Any, keypair: Any, out: Path,
             **opts: Any) -> Any:
    return compile_bundle(
        model, dataset_from_arrays(Xtr, ytr), dataset_from_arrays(Xho, yho),
        name="m", version="1.0.0", signing_key=load_private_key(keypair.private_path),
        output=out, options=CompileOptions(**{**FAST, **opts}),
    )


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    return make_classification_data(n=300, d=4, seed=7)


def _nothing_written(folder: Path) -> None:
    assert list(folder.iterdir()) == []


def test_unfitted_model_is_refused(data: Any, keypair: Any, tmp_path: Path) -> None:
    """An unfitted pipeline is refused naming the estimator, before any file is created."""
    X, y = data
    with pytest.raises(ModelNotFittedError, match="Pipeline is not fitted"):
        _compile(make_pipeline(StandardScaler(), LogisticRegression()), X, y, X, y, keypair,
                 tmp_path)
    _nothing_written(tmp_path)


def test_unsupported_estimator_names_what_is_supported(data: Any, keypair: Any,
                                                       tmp_path: Path) -> None:
    """An estimator outside the supported list gets an error that lists the supported ones."""
    X, y = data
    with pytest.raises(UnsupportedModelError, match=r"KNeighborsClassifier is not supported.*"
                                                    "LogisticRegression"):
        _compile(KNeighborsClassifier().fit(X, y), X, y, X, y, keypair, tmp_path)
    _nothing_written(tmp_path)


def test_feature_count_mismatch(data: Any, keypair: Any, tmp_path: Path) -> None:
    """Training data with a different column count than the model was fitted on is refused."""
    X, y = data
    model = LogisticRegression().fit(X, y)
    with pytest.raises(InputDataError, match="5 feature columns, but the model was fitted on 4"):
        _compile(model, np.hstack([X, X[:, :1]]), y, X, y, keypair, tmp_path)
    with pytest.raises(InputDataError, match="3 columns, training data has 4"):
        _compile(model, X, y, X[:, :3], y, keypair, tmp_path)
    _nothing_written(tmp_path)


def test_non_numeric_column_without_encoder(keypair: Any, tmp_path: Path) -> None:
    """A string column with no OneHotEncoder in the pipeline is named in the error."""
    import pandas as pd

    frame = pd.DataFrame({"a": np.arange(50.0), "colour": ["red", "blue"] * 25})
    y = np.arange(50) % 2
    model = LogisticRegression().fit(np.c_[frame["a"].to_numpy(), y], y)
    with pytest.raises(InputDataError, match=r"\['colour'\] are not numeric .* no OneHotEncoder"):
        _compile(model, frame, y, frame, y, keypair, tmp_path)
    _nothing_written(tmp_path)


def test_empty_data_and_missing_labels(data: Any, tmp_path: Path) -> None:
    """Empty data and a holdout without labels are refused with the source named."""
    X, y = data
    with pytest.raises(InputDataError, match="no rows"):
        dataset_from_arrays(X[:0], y[:0], source="train.csv")
    with pytest.raises(InputDataError, match="labels are missing"):
        dataset_from_arrays(X, None, source="holdout.csv", require_labels=True)
    csv = tmp_path / "h.csv"
    csv.write_text("a,b\n1,2\n")
    with pytest.raises(InputDataError, match="label column 'y' not found"):
        load_dataset(csv, label="y")
    empty = tmp_path / "e.csv"
    empty.write_text("")
    with pytest.raises(InputDataError, match="cannot read data"):
        load_dataset(empty)
    with pytest.raises(InputDataError, match="unknown data format"):
        load_dataset(_touch(tmp_path / "x.xlsx"))


def _touch(p: Path) -> Path:
    p.write_bytes(b"x")
    return p


def test_unreadable_or_wrong_key(tmp_path: Path) -> None:
    """A missing, garbled or non-Ed25519 key file gets a SigningError naming the file."""
    with pytest.raises(SigningError, match="cannot read signing key"):
        load_private_key(tmp_path / "nope.key")
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    with pytest.raises(SigningError, match="not an unencrypted PEM private key"):
        load_private_key(bad)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ec_key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "ec.key").write_bytes(ec_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    with pytest.raises(SigningError, match="expected Ed25519"):
        load_private_key(tmp_path / "ec.key")


def test_key_generation_is_private_and_refuses_overwrite(tmp_path: Path) -> None:
    """The private key is mode 0600 and an existing key is never silently replaced."""
    pair = generate_keys(tmp_path)
    assert pair.private_path.stat().st_mode & 0o777 == 0o600
    assert len(pair.key_id) == 16
    before = pair.private_path.read_bytes()
    with pytest.raises(SigningError, match="refusing to overwrite"):
        generate_keys(tmp_path)
    assert pair.private_path.read_bytes() == before


def test_parity_failure_is_refused_with_worst_rows(data: Any, keypair: Any,
                                                   tmp_path: Path) -> None:
    """A tolerance the float32 model cannot meet fails the compile naming the worst row."""
    X, y = data
    model = make_pipeline(StandardScaler(), LogisticRegression()).fit(X, y)
    with pytest.raises(ParityError, match=r"parity gate failed: max difference .* worst: row \d+"):
        _compile(model, X, y, X, y, keypair, tmp_path, tolerance=1e-12)
    _nothing_written(tmp_path)
