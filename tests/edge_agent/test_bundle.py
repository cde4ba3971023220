"""A device trusts a bundle only when signature, manifest, model hash and ONNX content check out."""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import TensorProto, helper

from edge_agent.bundle import load_public_key, read_bundle
from edge_agent.errors import BundleError, SignatureError
from edge_agent.onnx_guard import check_onnx


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def _rezip(path: Path, members: dict[str, bytes]) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    path.write_bytes(buf.getvalue())


@pytest.fixture
def copy(small_bundle: Any, tmp_path: Path) -> Path:
    dst = tmp_path / "b.edgebundle"
    shutil.copy(small_bundle.path, dst)
    return dst


def test_good_bundle_verifies(copy: Path, keypair: Any) -> None:
    """An untouched bundle verifies and names the key that signed it."""
    v = read_bundle(copy, [load_public_key(keypair.public_path)])
    assert v.signer_key_id == keypair.key_id
    assert v.onnx.node_domains <= {"", "ai.onnx.ml"}


def test_wrong_key_is_refused(copy: Path, other_keypair: Any) -> None:
    """A bundle signed by another key does not verify."""
    with pytest.raises(SignatureError, match="does not verify against any"):
        read_bundle(copy, [load_public_key(other_keypair.public_path)])


def test_tampered_manifest_is_refused(copy: Path, keypair: Any) -> None:
    """Changing one byte of the manifest breaks the signature."""
    m = _members(copy)
    data = json.loads(m["manifest.json"])
    data["version"] = "9.9.9"
    m["manifest.json"] = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    _rezip(copy, m)
    with pytest.raises(SignatureError):
        read_bundle(copy, [load_public_key(keypair.public_path)])


def test_tampered_model_is_refused(copy: Path, keypair: Any) -> None:
    """A model that is not the one the manifest names by hash is refused."""
    m = _members(copy)
    model = onnx.load_from_string(m["model.onnx"])
    model.producer_name = "mallory"
    m["model.onnx"] = model.SerializeToString()
    _rezip(copy, m)
    with pytest.raises(BundleError, match=r"sha256 .* does not match"):
        read_bundle(copy, [load_public_key(keypair.public_path)])


def test_truncated_bundle_is_refused(copy: Path, keypair: Any) -> None:
    """A download cut short is reported as truncated, not as a crash."""
    data = copy.read_bytes()
    copy.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="truncated or not a bundle"):
        read_bundle(copy, [load_public_key(keypair.public_path)])


def test_extra_member_is_refused(copy: Path, keypair: Any) -> None:
    """A bundle must hold exactly the three members; smuggled files are refused."""
    m = _members(copy)
    m["evil.so"] = b"\x7fELF"
    _rezip(copy, m)
    with pytest.raises(BundleError, match="expected exactly"):
        read_bundle(copy, [load_public_key(keypair.public_path)])


def test_no_trusted_keys(copy: Path) -> None:
    """Verification without any trusted key is refused rather than skipped."""
    with pytest.raises(SignatureError, match="no trusted public keys"):
        read_bundle(copy, [])


def _model(
    node: Any, initializer: list[Any] | None = None, opsets: list[Any] | None = None
) -> bytes:
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
        initializer=initializer or [],
    )
    model = helper.make_model(graph, opset_imports=opsets or [helper.make_opsetid("", 18)])
    return bytes(model.SerializeToString())


def test_onnx_guard_accepts_plain_model() -> None:
    """A model using only default-domain ops passes and its opsets are read."""
    s = check_onnx(_model(helper.make_node("Relu", ["x"], ["y"])))
    assert s.opsets == {"": 18} and s.n_nodes == 1


def test_onnx_guard_refuses_custom_domain() -> None:
    """An op from a custom domain (a native library the runtime would load) is refused."""
    node = helper.make_node("Evil", ["x"], ["y"], domain="com.example.custom")
    data = _model(
        node, opsets=[helper.make_opsetid("", 18), helper.make_opsetid("com.example.custom", 1)]
    )
    with pytest.raises(BundleError, match=r"com\.example\.custom"):
        check_onnx(data)


def test_onnx_guard_refuses_external_data() -> None:
    """An initializer pointing at an external file (path traversal risk) is refused."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
    w.data_location = TensorProto.EXTERNAL
    entry = w.external_data.add()
    entry.key, entry.value = "location", "../../etc/passwd"
    w.ClearField("float_data")
    node = helper.make_node("Add", ["x", "w"], ["y"])
    with pytest.raises(BundleError, match="external data"):
        check_onnx(_model(node, initializer=[w]))


def test_onnx_guard_refuses_garbage() -> None:
    """Bytes that are not a protobuf ONNX model are refused with a reason."""
    with pytest.raises(BundleError):
        check_onnx(b"\xff" * 64)
