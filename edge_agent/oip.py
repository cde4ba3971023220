"""The Open Inference Protocol v2 (KServe v2 / Triton REST) for one bundle: pure encode/decode.

Existing clients (``tritonclient.http``, KServe's) work unchanged, including Triton's binary
tensor data extension, which ``tritonclient`` uses by default:

- a request with header ``Inference-Header-Content-Length: N`` carries its JSON in the first N
  bytes of the body and the inputs' raw bytes after it, in the order of ``inputs``, each such
  input saying ``"parameters": {"binary_data_size": k}``;
- numbers are little-endian, row-major, no padding; a BYTES element is a 4-byte little-endian
  unsigned length followed by the bytes;
- an output is returned as binary when its request entry says ``"parameters": {"binary_data":
  true}``, or, when it does not say, when the request says ``"parameters":
  {"binary_data_output": true}`` (what ``tritonclient`` sends when no outputs are named).
  Binary outputs carry ``"parameters": {"binary_data_size": k}`` and no ``data``; their bytes
  follow the JSON in the order of ``outputs``.

A bundle's tensors (:class:`ModelSignature`): matrix bundles take one ``input`` FP32
``[-1, n_features]``; signal bundles one ``signal`` FP32 ``[-1, length]``; columns bundles one
input per column, named as the column, ``[-1, 1]`` (``[-1]`` is accepted too), BYTES for text
columns. Numeric inputs may also come as FP16/FP64 or (unsigned) integers and are converted to
FP32; JSON ``null`` in numeric data is a missing value (NaN). Outputs: ``label`` BYTES ``[n]``,
``probabilities`` FP32 ``[n, n_classes]`` (classifiers) or ``value`` FP32 ``[n]``
(regressors), and ``prediction_id`` BYTES ``[n]`` for feedback.

Anything else raises :class:`InputError` naming the input, the value and what was expected.
This module parses by hand rather than with pydantic: it is the hot path, and every check a
pydantic model would make is made here, with the same kind of message.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import orjson

from edge_agent.errors import InputError
from fleet_protocol.manifest import BundleManifest

if TYPE_CHECKING:
    from edge_agent.agent import PredictResult

__all__ = [
    "InferRequest",
    "ModelSignature",
    "TensorSpec",
    "decode_infer_request",
    "encode_infer_response",
]

#: numeric datatypes accepted for FP32 inputs (converted); binary data is little-endian
NUMERIC: dict[str, np.dtype[Any]] = {
    "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"), "FP16": np.dtype("<f2"),
    "INT8": np.dtype("i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "UINT8": np.dtype("u1"), "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"),
}
_LEN = struct.Struct("<I")
_DUMPS_OPTS = orjson.OPT_SERIALIZE_NUMPY


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the model's protocol signature (-1 is a variable dimension)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ModelSignature:
    """How one bundle looks through the protocol: its input and output tensors."""

    name: str
    version: str
    kind: Literal["matrix", "signal", "columns"]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    labels: tuple[str, ...]
    #: matrix: the number of features; signal: the window length; columns: 1
    width: int
    feature_names: tuple[str, ...]
    by_name: dict[str, TensorSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", {t.name: t for t in self.inputs})

    @classmethod
    def from_manifest(cls, m: BundleManifest) -> ModelSignature:
        classifier = m.task == "classification"
        outputs = (TensorSpec("label", "BYTES", (-1,)),) + (
            (TensorSpec("probabilities", "FP32", (-1, len(m.labels))),) if classifier
            else (TensorSpec("value", "FP32", (-1,)),)
        ) + (TensorSpec("prediction_id", "BYTES", (-1,)),)
        names = tuple(f.name for f in m.inputs)
        if len(m.inputs) == 1 and m.inputs[0].kind == "signal":
            width = m.inputs[0].length or 0
            return cls(m.name, m.version, "signal", (TensorSpec("signal", "FP32", (-1, width)),),
                       outputs, m.labels, width, names)
        if m.model.input_mode == "matrix":
            return cls(m.name, m.version, "matrix",
                       (TensorSpec("input", "FP32", (-1, len(names))),), outputs, m.labels,
                       len(names), names)
        inputs = tuple(TensorSpec(f.name, "BYTES" if f.dtype == "string" else "FP32", (-1, 1))
                       for f in m.inputs)
        return cls(m.name, m.version, "columns", inputs, outputs, m.labels, 1, names)

    def metadata(self) -> dict[str, Any]:
        """The model metadata response."""
        return {"name": self.name, "versions": [self.version], "platform": "onnxruntime_onnx",
                "inputs": [t.to_json() for t in self.inputs],
                "outputs": [t.to_json() for t in self.outputs]}

    def describe_inputs(self) -> str:
        shown = ", ".join(f"{t.name!r} {t.datatype} {list(t.shape)}" for t in self.inputs[:12])
        more = f" and {len(self.inputs) - 12} more" if len(self.inputs) > 12 else ""
        return f"[{shown}{more}]"


@dataclass(frozen=True)
class InferRequest:
    """A decoded inference request: what to feed ``Agent.predict`` and what to answer."""

    id: str | None
    #: a float32 array (matrix, signal) or a mapping column -> 1-D array (columns)
    inputs: np.ndarray | dict[str, np.ndarray]
    #: (output name, as binary) in the order to answer
    outputs: tuple[tuple[str, bool], ...]


# --- decoding ------------------------------------------------------------------------------


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _count(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _flatten(data: Any, out: list[Any]) -> None:
    for v in data:
        if isinstance(v, list):
            _flatten(v, out)
        else:
            out.append(v)


def _numbers_from_json(name: str, data: Any, count: int) -> np.ndarray:
    if not isinstance(data, list):
        raise InputError(f"input {name!r}: \"data\" is {type(data).__name__}; expected a list "
                         "of numbers")
    try:
        arr = np.asarray(data)
    except ValueError as err:
        raise InputError(f"input {name!r}: \"data\" is a ragged nested list ({err}); expected "
                         "numbers in row-major order") from err
    if arr.dtype.kind not in "fiu":
        flat: list[Any] = []
        _flatten(data, flat)
        values = np.empty(len(flat), dtype=np.float64)
        for i, v in enumerate(flat):
            if v is None:
                values[i] = math.nan
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                values[i] = float(v) if abs(v) < 1e300 else math.copysign(math.inf, v)
            else:
                raise InputError(f"input {name!r}: element {i} = {v!r:.60} is not a number; "
                                 "expected numbers (or null for a missing value)")
        arr = values
    if arr.size != count:
        raise InputError(f"input {name!r}: \"data\" holds {arr.size} values; its shape needs "
                         f"{count}")
    return _float32(arr).reshape(-1)


def _float32(arr: np.ndarray) -> np.ndarray:
    """A writable float32 copy; values too big for FP32 become inf, as the agent expects."""
    if arr.dtype == np.float32:
        return arr.copy()
    with np.errstate(over="ignore"):
        return arr.astype(np.float32)


def _texts_from_json(name: str, data: Any, count: int) -> np.ndarray:
    if not isinstance(data, list):
        raise InputError(f"input {name!r}: \"data\" is {type(data).__name__}; expected a list "
                         "of strings")
    flat: list[Any] = []
    _flatten(data, flat)
    for i, v in enumerate(flat):
        if v is not None and not isinstance(v, str):
            raise InputError(f"input {name!r}: element {i} = {v!r:.60} is not text; expected "
                             "strings (or null for a missing value) for BYTES")
    if len(flat) != count:
        raise InputError(f"input {name!r}: \"data\" holds {len(flat)} values; its shape needs "
                         f"{count}")
    col = np.empty(count, dtype=object)
    col[:] = flat
    return col


def _texts_from_binary(name: str, raw: bytes, count: int) -> np.ndarray:
    col = np.empty(count, dtype=object)
    pos, end, i = 0, len(raw), 0
    while pos < end:
        if pos + 4 > end or i >= count:
            raise InputError(f"input {name!r}: binary BYTES data holds more than {count} "
                             "elements or ends inside a length prefix; expected each element "
                             "as a 4-byte little-endian length then its bytes")
        (n,) = _LEN.unpack_from(raw, pos)
        pos += 4
        if pos + n > end:
            raise InputError(f"input {name!r}: element {i} declares {n} bytes but only "
                             f"{end - pos} remain in its binary data")
        try:
            col[i] = raw[pos:pos + n].decode("utf-8")
        except UnicodeDecodeError as err:
            raise InputError(f"input {name!r}: element {i} is not UTF-8 text ({err})") from err
        pos += n
        i += 1
    if i != count:
        raise InputError(f"input {name!r}: binary data holds {i} elements; its shape needs "
                         f"{count}")
    return col


def _check_shape(name: str, shape: Any, spec: TensorSpec, sig: ModelSignature) -> list[int]:
    ok = isinstance(shape, list)
    if ok:
        for d in shape:
            if type(d) is not int or d < 0:
                ok = False
    if not ok:
        raise InputError(f"input {name!r}: \"shape\" = {shape!r:.60}; expected a list of "
                         "non-negative integers")
    if sig.kind == "columns":
        if len(shape) == 1 or (len(shape) == 2 and shape[1] == 1):
            return shape
        raise InputError(f"input {name!r} has shape {_shape_text(shape)}; expected [rows, 1] "
                         "(or [rows]): one value per row for this column")
    if len(shape) != 2 or shape[1] != sig.width:
        what = (f"a window of {sig.width} samples per row" if sig.kind == "signal"
                else f"{sig.width} features per row {list(sig.feature_names)[:8]}")
        raise InputError(f"input {name!r} has shape {_shape_text(shape)}; expected "
                         f"[rows, {sig.width}]: {what}")
    return shape


def _decode_tensor(t: Any, i: int, sig: ModelSignature, tail: memoryview,
                   offset: int) -> tuple[str, np.ndarray, int, int]:
    """One request input -> (name, flat array, rows, new binary offset)."""
    if not isinstance(t, dict):
        raise InputError(f"inputs[{i}] is {type(t).__name__}; expected an object with name, "
                         "shape, datatype and data")
    name = t.get("name")
    if not isinstance(name, str):
        raise InputError(f"inputs[{i}]: \"name\" = {name!r:.60}; expected the input's name")
    spec = sig.by_name.get(name)
    if spec is None:
        raise InputError(f"unknown input {name!r}; this model takes {sig.describe_inputs()}")
    datatype: Any = t.get("datatype")
    text = spec.datatype == "BYTES"
    if text and datatype != "BYTES":
        raise InputError(f"input {name!r} has datatype {datatype!r}; expected BYTES (text)")
    if not text and datatype not in NUMERIC:
        raise InputError(f"input {name!r} has datatype {datatype!r}; expected FP32 (or FP64, "
                         "FP16, INT8-64, UINT8-64)")
    shape = _check_shape(name, t.get("shape"), spec, sig)
    count = _count(shape)
    params = t.get("parameters")
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if size is None:
        if "data" not in t:
            raise InputError(f"input {name!r} has neither \"data\" nor a binary_data_size "
                             "parameter")
        data = t["data"]
        arr = (_texts_from_json(name, data, count) if text
               else _numbers_from_json(name, data, count))
        return name, arr, shape[0], offset
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InputError(f"input {name!r}: binary_data_size = {size!r:.60}; expected a "
                         "non-negative integer")
    if offset + size > len(tail):
        raise InputError(f"input {name!r}: binary_data_size {size} runs past the end of the "
                         f"body ({len(tail) - offset} bytes of binary data remain)")
    raw = tail[offset:offset + size]
    if text:
        return name, _texts_from_binary(name, bytes(raw), count), shape[0], offset + size
    dtype = NUMERIC[datatype]
    if size != count * dtype.itemsize:
        raise InputError(f"input {name!r}: binary_data_size is {size} bytes; shape "
                         f"{_shape_text(shape)} of {datatype} needs {count * dtype.itemsize}")
    return name, _float32(np.frombuffer(raw, dtype=dtype)), shape[0], offset + size


def _requested_outputs(req: dict[str, Any], sig: ModelSignature,
                       default_binary: bool) -> tuple[tuple[str, bool], ...]:
    raw = req.get("outputs")
    if raw is None or raw == []:
        return tuple((o.name, default_binary) for o in sig.outputs)
    if not isinstance(raw, list):
        raise InputError(f"\"outputs\" is {type(raw).__name__}; expected a list of "
                         "{\"name\": ...} objects")
    known = {o.name for o in sig.outputs}
    out: list[tuple[str, bool]] = []
    for i, o in enumerate(raw):
        name = o.get("name") if isinstance(o, dict) else None
        if name not in known:
            shown = name if name is not None else o
            raise InputError(f"unknown output {shown!r:.60} (outputs[{i}]); this model has "
                             f"outputs {[x.name for x in sig.outputs]}")
        params = o.get("parameters")
        binary = params.get("binary_data") if isinstance(params, dict) else None
        if binary is not None and not isinstance(binary, bool):
            raise InputError(f"output {name!r}: binary_data = {binary!r:.40}; expected "
                             "true or false")
        out.append((name, default_binary if binary is None else binary))
    return tuple(out)


def decode_infer_request(body: bytes, header_length: int | None,
                         sig: ModelSignature) -> InferRequest:
    """An inference request body (JSON, or JSON then binary tensors) -> :class:`InferRequest`."""
    view = memoryview(body)
    if header_length is None:
        head, tail = view, view[len(view):]
    else:
        if not 0 < header_length <= len(body):
            raise InputError(f"Inference-Header-Content-Length is {header_length}; expected "
                             f"1 to {len(body)} (the body's size)")
        head, tail = view[:header_length], view[header_length:]
    try:
        req = orjson.loads(head)
    except orjson.JSONDecodeError as err:
        what = ("request body" if header_length is None
                else f"request JSON header (the first {header_length} bytes)")
        raise InputError(f"{what} is not valid JSON ({err}); expected an inference request "
                         "object {\"inputs\": [...]}") from err
    if not isinstance(req, dict):
        raise InputError(f"request is {type(req).__name__}; expected an inference request "
                         "object {\"inputs\": [...]}")
    rid = req.get("id")
    if rid is not None and not isinstance(rid, str):
        raise InputError(f"\"id\" = {rid!r:.60}; expected a string")
    params = req.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise InputError(f"\"parameters\" is {type(params).__name__}; expected an object")
    default_binary = bool(params and params.get("binary_data_output") is True)
    raw_inputs = req.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InputError(f"\"inputs\" = {raw_inputs!r:.60}; expected a non-empty list of "
                         f"tensors: {sig.describe_inputs()}")
    arrays: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    offset = 0
    for i, t in enumerate(raw_inputs):
        name, arr, n, offset = _decode_tensor(t, i, sig, tail, offset)
        if name in arrays:
            raise InputError(f"input {name!r} is given twice")
        arrays[name] = arr
        rows[name] = n
    if offset != len(tail):
        raise InputError(f"the body carries {len(tail) - offset} bytes of binary data after the "
                         "inputs; binary_data_size values must add up to the bytes after the "
                         "JSON header")
    absent = [s.name for s in sig.inputs if s.name not in arrays]
    if absent:
        raise InputError(f"input {absent[0]!r} is absent ({len(absent)} absent in all); this "
                         f"model takes {sig.describe_inputs()}")
    outputs = _requested_outputs(req, sig, default_binary)
    if sig.kind != "columns":
        (name,) = arrays
        return InferRequest(rid, arrays[name].reshape(rows[name], sig.width), outputs)
    first = sig.inputs[0].name
    for name, n in rows.items():
        if n != rows[first]:
            raise InputError(f"input {name!r} has {n} rows; input {first!r} has {rows[first]}: "
                             "every column needs one value per row")
    return InferRequest(rid, arrays, outputs)


# --- encoding ------------------------------------------------------------------------------


def _bytes_tensor(values: Sequence[str]) -> bytes:
    parts: list[bytes] = []
    for v in values:
        b = v.encode("utf-8")
        parts.append(_LEN.pack(len(b)))
        parts.append(b)
    return b"".join(parts)


def _output(result: PredictResult, name: str) -> tuple[str, list[int], Any]:
    n = result.n
    if name == "label":
        return "BYTES", [n], result.labels.tolist()
    if name == "prediction_id":
        return "BYTES", [n], result.ids
    if name == "probabilities" and result.probabilities is not None:
        p = np.ascontiguousarray(result.probabilities, dtype=np.float32)
        return "FP32", [n, p.shape[1]], p
    if name == "value" and result.values is not None:
        return "FP32", [n], np.ascontiguousarray(result.values, dtype=np.float32)
    raise InputError(f"output {name!r} is not produced by {result.model_name} "
                     f"{result.model_version}")


def encode_infer_response(result: PredictResult, request: InferRequest) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary outputs follow it."""
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, binary in request.outputs:
        datatype, shape, data = _output(result, name)
        if not binary:
            outputs.append({"name": name, "datatype": datatype, "shape": shape,
                            "data": data.reshape(-1) if isinstance(data, np.ndarray) else data})
            continue
        raw = data.astype("<f4").tobytes() if isinstance(data, np.ndarray) else _bytes_tensor(data)
        outputs.append({"name": name, "datatype": datatype, "shape": shape,
                        "parameters": {"binary_data_size": len(raw)}})
        blobs.append(raw)
    doc: dict[str, Any] = {"model_name": result.model_name,
                           "model_version": result.model_version}
    if request.id is not None:
        doc["id"] = request.id
    doc["outputs"] = outputs
    head = orjson.dumps(doc, option=_DUMPS_OPTS)
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)
