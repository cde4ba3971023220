"""A minimal, dependency-free check of an ONNX file before onnxruntime sees it.

Loading an ONNX model is a trust decision: external-data references can point anywhere on the
disk (path traversal, symlinks), and custom op domains ask the runtime for code that is not in
the bundle. skl2onnx output needs only the default domain and ``ai.onnx.ml``, so that is the
allow-list. A device does not install the ``onnx`` package (it is large and the runtime does not
need it), so this module walks the protobuf wire format itself — just the few fields it needs:

    ModelProto:   7 graph (GraphProto), 8 opset_import (OperatorSetIdProto), 14 functions
    OperatorSetIdProto: 1 domain (string), 2 version (int64)
    GraphProto:   1 node (NodeProto), 5 initializer (TensorProto), 15 sparse_initializer
    NodeProto:    7 domain (string), 5 attribute (AttributeProto: 5 g graph, 11 graphs)
    TensorProto:  13 external_data, 14 data_location (1 = EXTERNAL)

(field numbers from onnx/onnx.proto3). Everything else is skipped by its length.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from edge_agent.errors import BundleError

__all__ = ["ALLOWED_DOMAINS", "OnnxSummary", "check_onnx"]

ALLOWED_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
_MAX_DEPTH = 8  # subgraphs nest (If/Loop/Scan); skl2onnx output has none deeper than this


@dataclass(frozen=True)
class OnnxSummary:
    opsets: dict[str, int]
    node_domains: frozenset[str]
    n_nodes: int


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise BundleError("model.onnx is truncated (varint runs past the end)")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise BundleError("model.onnx is malformed (varint longer than 10 bytes)")


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """Yield (field number, wire type, value) for one message; value is int or bytes view."""
    pos = 0
    n = len(buf)
    while pos < n:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield field, wire, value
        elif wire == 1:
            pos += 8
            yield field, wire, 0
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > n:
                raise BundleError(
                    f"model.onnx is truncated (field {field} wants {length} bytes, "
                    f"{n - pos} left)"
                )
            yield field, wire, buf[pos : pos + length]
            pos += length
        elif wire == 5:
            pos += 4
            yield field, wire, 0
        else:
            raise BundleError(f"model.onnx is malformed (wire type {wire} in field {field})")
        if pos > n:
            raise BundleError("model.onnx is truncated")


def _string(v: int | memoryview) -> str:
    if isinstance(v, int):
        raise BundleError("model.onnx is malformed (expected a string field)")
    return bytes(v).decode("utf-8", errors="replace")


def _check_tensor(t: memoryview, where: str) -> None:
    for field, _wire, value in _fields(t):
        if field == 13 or (field == 14 and value == 1):
            raise BundleError(
                f"model.onnx {where} references external data; bundles must be self-contained"
            )


def _walk_graph(g: memoryview, domains: set[str], counter: list[int], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise BundleError(f"model.onnx nests subgraphs deeper than {_MAX_DEPTH} levels")
    for field, _wire, value in _fields(g):
        if isinstance(value, int):
            continue
        if field == 1:  # node
            counter[0] += 1
            domain = ""
            for nf, _nw, nv in _fields(value):
                if nf == 7:
                    domain = _string(nv)
                elif nf == 5 and not isinstance(nv, int):  # attribute: may hold subgraphs
                    for af, _aw, av in _fields(nv):
                        if af in (6, 11) and not isinstance(av, int):
                            _walk_graph(av, domains, counter, depth + 1)
                        elif af in (5, 10) and not isinstance(av, int):
                            _check_tensor(av, "attribute tensor")
            domains.add(domain)
        elif field in (5, 15):
            _check_tensor(value, "initializer")


def check_onnx(data: bytes) -> OnnxSummary:
    """Refuse models that use external data or op domains outside the allow-list."""
    if len(data) < 16:
        raise BundleError(f"model.onnx is {len(data)} bytes; too small to be a model")
    buf = memoryview(data)
    opsets: dict[str, int] = {}
    domains: set[str] = set()
    counter = [0]
    saw_graph = False
    for field, _wire, value in _fields(buf):
        if isinstance(value, int):
            continue
        if field == 8:
            domain, version = "", 0
            for of, _ow, ov in _fields(value):
                if of == 1:
                    domain = _string(ov)
                elif of == 2 and isinstance(ov, int):
                    version = ov
            opsets[domain] = version
        elif field == 7:
            saw_graph = True
            _walk_graph(value, domains, counter, 0)
        elif field == 14:
            raise BundleError("model.onnx defines local functions; bundles may not")
    if not saw_graph:
        raise BundleError("model.onnx has no graph; it is not an ONNX model")
    bad = sorted((set(opsets) | domains) - ALLOWED_DOMAINS)
    if bad:
        raise BundleError(
            f"model.onnx uses op domain(s) {bad}; only the default and 'ai.onnx.ml' are allowed"
        )
    return OnnxSummary(opsets=opsets, node_domains=frozenset(domains), n_nodes=counter[0])
