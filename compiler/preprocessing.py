"""scikit-learn transformers for the numba preprocessing ops, one per op.

Put them at the front of a training pipeline::

    Pipeline([("trim", SilenceTrimmer()), ("peak", PeakNormalizer()),
              ("feat", WindowFeatures()), ("scale", StandardScaler()),
              ("clf", LogisticRegression())])

Each ``transform`` calls ``edge_agent.preprocess.run_spec`` with the op that ``edge_op()``
returns, so training runs the very kernels the device will run; the compiler splits these
steps off the pipeline (``is_edge_transformer``) and writes their ``edge_op()`` dicts into the
bundle's preprocessing spec. Invalid parameters or inputs raise
``edge_agent.errors.PreprocessError``, the error the device would raise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.sparse import issparse
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from edge_agent.errors import PreprocessError
from edge_agent.preprocess.spec import WINDOW_FEATURES, output_names, run_spec, validate_op

__all__ = [
    "EDGE_TRANSFORMERS",
    "PeakNormalizer",
    "RMSNormalizer",
    "SilenceTrimmer",
    "WindowFeatures",
    "is_edge_transformer",
]


class _EdgeTransformer(TransformerMixin, BaseEstimator):
    """Shared fit/transform/feature-name logic; subclasses name the op and its parameters."""

    _op: str = ""

    def _params(self) -> dict[str, Any]:
        raise NotImplementedError

    def edge_op(self) -> dict[str, Any]:
        """The validated op dict this transformer runs, as written into a bundle spec."""
        return validate_op({"op": self._op, "params": self._params()})

    def fit(self, X: Any, y: Any = None) -> _EdgeTransformer:
        """Validate the parameters and record the input width (and column names if any)."""
        self.edge_op()
        columns = getattr(X, "columns", None)
        arr = _as_2d(X, self._op)
        if arr.shape[0] == 0:
            raise PreprocessError(f"{self._op}: fit needs at least one row, got shape {arr.shape}")
        self.n_features_in_ = int(arr.shape[1])
        if columns is not None and all(isinstance(c, str) for c in columns):
            self.feature_names_in_ = np.asarray(list(columns), dtype=object)
        elif hasattr(self, "feature_names_in_"):
            del self.feature_names_in_
        return self

    def transform(self, X: Any) -> np.ndarray:
        """Run the op on X (n_rows, n_features_in_) through the shared numba kernels."""
        check_is_fitted(self, "n_features_in_")
        arr = _as_2d(X, self._op)
        if arr.shape[1] != self.n_features_in_:
            raise PreprocessError(
                f"{type(self).__name__} ({self._op}): input has {arr.shape[1]} columns, "
                f"expected {self.n_features_in_} as seen in fit"
            )
        return run_spec([self.edge_op()], arr)

    def get_feature_names_out(self, input_features: Sequence[str] | None = None) -> np.ndarray:
        """Output column names: the input names for signal ops, feature names for features."""
        check_is_fitted(self, "n_features_in_")
        names = self._input_names(input_features)
        return np.asarray(output_names([self.edge_op()], names), dtype=object)

    def _input_names(self, input_features: Sequence[str] | None) -> list[str]:
        known = getattr(self, "feature_names_in_", None)
        if input_features is None:
            if known is not None:
                return [str(n) for n in known]
            return [f"x{i}" for i in range(self.n_features_in_)]
        names = [str(n) for n in input_features]
        if len(names) != self.n_features_in_:
            raise PreprocessError(
                f"{type(self).__name__}: input_features has {len(names)} names, "
                f"expected {self.n_features_in_}"
            )
        if known is not None and names != [str(n) for n in known]:
            raise PreprocessError(
                f"{type(self).__name__}: input_features {names[:5]}... do not match "
                f"feature_names_in_ {list(known)[:5]}... seen in fit"
            )
        return names

    def __sklearn_tags__(self) -> Any:
        # Rows are NaN-padded by design; tell sklearn's checks that NaN input is expected.
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True
        return tags


def _as_2d(X: Any, op: str) -> np.ndarray:
    if issparse(X):
        raise PreprocessError(
            f"{op}: sparse input is not supported; pass a dense 2-D array (n_rows, n_samples)"
        )
    try:
        arr = np.asarray(X)
    except (TypeError, ValueError) as err:
        raise PreprocessError(
            f"{op}: input must be a 2-D numeric array (n_rows, n_samples); could not read it: {err}"
        ) from None
    if arr.ndim != 2 or arr.dtype.kind not in "iuf":
        raise PreprocessError(
            f"{op}: input must be a 2-D numeric array (n_rows, n_samples), "
            f"got shape {arr.shape} and dtype {arr.dtype}"
        )
    return arr


class PeakNormalizer(_EdgeTransformer):
    """Scale each row so max|x| == target (op ``peak_normalize``)."""

    _op = "peak_normalize"

    def __init__(self, target: float = 1.0) -> None:
        self.target = target

    def _params(self) -> dict[str, Any]:
        return {"target": self.target}


class RMSNormalizer(_EdgeTransformer):
    """Scale each row so its RMS == target (op ``rms_normalize``)."""

    _op = "rms_normalize"

    def __init__(self, target: float = 0.1) -> None:
        self.target = target

    def _params(self) -> dict[str, Any]:
        return {"target": self.target}


class SilenceTrimmer(_EdgeTransformer):
    """Drop leading and trailing silence and NaN-pad (op ``trim_silence``)."""

    _op = "trim_silence"

    def __init__(self, threshold: float = 0.01) -> None:
        self.threshold = threshold

    def _params(self) -> dict[str, Any]:
        return {"threshold": self.threshold}


class WindowFeatures(_EdgeTransformer):
    """Summarise each row into features (op ``window_features``); must come last of the ops."""

    _op = "window_features"

    def __init__(self, features: Sequence[str] = WINDOW_FEATURES, n_bands: int = 4) -> None:
        self.features = features
        self.n_bands = n_bands

    def _params(self) -> dict[str, Any]:
        return {"features": self.features, "n_bands": self.n_bands}


EDGE_TRANSFORMERS: tuple[type[_EdgeTransformer], ...] = (
    PeakNormalizer,
    RMSNormalizer,
    SilenceTrimmer,
    WindowFeatures,
)


def is_edge_transformer(obj: object) -> bool:
    """True if obj is one of the transformers whose op runs as numba preprocessing on device."""
    return isinstance(obj, EDGE_TRANSFORMERS)
