"""sklearn pipeline -> signed `.edgebundle`: the compiler's one entry point.

Steps, each of which can refuse with a clear error before anything is written:
split the pipeline (numba head, ONNX tail) -> check the data against the model -> export ONNX ->
run the device path on training data (baseline sketches, calibrated thresholds) and on the
holdout (parity gate, metrics, test vectors) -> measure single-row latency -> sign the manifest ->
write the zip atomically -> read it back and verify it as a device would.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import math
import subprocess
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sklearn.compose import ColumnTransformer
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    mean_absolute_error,
    mean_squared_error,
    r2_score,
    roc_auc_score,
)
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder

from compiler.baseline import (
    CONFIDENCE_EDGES,
    BaselineOptions,
    categorical_layout,
    feature_baselines,
    numeric_layout,
)
from compiler.data import Dataset
from compiler.errors import CompileError, InputDataError, ParityError
from compiler.export import ExportedModel, SplitPipeline, export_onnx, split_pipeline
from compiler.parity import ReferenceOutputs, parity_report
from edge_agent.atomic import atomic_write
from edge_agent.bundle import key_id, read_bundle
from edge_agent.model import BundleModel, Prediction, RuntimeSpec, _label_text
from edge_agent.preprocess import output_names
from fleet_protocol.manifest import (
    BaselineSpec,
    BundleManifest,
    FeatureSpec,
    ModelSpec,
    ParityReport,
    PreprocessOp,
    Provenance,
    TestVector,
    canonical_json,
)
from fleet_protocol.sketch import FeatureLayout

__all__ = ["CompileOptions", "CompileResult", "compile_bundle"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompileOptions:
    tolerance: float = 1e-4
    n_bins: int = 16
    n_test_vectors: int = 32
    resamples: int = 400
    false_alarm_rate: float = 0.01
    min_evidence: int = 100
    latency_runs: int = 300
    seed: int = 0
    #: folder whose git HEAD goes into provenance (None: the current directory)
    git_dir: Path | None = None


@dataclass(frozen=True)
class CompileResult:
    path: Path
    manifest: BundleManifest
    seconds: float
    bundle_bytes: int
    timings: dict[str, float] = field(default_factory=dict)


# --- inputs --------------------------------------------------------------------------------


def _is_numeric(col: Any) -> bool:
    return bool(pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col))


def _uses_encoder(model: Any) -> bool:
    stack = [model]
    while stack:
        est = stack.pop()
        if isinstance(est, OneHotEncoder):
            return True
        if isinstance(est, Pipeline):
            stack.extend(s for _, s in est.steps)
        elif isinstance(est, ColumnTransformer):
            stack.extend(t for _, t, _ in est.transformers_ if not isinstance(t, str))
    return False


@dataclass(frozen=True)
class _Schema:
    inputs: tuple[FeatureSpec, ...]
    model_features: tuple[FeatureSpec, ...]
    columns: list[tuple[str, str]] | None  # columns mode: (name, dtype)


def _schema(split: SplitPipeline, train: Dataset, feature_names: Sequence[str] | None) -> _Schema:
    X = train.X
    first = split.edge_steps[0] if split.edge_steps else split.tail
    expected = getattr(first, "n_features_in_", None)
    if expected is not None and train.n_columns != expected:
        raise InputDataError(
            f"{train.source}: {train.n_columns} feature columns, but the model was fitted on "
            f"{expected}"
        )
    if isinstance(X, pd.DataFrame):
        names = [str(c) for c in X.columns]
        dtypes = ["float32" if _is_numeric(X[c]) else "string" for c in X.columns]
    else:
        arr = np.asarray(X)
        names = list(feature_names) if feature_names else [
            str(n) for n in getattr(first, "feature_names_in_", [])
        ] or [f"f{i}" for i in range(arr.shape[1])]
        if len(names) != arr.shape[1]:
            raise InputDataError(
                f"{len(names)} feature names for {arr.shape[1]} columns: {names[:8]}..."
            )
        if arr.dtype == object or arr.dtype.kind in "USb":
            dtypes = []
            for j in range(arr.shape[1]):
                try:
                    arr[:, j].astype(np.float64)
                    dtypes.append("float32")
                except (TypeError, ValueError):
                    dtypes.append("string")
        else:
            dtypes = ["float32"] * arr.shape[1]
    strings = [n for n, d in zip(names, dtypes, strict=True) if d == "string"]
    if strings and (split.edge_ops or not _uses_encoder(split.tail)):
        raise InputDataError(
            f"column(s) {strings[:5]} are not numeric and the pipeline has no OneHotEncoder for "
            "them; add one (in a ColumnTransformer) or drop the columns"
        )
    if split.edge_ops:
        arr = np.asarray(X, dtype=np.float64)
        values = arr[np.isfinite(arr)]
        signal = FeatureSpec(
            name="signal", dtype="float32", kind="signal", length=arr.shape[1],
            min=float(values.min()) if values.size else None,
            max=float(values.max()) if values.size else None,
        )
        feat_names = output_names(list(split.edge_ops), ["signal"])
        model_feats = tuple(FeatureSpec(name=n, dtype="float32", kind="numeric")
                            for n in feat_names)
        return _Schema((signal,), model_feats, None)
    specs: list[FeatureSpec] = []
    for j, (name, dtype) in enumerate(zip(names, dtypes, strict=True)):
        col = X[X.columns[j]].to_numpy() if isinstance(X, pd.DataFrame) else np.asarray(X)[:, j]
        if dtype == "string":
            cats = categorical_layout(name, col).categories
            specs.append(FeatureSpec(name=name, dtype="string", kind="categorical",
                                     categories=cats))
        else:
            v = np.asarray(col, dtype=np.float64)
            v = v[np.isfinite(v)]
            specs.append(FeatureSpec(
                name=name, dtype="float32", kind="numeric",
                min=float(v.min()) if v.size else None, max=float(v.max()) if v.size else None,
            ))
    columns_mode = isinstance(X, pd.DataFrame) and (bool(strings) or _has_column_transformer(
        split.tail))
    columns: list[tuple[str, str]] | None = (
        [(s.name, str(s.dtype)) for s in specs] if columns_mode else None)
    return _Schema(tuple(specs), tuple(specs), columns)


def _has_column_transformer(est: Any) -> bool:
    if isinstance(est, ColumnTransformer):
        return True
    if isinstance(est, Pipeline):
        return any(_has_column_transformer(s) for _, s in est.steps)
    return False


def _raw_inputs(data: Dataset, schema: _Schema) -> np.ndarray | dict[str, np.ndarray]:
    """Data as the device receives it: a float matrix, or named columns."""
    X = data.X
    if schema.columns is None:
        if isinstance(X, pd.DataFrame):
            return X.to_numpy(dtype=np.float64)
        return np.asarray(X, dtype=np.float64)
    frame = X if isinstance(X, pd.DataFrame) else pd.DataFrame(
        X, columns=[s.name for s in schema.inputs])
    out: dict[str, np.ndarray] = {}
    for spec in schema.inputs:
        col = frame[spec.name].to_numpy()
        out[spec.name] = (np.array([None if v is None or v != v else str(v) for v in col],
                                   dtype=object) if spec.dtype == "string"
                          else np.asarray(col, dtype=np.float64))
    return out


def _sklearn_input(model: Any, data: Dataset, schema: _Schema) -> Any:
    """The holdout as scikit-learn sees it, rounded through float32 like the device's input."""
    X = data.X
    if isinstance(X, pd.DataFrame):
        frame = X.copy()
        for spec in schema.inputs:
            if spec.dtype == "float32":
                frame[spec.name] = frame[spec.name].astype(np.float32).astype(np.float64)
        return frame
    arr = np.asarray(X)
    if arr.dtype.kind == "f":
        return arr.astype(np.float32).astype(np.float64)
    return arr


def _reference(model: Any, X: Any, classifier: bool) -> ReferenceOutputs:
    if classifier:
        labels = np.array([_label_text(v) for v in model.predict(X)], dtype=object)
        return ReferenceOutputs(labels, np.asarray(model.predict_proba(X)), None)
    values = np.asarray(model.predict(X), dtype=np.float64).reshape(-1)
    return ReferenceOutputs(np.array([repr(float(v)) for v in values], dtype=object), None,
                            values)


# --- evidence --------------------------------------------------------------------------------


def _metrics(pred: Prediction, y: np.ndarray, labels: tuple[str, ...]) -> dict[str, float]:
    if pred.probabilities is not None:
        y_true = np.array([_label_text(v) for v in y], dtype=object)
        unknown = sorted(set(y_true) - set(labels))
        if unknown:
            raise InputDataError(
                f"holdout labels {unknown[:5]} are not among the model's classes {list(labels)}"
            )
        out = {
            "accuracy": float(accuracy_score(y_true, pred.labels)),
            "f1_macro": float(f1_score(y_true, pred.labels, average="macro", labels=list(labels),
                                       zero_division=0)),
        }
        present = sorted(set(y_true))
        if len(present) == len(labels) and len(labels) == 2:
            out["roc_auc"] = float(roc_auc_score(y_true == labels[1], pred.probabilities[:, 1]))
        elif len(present) == len(labels) and len(labels) > 2:
            proba = pred.probabilities / pred.probabilities.sum(axis=1, keepdims=True)
            out["roc_auc"] = float(roc_auc_score(y_true, proba, multi_class="ovr",
                                                 labels=list(labels)))
        return out
    try:
        yv = np.asarray(y, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise InputDataError("holdout labels of a regressor must be numbers") from err
    values = np.asarray(pred.values, dtype=np.float64)
    return {
        "mae": float(mean_absolute_error(yv, values)),
        "rmse": float(math.sqrt(mean_squared_error(yv, values))),
        "r2": float(r2_score(yv, values)) if len(yv) > 1 else 0.0,
    }


def _json_value(v: Any) -> Any:
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return f if math.isfinite(f) else None
    return None


def _test_vectors(model: BundleModel, raw: np.ndarray | dict[str, np.ndarray],
                  schema: _Schema, index: np.ndarray) -> tuple[TestVector, ...]:
    if isinstance(raw, dict):
        sub: np.ndarray | dict[str, np.ndarray] = {k: v[index] for k, v in raw.items()}
    else:
        sub = raw[index]
    pred = model.predict(sub)
    vectors = []
    for k in range(len(index)):
        if isinstance(sub, dict):
            inputs = {name: _json_value(sub[name][k]) for name in sub}
        elif schema.inputs[0].kind == "signal":
            inputs = {schema.inputs[0].name: [_json_value(x) for x in sub[k]]}
        else:
            inputs = {s.name: _json_value(sub[k, j]) for j, s in enumerate(schema.inputs)}
        if pred.probabilities is not None:
            vectors.append(TestVector(
                inputs=inputs, label=str(pred.labels[k]),
                probabilities=tuple(float(p) for p in pred.probabilities[k])))
        else:
            assert pred.values is not None
            vectors.append(TestVector(inputs=inputs, label=float(pred.values[k]),
                                      value=float(pred.values[k])))
    return tuple(vectors)


def _latency_us(fn: Any, runs: int) -> tuple[float, float]:
    fn()  # warm (JIT, allocator)
    times = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter_ns()
        fn()
        times[i] = (time.perf_counter_ns() - t0) / 1000.0
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def _git_commit(folder: Path | None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder or Path.cwd(), capture_output=True,
            text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and len(commit) == 40 else None


def _libraries() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for dist in ("edgefleet", "scikit-learn", "skl2onnx", "onnx", "onnxruntime", "numpy",
                 "numba", "pydantic"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return out


def _params(model: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in sorted(model.get_params(deep=True).items()):
        jv = _json_value(v)
        if jv is None and v is not None:
            jv = repr(v)[:200]
        out[k] = jv
    return out


# --- the whole compile ----------------------------------------------------------------------


def _columns_of(feats: np.ndarray | dict[str, np.ndarray],
                schema: _Schema) -> list[np.ndarray]:
    if isinstance(feats, dict):
        return [np.asarray(feats[s.name]).reshape(-1) for s in schema.model_features]
    return [feats[:, j] for j in range(feats.shape[1])]


def _layouts(cols: list[np.ndarray], schema: _Schema, n_bins: int) -> list[FeatureLayout]:
    out = []
    for spec, col in zip(schema.model_features, cols, strict=True):
        if spec.kind == "categorical":
            out.append(FeatureLayout(spec.name, "categorical", categories=spec.categories))
        else:
            out.append(numeric_layout(spec.name, col, n_bins))
    return out


def compile_bundle(model: Any, train: Dataset, holdout: Dataset, *, name: str, version: str,
                   signing_key: Ed25519PrivateKey, output: str | Path,
                   options: CompileOptions | None = None,
                   feature_names: Sequence[str] | None = None) -> CompileResult:
    """Compile, check, sign and write one bundle; raise a CompileError subclass on refusal."""
    opts = options or CompileOptions()
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    if holdout.y is None:
        raise InputDataError(f"{holdout.source}: labels are missing; the holdout needs them")
    split = split_pipeline(model)
    schema = _schema(split, train, feature_names)
    if holdout.n_columns != train.n_columns:
        raise InputDataError(
            f"{holdout.source}: {holdout.n_columns} columns, training data has {train.n_columns}"
        )
    n_model_features = len(schema.model_features)
    t = time.perf_counter()
    exported: ExportedModel = export_onnx(split, schema.columns, n_model_features)
    timings["export_s"] = time.perf_counter() - t

    labels: tuple[str, ...] = ()
    if split.is_classifier:
        labels = tuple(_label_text(c) for c in split.final.classes_)
    model_spec = ModelSpec(
        sha256=exported.sha256, size_bytes=len(exported.onnx_bytes),
        input_mode=exported.input_mode, inputs=exported.inputs,
        label_output=exported.label_output, probability_output=exported.probability_output,
        opsets=exported.opsets,
    )
    runtime = RuntimeSpec(
        task="classification" if split.is_classifier else "regression", labels=labels,
        inputs=schema.inputs, preprocessing=split.edge_ops,
        model_features=schema.model_features, model=model_spec, name=name, version=version,
    )
    device = BundleModel(exported.onnx_bytes, runtime)

    # Baseline: the training data through the device path.
    t = time.perf_counter()
    rng = np.random.default_rng(opts.seed)
    train_raw = _raw_inputs(train, schema)
    train_feats = device.features(train_raw)
    cols = _columns_of(train_feats, schema)
    base_opts = BaselineOptions(opts.n_bins, opts.resamples, opts.false_alarm_rate, opts.seed)
    features = feature_baselines(_layouts(cols, schema, opts.n_bins), cols, base_opts, rng)
    # The output baseline comes from the holdout: on its own training rows a model is more
    # confident than it will ever be on a device, and that optimism would read as drift.
    hold_raw = _raw_inputs(holdout, schema)
    hold_pred = device.predict(hold_raw)
    if hold_pred.probabilities is not None:
        out_layouts = [FeatureLayout("label", "categorical", categories=labels),
                       FeatureLayout("confidence", "numeric", edges=CONFIDENCE_EDGES)]
        out_cols = [hold_pred.labels, np.max(hold_pred.probabilities, axis=1)]
    else:
        assert hold_pred.values is not None
        out_layouts = [numeric_layout("value", hold_pred.values, opts.n_bins)]
        out_cols = [hold_pred.values]
    outputs = feature_baselines(out_layouts, out_cols, base_opts, rng)
    timings["baseline_s"] = time.perf_counter() - t

    # Parity gate and metrics on the holdout.
    t = time.perf_counter()
    reference = _reference(model, _sklearn_input(model, holdout, schema), split.is_classifier)
    parity: ParityReport = parity_report(reference, hold_pred, opts.tolerance)
    if not parity.passed:
        worst = ", ".join(
            f"row {r.row}: diff {r.max_abs_diff:.3g} ({r.reference_label} vs {r.bundle_label})"
            for r in parity.worst_rows[:3])
        raise ParityError(
            f"parity gate failed: max difference {parity.max_abs_diff:.3g} (tolerance "
            f"{opts.tolerance:g}), {parity.label_mismatches - parity.boundary_ties} label "
            f"flip(s) off the decision boundary; worst: {worst}"
        )
    assert holdout.y is not None
    metrics = _metrics(hold_pred, holdout.y, labels)
    n_vec = min(opts.n_test_vectors, holdout.n_rows)
    index = np.sort(rng.choice(holdout.n_rows, size=n_vec, replace=False))
    vectors = _test_vectors(device, hold_raw, schema, index)
    timings["parity_s"] = time.perf_counter() - t

    # Single-row latency: device path vs scikit-learn, same process, same row.
    one_raw: Any = ({k: v[:1] for k, v in hold_raw.items()} if isinstance(hold_raw, dict)
                    else hold_raw[:1])
    one_sk = _sklearn_input(model, holdout.rows(np.arange(1)), schema)
    sk_fn = model.predict_proba if split.is_classifier else model.predict
    b50, b99 = _latency_us(lambda: device.predict(one_raw), opts.latency_runs)
    s50, s99 = _latency_us(lambda: sk_fn(one_sk), max(20, opts.latency_runs // 5))
    latency = {"bundle_p50": b50, "bundle_p99": b99, "sklearn_p50": s50, "sklearn_p99": s99}

    public = signing_key.public_key()
    manifest = BundleManifest(
        name=name, version=version, task=runtime.task, labels=labels, inputs=schema.inputs,
        preprocessing=tuple(PreprocessOp(**op) for op in split.edge_ops),
        model_features=schema.model_features, model=model_spec,
        baseline=BaselineSpec(rows=train.n_rows, min_evidence=opts.min_evidence,
                              features=features, outputs=outputs),
        metrics=metrics, parity=parity, test_vectors=vectors, latency_us=latency,
        provenance=Provenance(
            training_sha256=train.sha256, training_rows=train.n_rows,
            holdout_sha256=holdout.sha256, holdout_rows=holdout.n_rows,
            libraries=_libraries(), estimator=type(model).__name__, params=_params(model),
            git_commit=_git_commit(opts.git_dir),
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        ),
        signer_key_id=key_id(public),
    )
    manifest_bytes = canonical_json(manifest)
    signature = signing_key.sign(manifest_bytes)
    out_path = Path(output)
    if out_path.is_dir():
        out_path = out_path / manifest.bundle_filename
    if not out_path.parent.is_dir():
        raise CompileError(f"output folder {out_path.parent} does not exist")
    with atomic_write(out_path) as fh:
        _write_zip(fh, manifest_bytes, signature, exported.onnx_bytes)
    # Read back as a device would: a bundle we cannot verify must not be left behind.
    try:
        verified = read_bundle(out_path, [public])
        failures = BundleModel.from_bundle(verified).replay_test_vectors(verified.manifest.
                                                                         test_vectors)
    except Exception:
        out_path.unlink(missing_ok=True)
        raise
    if failures:
        out_path.unlink(missing_ok=True)
        raise CompileError(f"bundle failed its own test vectors: {failures[0].reason}")
    seconds = time.perf_counter() - t_start
    log.info("compiled %s %s: %d bytes in %.2fs, parity max diff %.3g", name, version,
             out_path.stat().st_size, seconds, parity.max_abs_diff)
    return CompileResult(out_path, manifest, seconds, out_path.stat().st_size, timings)


def _write_zip(fh: Any, manifest_bytes: bytes, signature: bytes, model: bytes) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for member, data in (("manifest.json", manifest_bytes), ("manifest.sig", signature),
                             ("model.onnx", model)):
            info = zipfile.ZipInfo(member, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    fh.write(buf.getvalue())
