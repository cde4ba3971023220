"""The preprocessing spec: op validation, chain rules, output names and run_spec's input checks."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from edge_agent.errors import AgentError, PreprocessError
from edge_agent.preprocess import (
    OP_NAMES,
    WINDOW_FEATURES,
    kernels,
    output_names,
    reference,
    run_spec,
    validate_op,
    validate_spec,
    warmup,
)

ALL_FEATURES = list(WINDOW_FEATURES)


def test_public_names() -> None:
    """The registry exposes the four ops and the nine window features in their documented order."""
    assert OP_NAMES == ("peak_normalize", "rms_normalize", "trim_silence", "window_features")
    assert WINDOW_FEATURES == (
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


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("peak_normalize", {"target": 1.0}),
        ("rms_normalize", {"target": 0.1}),
        ("trim_silence", {"threshold": 0.01}),
        ("window_features", {"features": ALL_FEATURES, "n_bands": 4}),
    ],
)
def test_validate_op_fills_defaults(name: str, params: dict[str, Any]) -> None:
    """An op given without params (or with params=None) comes back with every default filled in."""
    assert validate_op({"op": name}) == {"op": name, "params": params}
    assert validate_op({"op": name, "params": None}) == {"op": name, "params": params}


def test_validate_op_normalises_types_to_json() -> None:
    """Ints become floats, numpy ints become ints and tuples become lists, so JSON round-trips."""
    op = validate_op(
        {
            "op": "window_features",
            "params": {"features": ("zcr", "bands"), "n_bands": np.int64(3)},
        }
    )
    assert op == {"op": "window_features", "params": {"features": ["zcr", "bands"], "n_bands": 3}}
    assert type(op["params"]["n_bands"]) is int
    peak = validate_op({"op": "peak_normalize", "params": {"target": 2}})
    assert type(peak["params"]["target"]) is float
    assert json.loads(json.dumps(op)) == op


def test_validate_op_returns_a_copy() -> None:
    """Changing the validated op does not change the caller's mapping (and vice versa)."""
    features = ["mean", "std"]
    raw = {"op": "window_features", "params": {"features": features}}
    op = validate_op(raw)
    op["params"]["features"].append("rms")
    assert features == ["mean", "std"]


def test_unknown_op_is_named() -> None:
    """An unknown op name is refused and the message quotes it and lists the known ops."""
    with pytest.raises(PreprocessError, match=r"'fft_magic'.*peak_normalize"):
        validate_op({"op": "fft_magic"})


def test_unknown_param_is_named() -> None:
    """An unknown parameter is refused, naming the op, the parameter and the accepted ones."""
    with pytest.raises(PreprocessError, match=r"'peak_normalize'.*'gain'.*\['target'\]"):
        validate_op({"op": "peak_normalize", "params": {"gain": 2.0}})


def test_unknown_top_level_key_is_refused() -> None:
    """Keys other than 'op' and 'params' are refused rather than silently dropped."""
    with pytest.raises(PreprocessError, match=r"'target'"):
        validate_op({"op": "peak_normalize", "target": 2.0})


@pytest.mark.parametrize(
    ("name", "param", "value"),
    [
        ("peak_normalize", "target", -1.0),
        ("peak_normalize", "target", 0),
        ("peak_normalize", "target", float("nan")),
        ("peak_normalize", "target", float("inf")),
        ("peak_normalize", "target", "1.0"),
        ("rms_normalize", "target", True),
        ("trim_silence", "threshold", 0.0),
        ("trim_silence", "threshold", 1.0),
        ("trim_silence", "threshold", 1.5),
        ("window_features", "n_bands", 0),
        ("window_features", "n_bands", 65),
        ("window_features", "n_bands", 2.0),
        ("window_features", "n_bands", False),
        ("window_features", "features", "mean"),
        ("window_features", "features", []),
        ("window_features", "features", ["mean", "loudness"]),
        ("window_features", "features", ["mean", "mean"]),
    ],
)
def test_bad_param_value_is_named(name: str, param: str, value: object) -> None:
    """A bad parameter value is refused with the op, the parameter and the value in the message."""
    with pytest.raises(PreprocessError) as info:
        validate_op({"op": name, "params": {param: value}})
    message = str(info.value)
    assert repr(name) in message
    assert repr(param) in message
    bad = value[-1] if isinstance(value, list) and value else value
    assert (repr(bad) if bad != [] else "empty") in message


def test_preprocess_error_is_an_agent_error() -> None:
    """PreprocessError belongs to the agent's hierarchy so the CLI can catch AgentError."""
    assert issubclass(PreprocessError, AgentError)


def test_validate_spec_accepts_signal_ops_in_any_order() -> None:
    """Signal ops may come in any order and repeat; the chain comes back normalised."""
    chain = validate_spec(
        [
            {"op": "rms_normalize"},
            {"op": "trim_silence", "params": {"threshold": 0.2}},
            {"op": "peak_normalize"},
            {"op": "rms_normalize", "params": {"target": 1}},
            {"op": "window_features", "params": {"features": ["rms"]}},
        ]
    )
    assert [op["op"] for op in chain] == [
        "rms_normalize",
        "trim_silence",
        "peak_normalize",
        "rms_normalize",
        "window_features",
    ]
    assert chain[3]["params"] == {"target": 1.0}
    assert validate_spec([]) == []


def test_window_features_must_be_last() -> None:
    """window_features followed by another op is refused, naming its position."""
    with pytest.raises(PreprocessError, match=r"#0 is 'window_features'.*must be the last op"):
        validate_spec([{"op": "window_features"}, {"op": "peak_normalize"}])
    with pytest.raises(PreprocessError, match=r"#0 is 'window_features'"):
        validate_spec([{"op": "window_features"}, {"op": "window_features"}])


def test_validate_spec_names_the_failing_position() -> None:
    """An invalid op inside a chain is reported with its index."""
    with pytest.raises(PreprocessError, match=r"op #1: .*'threshold'.*2\.0"):
        validate_spec(
            [{"op": "peak_normalize"}, {"op": "trim_silence", "params": {"threshold": 2.0}}]
        )


@pytest.mark.parametrize("spec", ["peak_normalize", {"op": "peak_normalize"}, None, 3])
def test_spec_must_be_a_list(spec: object) -> None:
    """A spec that is not a list of ops (a string, a lone op, None) is refused."""
    with pytest.raises(PreprocessError, match="must be a list of ops"):
        validate_spec(spec)  # type: ignore[arg-type]


def test_output_names() -> None:
    """Signal ops keep the input names; window_features gives its names with bands expanded."""
    names = ["s0", "s1", "s2"]
    assert output_names([{"op": "peak_normalize"}], names) == names
    assert output_names([], names) == names
    spec: list[dict[str, Any]] = [
        {"op": "trim_silence"},
        {"op": "window_features", "params": {"features": ["zcr", "bands", "mean"], "n_bands": 3}},
    ]
    assert output_names(spec, names) == ["zcr", "band_0", "band_1", "band_2", "mean"]
    default = output_names([{"op": "window_features"}], names)
    assert default == [*ALL_FEATURES[:-1], "band_0", "band_1", "band_2", "band_3"]


@pytest.mark.parametrize(
    ("X", "fragment"),
    [
        (np.zeros(5), r"shape \(5,\)"),
        (np.zeros((2, 3, 4)), r"shape \(2, 3, 4\)"),
        (np.array([["a", "b"]]), "dtype <U1"),
        (np.array([[True, False]]), "dtype bool"),
        (np.array([[1 + 2j]]), "dtype complex128"),
    ],
)
def test_run_spec_refuses_wrong_input(X: np.ndarray, fragment: str) -> None:
    """Input that is not a 2-D real numeric array is refused, naming expected and actual shape."""
    with pytest.raises(PreprocessError, match=r"2-D numeric array of shape \(n_rows, n_samples\)"):
        run_spec([{"op": "peak_normalize"}], X)
    with pytest.raises(PreprocessError, match=fragment):
        run_spec([{"op": "peak_normalize"}], X)


def test_run_spec_refuses_ragged_lists() -> None:
    """Ragged nested lists are refused with a PreprocessError, not numpy's ValueError."""
    with pytest.raises(PreprocessError, match="2-D numeric array"):
        run_spec([], [[1.0, 2.0], [3.0]])  # type: ignore[arg-type]


def test_run_spec_refuses_infinity_with_its_position() -> None:
    """An infinite sample is refused with its row and column (NaN is padding, inf is an error)."""
    X = np.zeros((3, 4))
    X[2, 1] = -np.inf
    with pytest.raises(PreprocessError, match=r"-inf at row 2, column 1"):
        run_spec([{"op": "window_features"}], X)


def test_run_spec_runs_the_chain_in_order() -> None:
    """run_spec equals the kernels applied one after another, and returns float64."""
    rng = np.random.default_rng(7)
    X = rng.normal(size=(5, 32))
    X[1, 20:] = np.nan
    spec = [
        {"op": "trim_silence", "params": {"threshold": 0.3}},
        {"op": "rms_normalize", "params": {"target": 0.5}},
        {"op": "window_features", "params": {"features": ["rms", "bands"], "n_bands": 2}},
    ]
    out = run_spec(spec, X)
    step = kernels.trim_silence(X, 0.3)
    step = kernels.rms_normalize(step, 0.5)
    expected = kernels.window_features(step, np.array([2, 8], dtype=np.int64), 2)
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out[:, 0], 0.5, rtol=1e-12)
    np.testing.assert_allclose(out, reference.window_features(step, ["rms", "bands"], 2), rtol=1e-9)


def test_run_spec_converts_float32_and_int_inputs() -> None:
    """float32 and integer inputs are converted to float64 and give the float64 results."""
    X64 = np.array([[1.0, -2.0, 3.0, np.nan], [0.0, 4.0, 0.0, 0.0]])
    spec = [{"op": "window_features"}]
    expected = run_spec(spec, X64.astype(np.float32).astype(np.float64))
    np.testing.assert_array_equal(run_spec(spec, X64.astype(np.float32)), expected)
    ints = np.array([[1, -2, 3], [0, 4, 0]], dtype=np.int32)
    np.testing.assert_array_equal(run_spec(spec, ints), run_spec(spec, ints.astype(np.float64)))


def test_run_spec_leaves_its_input_alone() -> None:
    """run_spec never modifies or returns the caller's array, even for an empty chain."""
    X = np.array([[0.0, 0.5, -1.0, np.nan]])
    before = X.copy()
    out = run_spec([], X)
    assert out is not X and not np.shares_memory(out, X)
    run_spec([{"op": "peak_normalize", "params": {"target": 3.0}}], X)
    np.testing.assert_array_equal(X, before)


def test_run_spec_handles_empty_shapes() -> None:
    """Zero rows or zero samples are valid: features are NaN for empty rows, shapes are kept."""
    assert run_spec([{"op": "window_features"}], np.zeros((0, 8))).shape == (0, 12)
    out = run_spec([{"op": "window_features"}], np.zeros((2, 0)))
    assert out.shape == (2, 12) and np.isnan(out).all()
    assert run_spec([{"op": "trim_silence"}], np.zeros((3, 0))).shape == (3, 0)


def test_run_spec_validates_the_spec_first() -> None:
    """A bad spec is refused before any data is touched."""
    with pytest.raises(PreprocessError, match="'nope'"):
        run_spec([{"op": "nope"}], np.zeros((1, 4)))


def test_warmup_compiles_every_op() -> None:
    """warmup() runs every kernel once without error."""
    warmup()
