"""The device path of a bundle: numba preprocessing, then onnxruntime.

The compiler's parity gate and the agent call this same code, so what was checked at compile
time is what runs on the device.
"""

from __future__ import annotations

import ctypes
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from edge_agent.bundle import VerifiedBundle
from edge_agent.errors import BundleError, PreprocessError
from fleet_protocol.manifest import BundleManifest, FeatureSpec, ModelSpec, TestVector

__all__ = ["BundleModel", "CodeTable", "Prediction", "RuntimeSpec", "TestVectorFailure",
           "UndecodedPrediction", "release_freed_heap", "row_scores"]

Inputs = np.ndarray | Mapping[str, Sequence[Any] | np.ndarray]
_F32 = np.dtype(np.float32)
_I8 = np.dtype(np.int64)


class Prediction:
    """Outputs for a batch: labels as strings; probabilities (classifier) or values.

    ``labels`` (object array of str, shape (n,)) may be given as None with ``codes`` and
    ``label_text`` (the text of each code), or with a regressor's ``values`` (a value's label
    is its text, ``str`` of the float32): they are then made when first read. A batch of
    integer classes is served by its codes (sketches, the prediction log); the object array of
    1,024 strings costs ~5 µs and 8 KiB that most batches never need. A regressor's 1,024
    value strings cost ~450 µs, several times the inference.

    A batch's codes may even wait: see :class:`UndecodedPrediction`.
    """

    __slots__ = ("_label_text", "_labels", "codes", "probabilities", "values")

    #: the label output as the model gave it, while its codes are not decoded (an
    #: UndecodedPrediction's); None here
    raw_labels: np.ndarray | None = None
    #: what decodes ``raw_labels`` into codes; None here
    decoder: CodeTable | None = None

    def __init__(self, labels: np.ndarray | None, probabilities: np.ndarray | None,
                 values: np.ndarray | None, codes: np.ndarray | None = None, *,
                 label_text: np.ndarray | None = None) -> None:
        if labels is None and (codes is None or label_text is None) and values is None:
            raise ValueError("a Prediction without labels needs codes and label_text, or "
                             "values")
        self._labels = labels
        self._label_text = label_text
        #: float32 (n, n_classes) for classifiers
        self.probabilities = probabilities
        #: float32 (n,) for regressors
        self.values = values
        #: classifiers: index of each label in the manifest's labels (len(labels) if unknown)
        self.codes = codes

    @property
    def label_text(self) -> np.ndarray | None:
        """The text of each code, when the labels are decoded from the codes (else None)."""
        return self._label_text

    @property
    def labels(self) -> np.ndarray:
        if self._labels is None:
            codes = self.codes
            if codes is not None and self._label_text is not None:
                self._labels = self._label_text.take(codes)
            else:
                assert self.values is not None
                self._labels = self.values.astype(str).astype(object)
        return self._labels

    def __len__(self) -> int:
        if self._labels is not None:
            return len(self._labels)
        if self.codes is not None:
            return len(self.codes)
        assert self.values is not None
        return len(self.values)


class UndecodedPrediction(Prediction):
    """A batch of integer classes whose codes are decoded when first read: it holds the
    model's label output (``raw_labels``) and the :class:`CodeTable` that maps it. A served
    batch's codes are then decoded off the request path, by the thread that sketches it (see
    :mod:`edge_agent.telemetry`), and here only if the caller reads them. (A subclass, so that
    single rows, the common request, pay nothing for it.)"""

    __slots__ = ("_codes", "decoder", "raw_labels")
    raw_labels: np.ndarray
    decoder: CodeTable

    def __init__(self, probabilities: np.ndarray, label_text: np.ndarray,
                 raw_labels: np.ndarray, decoder: CodeTable) -> None:
        self._labels = None
        self._label_text = label_text
        self.probabilities = probabilities
        self.values = None
        self._codes: np.ndarray | None = None
        self.raw_labels = raw_labels
        self.decoder = decoder

    @property
    def codes(self) -> np.ndarray:
        """Index of each label in the manifest's labels (len(labels) if unknown)."""
        codes = self._codes
        if codes is None:
            codes = self._codes = self.decoder(self.raw_labels)
        return codes

    @codes.setter
    def codes(self, value: np.ndarray) -> None:
        self._codes = value

    def __len__(self) -> int:
        return len(self.raw_labels)


class CodeTable:
    """Integer classes spanning a small range -> label codes, by one lookup: ``codes[v -
    shift]``, where both ends of the table hold the "unknown" code and values outside it clip
    onto them."""

    __slots__ = ("codes", "shift")

    def __init__(self, shift: int, codes: np.ndarray) -> None:
        self.shift = shift
        self.codes = codes

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.codes.take(raw - self.shift, mode="clip")
        return out


#: most classes whose scores a served batch computes by columns (more: numpy's max by rows)
_SCORE_COLUMNS = 32


def row_scores(p: np.ndarray) -> np.ndarray:
    """Each row's largest probability (NaN if any is NaN) of a 2-D array, in its dtype."""
    if p.ndim != 2 or p.shape[1] > _SCORE_COLUMNS:
        return np.asarray(p.max(axis=1))
    # max(axis=1) over a few columns is ~15x slower than a maximum per column (numpy reduces
    # a short inner axis element by element); the same maximum ufunc, in the same order.
    out = p[:, 0].copy()
    for k in range(1, p.shape[1]):
        np.maximum(out, p[:, k], out=out)
    return out


@dataclass(frozen=True)
class TestVectorFailure:
    __test__ = False

    index: int
    reason: str


#: largest span of integer classes decoded through a lookup table
_MAX_TABLE = 4096
#: onnxruntime tensor types a single-row output binding can hold
_TENSOR_DTYPES: dict[str, type] = {"tensor(float)": np.float32, "tensor(double)": np.float64,
                                    "tensor(int64)": np.int64, "tensor(int32)": np.int32}


class _RowBinding:
    """One thread's single-row input buffer and output buffers, bound to a session once."""

    __slots__ = ("io", "outputs", "x")

    def __init__(self, session: ort.InferenceSession, input_name: str, width: int,
                 outputs: list[tuple[str, type, list[int]]]) -> None:
        self.x = np.zeros((1, width), dtype=np.float32)
        self.outputs: list[np.ndarray] = [np.zeros(shape, dtype=dtype)
                                          for _, dtype, shape in outputs]
        self.io = session.io_binding()
        self.io.bind_cpu_input(input_name, self.x)
        for (name, dtype, shape), buf in zip(outputs, self.outputs, strict=True):
            self.io.bind_output(name, "cpu", 0, dtype, shape, buf.ctypes.data)


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):  # not glibc (musl, macOS): nothing to call
        return None
    return trim


_malloc_trim = _load_malloc_trim()


def release_freed_heap() -> None:
    """Hand the pages of freed heap memory back to the OS (glibc; elsewhere a no-op).

    Building a session frees about half of what it allocates (the parsed protobuf, graph
    rewrites, a tree ensemble's build-time maps: 19 of 37 MiB for a 100-tree forest of 75k
    nodes), but glibc gives back only free memory at the top of a heap, so the rest stays
    resident for the life of the process. ``malloc_trim`` releases the free pages wherever
    they are: 1-2.5 ms on a 2-vCPU x86-64 VM, against 60-130 ms to build that session, so every
    model load pays it. It locks each malloc arena in turn: a load beside serving (the green
    slot) may hold up one request's allocation for that long, once.
    """
    if _malloc_trim is not None:
        _malloc_trim(0)


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
        # The wrapper keeps a reference to the model's bytes to rebuild the session after a
        # provider failure ("holding the memory indefinitely", its own comment says), though
        # the session has parsed them already. The CPU provider has nothing to fall back to,
        # and serving calls the C session below, past that fallback: so the fallback is off
        # and the reference goes; the bytes live as long as the caller keeps the bundle.
        self.session.disable_fallback()
        self.session._model_bytes = None
        self._mode = spec.model.input_mode
        self._inputs = spec.model.inputs
        self._outputs = [spec.model.label_output] + (
            [spec.model.probability_output] if spec.model.probability_output else []
        )
        # The session's own run() re-checks input names and ownership on every call (several
        # µs on a 20 µs single-row inference); our inputs are built from the model's own
        # names, so call the binding directly when this onnxruntime exposes it.
        self._run = getattr(self.session, "_sess", self.session).run
        self._input0 = self._inputs[0]
        # A single row runs through an IO binding instead: the row is copied into a buffer
        # bound once per thread and the outputs land in bound buffers, which skips building
        # input and output tensors on every call (~2 µs of a 5 µs single-row run). Only for
        # numeric tensors of known shapes, and only if it gives what run() gives.
        self._row_outputs = self._row_binding_plan()
        self._row_local = threading.local()
        self._row_run = getattr(getattr(self.session, "_sess", None), "run_with_iobinding", None)
        self._row_options = ort.RunOptions()
        if self._row_outputs is not None and not self._row_binding_agrees():
            self._row_outputs = None
        #: raw label value -> (text, code, one-row labels, one-row codes); the one-row arrays
        #: are templates: labels are copied out (callers own them), codes are read-only
        self._label_cache: dict[Any, tuple[str, int, np.ndarray, np.ndarray]] = {}
        self._label_text = np.array([*spec.labels, "?"], dtype=object)
        self._label_index = {lbl: k for k, lbl in enumerate(spec.labels)}
        # Integer classes (the common case) decode without a Python loop: the label output's
        # values are the classes themselves, found by a binary search, or, when they span a
        # small range, by one lookup in a table with an "unknown" entry at either end.
        self._int_classes: tuple[np.ndarray, np.ndarray] | None = None
        self._int_table: CodeTable | None = None
        if spec.labels and all(_is_int(lbl) for lbl in spec.labels):
            raw = np.array([int(lbl) for lbl in spec.labels], dtype=np.int64)
            order = np.argsort(raw)
            self._int_classes = (raw[order], order)
            lo, hi = int(raw.min()), int(raw.max())
            if hi - lo < _MAX_TABLE and abs(lo) < 2**62 and abs(hi) < 2**62:
                unknown = len(spec.labels)
                codes = np.full(hi - lo + 3, unknown, dtype=np.int64)
                codes[raw - lo + 1] = np.arange(len(raw))
                codes.setflags(write=False)
                self._int_table = CodeTable(lo - 1, codes)
        # A batch's codes can wait (see Prediction) when the table decodes them and the
        # probabilities are float32 rows of a few columns (their row maximum is the score)
        probability = {o.name: o for o in self.session.get_outputs()}.get(
            spec.model.probability_output or "")
        self._defer_codes = (spec.task == "classification" and self._int_table is not None
                             and probability is not None and probability.type == "tensor(float)"
                             and len(probability.shape) == 2
                             and isinstance(probability.shape[1], int)
                             and probability.shape[1] <= _SCORE_COLUMNS)
        self._ops = [dict(op) for op in spec.preprocessing]
        # numba, and LLVM under it, load for bundles that preprocess, here rather than on a
        # request; a matrix bundle's features are its raw columns and need neither
        self._run_spec: Callable[[Sequence[Mapping[str, Any]], np.ndarray], np.ndarray] | None
        self._run_spec = None
        if self._ops:
            from edge_agent.preprocess import run_spec

            self._run_spec = run_spec
        self._model_dtypes = {f.name: f.dtype for f in spec.model_features}
        self._classifier = spec.task == "classification"
        release_freed_heap()

    # --- the single-row IO binding ---------------------------------------------------------

    def _row_binding_plan(self) -> list[tuple[str, type, list[int]]] | None:
        """(name, dtype, one-row shape) of each output, or None when a binding cannot be used:
        not one float input of a fixed width, or an output that is not a numeric tensor of
        fixed shape past the batch axis (string labels, ZipMap)."""
        if self._mode != "matrix" or getattr(self.session, "_sess", None) is None:
            return None
        inputs = self.session.get_inputs()
        if (len(inputs) != 1 or inputs[0].name != self._input0 or inputs[0].type != "tensor(float)"
                or len(inputs[0].shape) != 2 or not isinstance(inputs[0].shape[1], int)):
            return None
        by_name = {o.name: o for o in self.session.get_outputs()}
        plan: list[tuple[str, type, list[int]]] = []
        for name in self._outputs:
            out = by_name.get(name)
            dtype = None if out is None else _TENSOR_DTYPES.get(out.type)
            if out is None or dtype is None or not out.shape:
                return None
            shape = [1, *out.shape[1:]]
            if not all(isinstance(d, int) and d > 0 for d in shape):
                return None
            plan.append((name, dtype, shape))
        return plan

    def _row_binding(self) -> _RowBinding:
        """This thread's binding (sessions run concurrently; a binding's buffers do not)."""
        binding: _RowBinding | None = getattr(self._row_local, "binding", None)
        if binding is None:
            assert self._row_outputs is not None
            width = self.session.get_inputs()[0].shape[1]
            binding = _RowBinding(self.session, self._input0, width, self._row_outputs)
            self._row_local.binding = binding
        return binding

    def _run_row(self, feats: np.ndarray) -> list[np.ndarray]:
        """onnxruntime on one row through this thread's binding: the outputs, as new arrays."""
        binding = self._row_binding()
        binding.x[...] = feats
        self._row_run(binding.io._iobinding, self._row_options)  # type: ignore[misc]
        return [out.copy() for out in binding.outputs]

    def _row_binding_agrees(self) -> bool:
        """Whether the binding gives run()'s outputs on a few rows (else it stays unused)."""
        width = self.session.get_inputs()[0].shape[1]
        rows = np.zeros((3, width), dtype=np.float32)
        rows[1] = 1.0
        rows[2] = np.linspace(-2.0, 2.0, width, dtype=np.float32)
        try:
            for row in rows:
                x = row.reshape(1, -1)
                expected = self._run(self._outputs, {self._input0: x}, None)
                got = self._run_row(x)
                if not all(np.array_equal(np.asarray(e).reshape(g.shape), g, equal_nan=True)
                           for e, g in zip(expected, got, strict=True)):
                    return False
        except Exception:  # an onnxruntime that binds differently: run() serves instead
            return False
        return True

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
            if type(raw) is np.ndarray and not self._ops:  # the serving fast path
                if (raw.dtype is _F32 or raw.dtype == _F32) and raw.flags.c_contiguous:
                    return raw
                return np.ascontiguousarray(raw, dtype=np.float32)
            if isinstance(raw, Mapping):
                raise PreprocessError(
                    "this bundle takes a 2-D array of "
                    f"{self._n_raw_columns()} columns, got a mapping"
                )
            x = np.asarray(raw)
            if self._run_spec is not None:
                x = self._run_spec(self._ops, x)
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
        if type(feats) is np.ndarray:
            if self._row_outputs is not None and feats.shape[0] == 1:
                outs = self._run_row(feats)
            else:
                outs = self._run(self._outputs, {self._input0: feats}, None)
        else:
            outs = self._run(self._outputs, dict(feats), None)
        if self._classifier:
            raw = outs[0]
            if raw.size == 1:  # a single row: one dict lookup, no array built from objects
                value = raw.item(0)
                hit = self._label_cache.get(value) or self._cache_label(value)
                return Prediction(hit[2].copy(), outs[1], None, hit[3])
            table = self._int_table
            if self._defer_codes and table is not None and len(raw) > 16 and raw.dtype == _I8:
                probabilities = outs[1]
                if (probabilities.dtype == _F32 and probabilities.ndim == 2
                        and probabilities.shape[0] == len(raw)):
                    # decoded when read: a served batch's by the thread that sketches it
                    return UndecodedPrediction(probabilities, self._label_text, raw.ravel(),
                                               table)
            codes = self._decode_codes(raw.ravel())
            if codes is not None:  # integer classes: labels are read from the codes if needed
                return Prediction(None, outs[1], None, codes, label_text=self._label_text)
            labels, codes = self._decode_labels(raw.ravel())
            return Prediction(labels, outs[1], None, codes)
        return Prediction(None, None, np.asarray(outs[0], dtype=np.float32).reshape(-1))

    def _decode_codes(self, raw: np.ndarray) -> np.ndarray | None:
        """Codes of a batch of integer classes (more than 16 rows) without building their
        labels: ``self._label_text[codes]`` are the labels (unknown values: "?"). None when
        the classes are not integers or the batch is small: see :meth:`_decode_labels`."""
        if len(raw) <= 16 or raw.dtype.kind not in "iu":
            return None
        if self._int_table is not None and raw.dtype == np.int64:
            return self._int_table(raw)
        if self._int_classes is not None:
            values, order = self._int_classes
            pos = np.minimum(np.searchsorted(values, raw), len(values) - 1)
            codes: np.ndarray = np.where(values[pos] == raw, order[pos], len(self._label_text) - 1)
            return codes
        return None

    def _decode_labels(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ONNX label output -> (label strings, codes into the manifest's labels)."""
        n = len(raw)
        if n == 1:  # a single row: one dict lookup, no array built from Python objects
            hit = self._label_cache.get(raw.item(0))
            if hit is None:
                hit = self._cache_label(raw.item(0))
            return hit[2].copy(), hit[3]
        int_codes = self._decode_codes(raw)
        if int_codes is not None:
            return self._label_text.take(int_codes), int_codes
        labels = np.empty(n, dtype=object)
        codes = np.empty(n, dtype=np.int64)
        cache = self._label_cache
        for i, v in enumerate(raw.tolist()):
            hit = cache.get(v)
            if hit is None:
                hit = self._cache_label(v)
            labels[i], codes[i] = hit[0], hit[1]
        return labels, codes

    def _cache_label(self, value: Any) -> tuple[str, int, np.ndarray, np.ndarray]:
        text = _label_text(value)
        code = self._label_index.get(text, len(self._label_text) - 1)
        one_label = np.array([text], dtype=object)
        one_code = np.array([code], dtype=np.int64)
        one_code.setflags(write=False)
        hit = self._label_cache[value] = (text, code, one_label, one_code)
        return hit

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
