"""The device path of a bundle: numba preprocessing, then onnxruntime.

The compiler's parity gate and the agent call this same code, so what was checked at compile
time is what runs on the device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from edge_agent.bundle import VerifiedBundle
from edge_agent.errors import BundleError, PreprocessError
from edge_agent.preprocess import run_spec
from fleet_protocol.manifest import BundleManifest, FeatureSpec, ModelSpec, TestVector

__all__ = ["BundleModel", "Prediction", "RuntimeSpec", "TestVectorFailure"]

Inputs = np.ndarray | Mapping[str, Sequence[Any] | np.ndarray]


@dataclass(slots=True)
class Prediction:
    """Outputs for a batch: labels as strings; probabilities (classifier) or values."""

    labels: np.ndarray  # dtype object (str), shape (n,)
    probabilities: np.ndarray | None  # float32 (n, n_classes)
    values: np.ndarray | None  # float32 (n,) for regressors
    #: classifiers: index of each label in the manifest's labels (len(labels) if unknown)
    codes: np.ndarray | None = None


@dataclass(frozen=True)
class TestVectorFailure:
    __test__ = False

    index: int
    reason: str


def _is_int(text: str) -> bool:
    try:
        return str(int(text)) == text
    except ValueError:
        return False


def _label_text(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, (np.integer, int)):
        return str(int(value))
    return str(value)


@dataclass(frozen=True)
class RuntimeSpec:
    """What the device path needs from a manifest (the compiler builds one before signing)."""

    task: str
    labels: tuple[str, ...]
    inputs: tuple[FeatureSpec, ...]
    preprocessing: tuple[dict[str, Any], ...]
    model_features: tuple[FeatureSpec, ...]
    model: ModelSpec
    name: str = ""
    version: str = ""

    @classmethod
    def from_manifest(cls, m: BundleManifest) -> RuntimeSpec:
        return cls(m.task, m.labels, m.inputs, tuple(op.model_dump() for op in m.preprocessing),
                   m.model_features, m.model, m.name, m.version)


class BundleModel:
    """A model loaded into onnxruntime with its preprocessing, ready to predict."""

    def __init__(self, model_bytes: bytes, spec: RuntimeSpec, *, intra_op_threads: int = 1,
                 inter_op_threads: int = 1, source: str = "<memory>") -> None:
        self.spec = spec
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = inter_op_threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(
                model_bytes, sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
            raise BundleError(f"{source}: onnxruntime cannot load model.onnx: {err}") from err
        self._mode = spec.model.input_mode
        self._inputs = spec.model.inputs
        self._outputs = [spec.model.label_output] + (
            [spec.model.probability_output] if spec.model.probability_output else []
        )
        # The session's own run() re-checks input names and ownership on every call (several
        # µs on a 20 µs single-row inference); our inputs are built from the model's own
        # names, so call the binding directly when this onnxruntime exposes it.
        self._run = getattr(self.session, "_sess", self.session).run
        self._label_cache: dict[Any, tuple[str, int]] = {}
        self._label_text = np.array([*spec.labels, "?"], dtype=object)
        # Integer classes (the common case) decode without a Python loop: the label output's
        # values are the classes themselves, found by a binary search.
        self._int_classes: tuple[np.ndarray, np.ndarray] | None = None
        if spec.labels and all(_is_int(lbl) for lbl in spec.labels):
            raw = np.array([int(lbl) for lbl in spec.labels], dtype=np.int64)
            order = np.argsort(raw)
            self._int_classes = (raw[order], order)
        self._ops = [dict(op) for op in spec.preprocessing]
        self._model_dtypes = {f.name: f.dtype for f in spec.model_features}
        self._classifier = spec.task == "classification"

    @classmethod
    def from_bundle(cls, bundle: VerifiedBundle, **kwargs: Any) -> BundleModel:
        model = cls(bundle.model_bytes, RuntimeSpec.from_manifest(bundle.manifest),
                    source=str(bundle.path), **kwargs)
        model.manifest = bundle.manifest
        return model

    manifest: BundleManifest | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> str:
        return self.spec.version

    def features(self, raw: Inputs) -> dict[str, np.ndarray] | np.ndarray:
        """Run the preprocessing spec: raw inputs -> what the ONNX model receives."""
        if self._mode == "matrix":
            if isinstance(raw, Mapping):
                raise PreprocessError(
                    "this bundle takes a 2-D array of "
                    f"{self._n_raw_columns()} columns, got a mapping"
                )
            x = np.asarray(raw)
            if self._ops:
                x = run_spec(self._ops, x)
            return np.ascontiguousarray(x, dtype=np.float32)
        if not isinstance(raw, Mapping):
            raise PreprocessError(
                f"this bundle takes named columns {list(self._inputs)}, got {type(raw).__name__}"
            )
        out: dict[str, np.ndarray] = {}
        for name in self._inputs:
            col = raw[name]
            if self._model_dtypes.get(name) == "string":
                arr = np.asarray(col, dtype=object).reshape(-1, 1)
            else:
                arr = np.asarray(col, dtype=np.float32).reshape(-1, 1)
            out[name] = arr
        return out

    def _n_raw_columns(self) -> int:
        first = self.spec.inputs[0]
        return first.length if first.kind == "signal" and first.length else len(self.spec.inputs)

    def run_features(self, feats: dict[str, np.ndarray] | np.ndarray) -> Prediction:
        """Run onnxruntime on already-preprocessed features."""
        feeds = {self._inputs[0]: feats} if isinstance(feats, np.ndarray) else dict(feats)
        outs = self._run(self._outputs, feeds, None)
        if self._classifier:
            labels, codes = self._decode_labels(outs[0].ravel())
            return Prediction(labels, outs[1], None, codes)
        values = np.asarray(outs[0], dtype=np.float32).reshape(-1)
        return Prediction(values.astype(str).astype(object), None, values)

    def _decode_labels(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ONNX label output -> (label strings, codes into the manifest's labels)."""
        unknown = len(self._label_text) - 1
        if self._int_classes is not None and raw.dtype.kind in "iu" and len(raw) > 16:
            values, order = self._int_classes
            pos = np.minimum(np.searchsorted(values, raw), len(values) - 1)
            codes = np.where(values[pos] == raw, order[pos], unknown)
            return self._label_text[codes], codes
        n = len(raw)
        labels = np.empty(n, dtype=object)
        codes = np.empty(n, dtype=np.int64)
        cache = self._label_cache
        for i, v in enumerate(raw.tolist()):
            hit = cache.get(v)
            if hit is None:
                text = _label_text(v)
                index = {lbl: k for k, lbl in enumerate(self._label_text[:-1])}
                hit = cache[v] = (text, index.get(text, unknown))
            labels[i], codes[i] = hit
        return labels, codes

    def predict(self, raw: Inputs) -> Prediction:
        return self.run_features(self.features(raw))

    def test_vector_inputs(self, vectors: Sequence[TestVector]) -> Inputs:
        """Assemble the manifest's test vectors into one batch of raw inputs."""
        if self._mode == "matrix" and self.spec.inputs[0].kind == "signal":
            name = self.spec.inputs[0].name
            return np.array([[math.nan if v is None else v for v in tv.inputs[name]]
                             for tv in vectors], dtype=np.float64)
        if self._mode == "matrix":
            names = [f.name for f in self.spec.inputs]
            return np.array(
                [[math.nan if tv.inputs[n] is None else tv.inputs[n] for n in names]
                 for tv in vectors], dtype=np.float64)
        cols: dict[str, list[Any]] = {f.name: [] for f in self.spec.inputs}
        for tv in vectors:
            for f in self.spec.inputs:
                v = tv.inputs[f.name]
                cols[f.name].append(math.nan if v is None and f.dtype == "float32" else v)
        return cols

    def replay_test_vectors(self, vectors: Sequence[TestVector],
                            atol: float = 1e-5) -> list[TestVectorFailure]:
        """Run test vectors; return every vector whose output differs from what it expects."""
        if not vectors:
            return [TestVectorFailure(-1, "there are no test vectors")]
        pred = self.predict(self.test_vector_inputs(vectors))
        failures: list[TestVectorFailure] = []
        for i, tv in enumerate(vectors):
            if pred.probabilities is not None and tv.probabilities is not None:
                got = pred.probabilities[i]
                diff = float(np.max(np.abs(got - np.asarray(tv.probabilities))))
                if not diff <= atol:
                    failures.append(TestVectorFailure(
                        i, f"probabilities differ by {diff:.3g} (tolerance {atol:g})"))
                    continue
                if pred.labels[i] != tv.label:
                    failures.append(TestVectorFailure(
                        i, f"label {pred.labels[i]!r}, expected {tv.label!r}"))
            elif pred.values is not None and tv.value is not None:
                got_v = float(pred.values[i])
                tol = atol * max(1.0, abs(tv.value))
                if not abs(got_v - tv.value) <= tol:
                    failures.append(TestVectorFailure(
                        i, f"value {got_v!r}, expected {tv.value!r} (tolerance {tol:g})"))
            else:
                failures.append(TestVectorFailure(i, "test vector has no expected output"))
        return failures
