"""The preprocessing op registry and ``run_spec``, the one entry point to the kernels.

A spec is the ordered list of ops stored in a bundle manifest, each ``{"op": name, "params":
{...}}``. The compiler validates it and records the normalised form; the agent validates it
again when it loads a bundle and runs it on every batch. Both call exactly this module, so
training and the device produce the same numbers.

Input data model: a 2-D array (n_rows, L), one window or clip per row, right-padded with NaN
(a row's signal is its values up to the first NaN). Signal ops map (n, L) -> (n, L); the
featurizer ``window_features`` maps (n, L) -> (n, F) and, when present, must be last.

Ops and parameters (defaults in brackets):

- ``peak_normalize(target > 0 [1.0])``: scale so max|x| == target; zero/empty rows unchanged.
- ``rms_normalize(target > 0 [0.1])``: scale so RMS == target; zero/empty rows unchanged.
- ``trim_silence(0 < threshold < 1 [0.01])``: drop leading and trailing samples with
  |x| < threshold * max|x|, shift left, NaN-pad; zero/empty rows become empty.
- ``window_features(features [all], 1 <= n_bands <= 64 [4])``: mean, std (ddof=0), rms,
  skew (m3/m2^1.5), kurtosis (excess, m4/m2^2 - 3), ptp, crest (max|x|/rms), zcr (fraction of
  adjacent pairs whose sign, x >= 0 vs x < 0, differs), bands (relative spectral energy of the
  mean-removed, zero-padded signal in n_bands equal slices of bins 1..M/2, named band_0...).
  Undefined ratios are 0; an empty row gives NaN (missing) in every column.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from edge_agent.errors import PreprocessError
from edge_agent.preprocess import kernels

__all__ = [
    "OP_NAMES",
    "WINDOW_FEATURES",
    "output_names",
    "run_spec",
    "validate_op",
    "validate_spec",
    "warmup",
]

OP_NAMES: tuple[str, ...] = ("peak_normalize", "rms_normalize", "trim_silence", "window_features")
WINDOW_FEATURES: tuple[str, ...] = (
    "mean",
    "std",
    "rms",
    "skew",
    "kurtosis",
    "ptp",
    "crest",
    "zcr",
    "bands",
)
MAX_BANDS = 64
_FEATURIZER = "window_features"

_DEFAULTS: dict[str, dict[str, Any]] = {
    "peak_normalize": {"target": 1.0},
    "rms_normalize": {"target": 0.1},
    "trim_silence": {"threshold": 0.01},
    "window_features": {"features": list(WINDOW_FEATURES), "n_bands": 4},
}


def _real(value: object) -> float | None:
    """The value as a float if it is a real number (bools excluded), else None."""
    if isinstance(value, bool | np.bool_) or not isinstance(
        value, int | float | np.integer | np.floating
    ):
        return None
    return float(value)


def _positive_float(op: str, name: str, value: object) -> float:
    number = _real(value)
    if number is None or not math.isfinite(number) or number <= 0.0:
        raise PreprocessError(
            f"op {op!r}: parameter {name!r} must be a finite number > 0, got {value!r}"
        )
    return number


def _open_unit_float(op: str, name: str, value: object) -> float:
    number = _real(value)
    if number is None or not 0.0 < number < 1.0:
        raise PreprocessError(
            f"op {op!r}: parameter {name!r} must be a number strictly between 0 and 1, "
            f"got {value!r}"
        )
    return number


def _n_bands(op: str, name: str, value: object) -> int:
    if (
        not isinstance(value, int | np.integer)
        or isinstance(value, bool | np.bool_)
        or not 1 <= int(value) <= MAX_BANDS
    ):
        raise PreprocessError(
            f"op {op!r}: parameter {name!r} must be an integer in 1..{MAX_BANDS}, got {value!r}"
        )
    return int(value)


def _feature_list(op: str, name: str, value: object) -> list[str]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence | np.ndarray):
        raise PreprocessError(
            f"op {op!r}: parameter {name!r} must be a list of feature names from "
            f"{list(WINDOW_FEATURES)}, got {value!r}"
        )
    features = list(value)
    if not features:
        raise PreprocessError(
            f"op {op!r}: parameter {name!r} must name at least one feature from "
            f"{list(WINDOW_FEATURES)}, got an empty list"
        )
    seen: set[str] = set()
    for feature in features:
        if not isinstance(feature, str) or feature not in WINDOW_FEATURES:
            raise PreprocessError(
                f"op {op!r}: parameter {name!r} has unknown feature {feature!r}; "
                f"expected names from {list(WINDOW_FEATURES)}"
            )
        if feature in seen:
            raise PreprocessError(
                f"op {op!r}: parameter {name!r} lists feature {feature!r} twice; "
                "each feature may appear once"
            )
        seen.add(feature)
    return [str(f) for f in features]


_CHECKS: dict[str, dict[str, Callable[[str, str, object], Any]]] = {
    "peak_normalize": {"target": _positive_float},
    "rms_normalize": {"target": _positive_float},
    "trim_silence": {"threshold": _open_unit_float},
    "window_features": {"features": _feature_list, "n_bands": _n_bands},
}


def validate_op(op: Mapping[str, Any]) -> dict[str, Any]:
    """Check one op and return a normalised copy ``{"op": name, "params": {...}}``.

    Missing parameters take their defaults; numbers become float/int and feature names a
    list, so the result is JSON-ready. Raises PreprocessError naming the op, the parameter
    and the bad value.
    """
    if not isinstance(op, Mapping):
        raise PreprocessError(
            f"preprocessing op must be a mapping like {{'op': 'peak_normalize', 'params': {{}}}}, "
            f"got {op!r}"
        )
    extra = sorted(str(k) for k in op if k not in ("op", "params"))
    if extra:
        raise PreprocessError(
            f"preprocessing op {op.get('op')!r} has unknown keys {extra}; "
            "expected only 'op' and 'params'"
        )
    name = op.get("op")
    if not isinstance(name, str) or name not in _CHECKS:
        raise PreprocessError(
            f"unknown preprocessing op {name!r}; expected one of {list(OP_NAMES)}"
        )
    params = op.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise PreprocessError(f"op {name!r}: 'params' must be a mapping, got {params!r}")
    checks = _CHECKS[name]
    unknown = sorted(str(k) for k in params if k not in checks)
    if unknown:
        raise PreprocessError(
            f"op {name!r}: unknown parameter {unknown[0]!r}; expected parameters {sorted(checks)}"
        )
    normalised: dict[str, Any] = {}
    for param, check in checks.items():
        value = params.get(param, _DEFAULTS[name][param])
        normalised[param] = check(name, param, value)
    return {"op": name, "params": normalised}


def validate_spec(ops: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Check a whole chain: signal ops in any order, then at most one window_features, last."""
    if isinstance(ops, str | bytes | Mapping) or not isinstance(ops, Sequence):
        raise PreprocessError(f"preprocessing spec must be a list of ops, got {ops!r}")
    chain: list[dict[str, Any]] = []
    for index, op in enumerate(ops):
        try:
            checked = validate_op(op)
        except PreprocessError as err:
            raise PreprocessError(f"preprocessing op #{index}: {err}") from None
        if checked["op"] == _FEATURIZER and index != len(ops) - 1:
            raise PreprocessError(
                f"preprocessing op #{index} is {_FEATURIZER!r} but it is followed by "
                f"{len(ops) - 1 - index} more op(s); {_FEATURIZER!r} must be the last op"
            )
        chain.append(checked)
    return chain


def _feature_names(params: Mapping[str, Any]) -> list[str]:
    names: list[str] = []
    for feature in params["features"]:
        if feature == "bands":
            names.extend(f"band_{b}" for b in range(params["n_bands"]))
        else:
            names.append(feature)
    return names


def output_names(ops: Sequence[Mapping[str, Any]], input_names: Sequence[str]) -> list[str]:
    """Column names after the chain: signal ops keep the names, window_features replaces them."""
    chain = validate_spec(ops)
    if chain and chain[-1]["op"] == _FEATURIZER:
        return _feature_names(chain[-1]["params"])
    return [str(name) for name in input_names]


def _as_input(X: object) -> np.ndarray:
    expected = "a 2-D numeric array of shape (n_rows, n_samples), NaN-padded on the right"
    try:
        arr = np.asarray(X)
    except (ValueError, TypeError) as err:
        raise PreprocessError(
            f"run_spec: input must be {expected}; could not read it: {err}"
        ) from None
    if arr.ndim != 2:
        raise PreprocessError(f"run_spec: input must be {expected}; got shape {arr.shape}")
    if arr.dtype.kind not in "iuf":
        raise PreprocessError(f"run_spec: input must be {expected}; got dtype {arr.dtype}")
    out = np.ascontiguousarray(arr, dtype=np.float64)
    bad = np.isinf(out)
    if bad.any():
        row, col = (int(v) for v in np.argwhere(bad)[0])
        raise PreprocessError(
            f"run_spec: input has an infinite value {out[row, col]} at row {row}, column {col}; "
            "expected finite values, with NaN only as right padding"
        )
    return out


def _run_op(op: Mapping[str, Any], X: np.ndarray) -> np.ndarray:
    name, params = op["op"], op["params"]
    if name == "peak_normalize":
        result: np.ndarray = kernels.peak_normalize(X, params["target"])
    elif name == "rms_normalize":
        result = kernels.rms_normalize(X, params["target"])
    elif name == "trim_silence":
        result = kernels.trim_silence(X, params["threshold"])
    else:
        codes = np.array([WINDOW_FEATURES.index(f) for f in params["features"]], dtype=np.int64)
        tables = kernels.twiddles_for(X.shape[1])
        result = kernels.window_features_with(X, codes, params["n_bands"], *tables)
    return result


def run_spec(ops: Sequence[Mapping[str, Any]], X: np.ndarray) -> np.ndarray:
    """Validate the chain and the input, then run the ops in order; returns a new float64 array.

    Integer and float32 inputs are converted to float64; infinite values are refused.
    """
    chain = validate_spec(ops)
    out = _as_input(X)
    if not chain:
        return out.copy()  # never hand back (a view of) the caller's array
    for op in chain:
        out = _run_op(op, out)
    return out


def warmup() -> None:
    """Compile (or load from numba's cache) every kernel for the signature run_spec uses."""
    X = np.array(
        [[0.0, 0.5, -1.0, 0.25, np.nan], [0.0, 0.0, 0.0, 0.0, 0.0], [np.nan] * 5],
        dtype=np.float64,
    )
    for name in OP_NAMES:
        run_spec([{"op": name}], X)
