"""Split a fitted pipeline into its numba part and its ONNX part, and export the ONNX part.

The leading edge transformers (compiler.preprocessing) become the manifest's preprocessing spec:
the device runs the very same numba kernels. Everything after them goes through skl2onnx, which
must produce a model that uses only the default and ``ai.onnx.ml`` domains.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from sklearn.base import BaseEstimator
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
from sklearn.exceptions import NotFittedError
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MinMaxScaler, OneHotEncoder, StandardScaler
from sklearn.svm import SVC, SVR
from sklearn.utils.validation import check_is_fitted

from compiler.errors import ModelNotFittedError, UnsupportedModelError
from compiler.preprocessing import is_edge_transformer
from edge_agent.onnx_guard import check_onnx

__all__ = [
    "SUPPORTED_ESTIMATORS",
    "SUPPORTED_TRANSFORMERS",
    "TARGET_OPSETS",
    "ExportedModel",
    "SplitPipeline",
    "export_onnx",
    "split_pipeline",
]

TARGET_OPSETS = {"": 18, "ai.onnx.ml": 3}

SUPPORTED_ESTIMATORS: tuple[type, ...] = (
    LogisticRegression,
    LinearRegression,
    Ridge,
    RandomForestClassifier,
    RandomForestRegressor,
    GradientBoostingClassifier,
    GradientBoostingRegressor,
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    MLPClassifier,
    MLPRegressor,
    SVC,
    SVR,
    CalibratedClassifierCV,
)
SUPPORTED_TRANSFORMERS: tuple[type, ...] = (
    StandardScaler,
    MinMaxScaler,
    SimpleImputer,
    OneHotEncoder,
    ColumnTransformer,
    Pipeline,
)


def _names(types: tuple[type, ...]) -> str:
    return ", ".join(t.__name__ for t in types)


@dataclass(frozen=True)
class SplitPipeline:
    """The numba head (device preprocessing) and the ONNX tail of a pipeline."""

    edge_steps: tuple[Any, ...]
    edge_ops: tuple[dict[str, Any], ...]
    tail: Any  # a Pipeline of the remaining steps, or the bare final estimator
    final: Any  # the final estimator

    @property
    def is_classifier(self) -> bool:
        return hasattr(self.final, "classes_")


def _walk(est: Any, path: str) -> Iterator[tuple[str, Any]]:
    yield path, est
    if isinstance(est, Pipeline):
        for name, step in est.steps:
            if step is None or step == "passthrough":
                continue
            yield from _walk(step, f"{path}.{name}")
    elif isinstance(est, ColumnTransformer):
        for name, trans, _cols in est.transformers_:
            if isinstance(trans, str):  # "drop" / "passthrough"
                continue
            yield from _walk(trans, f"{path}.{name}")


def split_pipeline(model: Any) -> SplitPipeline:
    """Check that `model` is fitted and supported, and split off its leading edge ops."""
    if not isinstance(model, BaseEstimator):
        raise UnsupportedModelError(
            f"expected a fitted scikit-learn estimator or Pipeline, got {type(model).__name__}"
        )
    try:
        check_is_fitted(model)
    except NotFittedError as err:
        raise ModelNotFittedError(
            f"{type(model).__name__} is not fitted; call fit() before compiling"
        ) from err
    steps: list[tuple[str, Any]] = (
        list(model.steps) if isinstance(model, Pipeline) else [("model", model)]
    )
    steps = [(n, s) for n, s in steps if s is not None and s != "passthrough"]
    head: list[Any] = []
    while steps and is_edge_transformer(steps[0][1]):
        head.append(steps.pop(0)[1])
    if not steps:
        raise UnsupportedModelError("the pipeline has no model after its preprocessing steps")
    final = steps[-1][1]
    if not isinstance(final, SUPPORTED_ESTIMATORS):
        raise UnsupportedModelError(
            f"final estimator {type(final).__name__} is not supported; "
            f"supported: {_names(SUPPORTED_ESTIMATORS)}"
        )
    # scikit-learn 1.9 deprecates SVC(probability=True) (its default became "deprecated") in
    # favour of CalibratedClassifierCV(SVC(), ensemble=False); both export.
    if isinstance(final, SVC) and final.probability is not True:
        raise UnsupportedModelError(
            "SVC has no probabilities; fit SVC(probability=True) or wrap it as "
            "CalibratedClassifierCV(SVC(), ensemble=False)"
        )
    for name, step in steps[:-1]:
        for path, est in _walk(step, name):
            if is_edge_transformer(est):
                raise UnsupportedModelError(
                    f"step {path} ({type(est).__name__}) is a numba edge transformer after a "
                    "non-edge step; edge transformers must lead the pipeline"
                )
            if not isinstance(est, SUPPORTED_TRANSFORMERS):
                raise UnsupportedModelError(
                    f"step {path} ({type(est).__name__}) is not supported; supported "
                    f"transformers: {_names(SUPPORTED_TRANSFORMERS)}; edge transformers: "
                    "PeakNormalizer, RMSNormalizer, SilenceTrimmer, WindowFeatures"
                )
    tail = Pipeline(steps) if len(steps) > 1 else final
    ops = tuple(step.edge_op() for step in head)
    return SplitPipeline(tuple(head), ops, tail, final)


# --- skl2onnx 1.20 + scikit-learn 1.9: HistGradientBoosting --------------------------------
# scikit-learn 1.9 stores a tree node's `missing_go_to_left` as numpy bool; skl2onnx 1.20 copies
# it into the TreeEnsemble attribute `nodes_missing_value_tracks_true`, and onnx.helper refuses
# a bool where it wants an int ("Expected an int, got a boolean"). We re-register the two
# converters at the registration point with a wrapper that turns bool attribute values into
# ints before onnx sees them; shape calculators and options stay the originals.


def _coerce_bools(value: Any) -> Any:
    if isinstance(value, np.ndarray) and value.dtype == np.bool_:
        return value.astype(np.int64)
    if isinstance(value, (list, tuple)) and any(isinstance(v, (bool, np.bool_)) for v in value):
        return [int(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    return value


def _ints_not_bools(convert: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(convert)
    def converter(scope: Any, operator: Any, container: Any) -> Any:
        original = container.add_node

        def add_node(op_type: Any, inputs: Any, outputs: Any, op_domain: str = "",
                     op_version: Any = None, name: Any = None, **attrs: Any) -> Any:
            fixed = {k: _coerce_bools(v) for k, v in attrs.items()}
            return original(op_type, inputs, outputs, op_domain=op_domain,
                            op_version=op_version, name=name, **fixed)

        container.add_node = add_node
        try:
            return convert(scope, operator, container)
        finally:
            del container.add_node

    converter.__edgefleet_fixed__ = True  # type: ignore[attr-defined]
    return converter


@functools.cache
def _install_converter_fixes() -> None:
    from skl2onnx import update_registered_converter
    from skl2onnx._supported_operators import sklearn_operator_name_map
    from skl2onnx.common._registration import _converter_pool, _shape_calculator_pool

    for cls in (HistGradientBoostingClassifier, HistGradientBoostingRegressor):
        alias = sklearn_operator_name_map[cls]
        registered = _converter_pool[alias]
        if getattr(registered._fct, "__edgefleet_fixed__", False):
            continue
        update_registered_converter(
            cls,
            alias,
            _shape_calculator_pool[alias],
            _ints_not_bools(registered._fct),
            options=registered.get_allowed_options(),
            overwrite=True,
        )


# --- export --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportedModel:
    onnx_bytes: bytes
    sha256: str
    input_mode: str  # "matrix" | "columns"
    inputs: tuple[str, ...]
    label_output: str
    probability_output: str | None
    opsets: dict[str, int]


def export_onnx(split: SplitPipeline, columns: list[tuple[str, str]] | None,
                n_features: int) -> ExportedModel:
    """Convert the ONNX tail.

    `columns` is None for matrix input (one float32 tensor of `n_features` columns), or a list
    of (name, "float32" | "string") for one [N, 1] tensor per column (DataFrame input).
    """
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType

    _install_converter_fixes()
    if columns is None:
        initial_types: list[tuple[str, Any]] = [("input", FloatTensorType([None, n_features]))]
        mode = "matrix"
    else:
        initial_types = [
            (name, StringTensorType([None, 1]) if dt == "string" else FloatTensorType([None, 1]))
            for name, dt in columns
        ]
        mode = "columns"
    options: dict[int, dict[str, Any]] = {}
    if split.is_classifier:
        options[id(split.final)] = {"zipmap": False}
    try:
        with warnings.catch_warnings():
            # skl2onnx 1.20 reads SVC.probA_/probB_, which scikit-learn 1.9 deprecates along with
            # probability=True; the values are still there and still right.
            warnings.filterwarnings("ignore", r"Attribute `prob[AB]_` was deprecated",
                                    FutureWarning)
            proto = convert_sklearn(
                split.tail, initial_types=initial_types, target_opset=TARGET_OPSETS,
                options=options,
            )
    except Exception as err:  # skl2onnx raises bare RuntimeError/ValueError/TypeError
        raise UnsupportedModelError(
            f"skl2onnx could not convert {type(split.final).__name__}: "
            f"{str(err).splitlines()[0][:300]}"
        ) from err
    if any(init.data_location == onnx.TensorProto.EXTERNAL
           for init in proto.graph.initializer):
        raise UnsupportedModelError("the exported model uses external data; refusing")
    data = proto.SerializeToString()
    summary = check_onnx(data)  # the same allow-list the device applies
    outputs = [o.name for o in proto.graph.output]
    label = outputs[0]
    proba = outputs[1] if split.is_classifier and len(outputs) > 1 else None
    if split.is_classifier and proba is None:
        raise UnsupportedModelError(
            f"{type(split.final).__name__} exported without a probability output"
        )
    if not split.is_classifier:
        label = outputs[0]
    return ExportedModel(
        onnx_bytes=data,
        sha256=hashlib.sha256(data).hexdigest(),
        input_mode=mode,
        inputs=tuple(name for name, _ in initial_types),
        label_output=label,
        probability_output=proba,
        opsets=dict(summary.opsets),
    )
