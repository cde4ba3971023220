"""Reading and verifying `.edgebundle` files.

A bundle is a zip of exactly three members: ``manifest.json``, ``manifest.sig`` (64-byte
Ed25519 signature over the manifest's bytes) and ``model.onnx`` (named in the manifest by
sha256). Verification order matters: sizes first (before decompressing anything), then the
signature over the manifest bytes, then the manifest schema, then the model hash, then the ONNX
allow-list. Nothing is trusted — or written anywhere — before all of that passes.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.errors import BundleError, SignatureError
from edge_agent.onnx_guard import OnnxSummary, check_onnx
from fleet_protocol.errors import ManifestError
from fleet_protocol.manifest import BundleManifest, parse_manifest

__all__ = [
    "MAX_BUNDLE_BYTES",
    "MAX_MANIFEST_BYTES",
    "MEMBERS",
    "VerifiedBundle",
    "key_id",
    "load_public_key",
    "read_bundle",
]

MEMBERS = ("manifest.json", "manifest.sig", "model.onnx")
MAX_BUNDLE_BYTES = 512 * 1024 * 1024
MAX_MODEL_BYTES = 400 * 1024 * 1024
MAX_MANIFEST_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose signature, manifest, model hash and ONNX content all checked out."""

    path: Path
    manifest: BundleManifest
    manifest_bytes: bytes
    model_bytes: bytes
    onnx: OnnxSummary
    signer_key_id: str


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short stable id of a public key: the first 16 hex digits of sha256(raw key)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """Load a PEM Ed25519 public key, with a clear error when it is anything else."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as err:
        raise SignatureError(f"cannot read public key {p}: {err.strerror}") from err
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as err:
        raise SignatureError(
            f"public key {p} is not a PEM public key (make one with `edgefleet keys generate`)"
        ) from err
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"public key {p} is {type(key).__name__}, expected an Ed25519 key")
    return key


def _read_members(path: Path) -> dict[str, bytes]:
    try:
        size = path.stat().st_size
    except OSError as err:
        raise BundleError(f"cannot read bundle {path}: {err.strerror}") from err
    if size > MAX_BUNDLE_BYTES:
        raise BundleError(f"bundle {path} is {size} bytes, over the {MAX_BUNDLE_BYTES} limit")
    limits = {"manifest.json": MAX_MANIFEST_BYTES, "manifest.sig": 64,
              "model.onnx": MAX_MODEL_BYTES}
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            names = [i.filename for i in infos]
            if sorted(names) != sorted(MEMBERS):
                raise BundleError(
                    f"bundle {path} holds {names}; expected exactly {list(MEMBERS)}"
                )
            out: dict[str, bytes] = {}
            for info in infos:
                if info.file_size > limits[info.filename]:
                    raise BundleError(
                        f"bundle {path}: {info.filename} is {info.file_size} bytes, over the "
                        f"{limits[info.filename]} limit"
                    )
                out[info.filename] = zf.read(info)
            return out
    except zipfile.BadZipFile as err:
        raise BundleError(
            f"bundle {path} is truncated or not a bundle ({err}); download it again"
        ) from err
    except (zipfile.LargeZipFile, EOFError, OSError) as err:
        raise BundleError(f"bundle {path} cannot be read: {err}") from err


def read_bundle(path: str | Path, trusted_keys: Iterable[Ed25519PublicKey], *,
                checked: MutableMapping[str, OnnxSummary] | None = None) -> VerifiedBundle:
    """Open a bundle and verify it completely against the trusted public keys.

    ``checked`` caches ONNX allow-list results by model sha256: the walk over a large tree
    ensemble's protobuf takes most of a second in Python, and a model whose bytes hash the same
    was already checked. The signature and the hash are verified every time.
    """
    p = Path(path)
    keys = {key_id(k): k for k in trusted_keys}
    if not keys:
        raise SignatureError("no trusted public keys configured; cannot verify any bundle")
    members = _read_members(p)
    manifest_bytes = members["manifest.json"]
    signature = members["manifest.sig"]
    if len(signature) != 64:
        raise SignatureError(f"bundle {p}: manifest.sig is {len(signature)} bytes, expected 64")
    signer = None
    for kid, key in keys.items():
        try:
            key.verify(signature, manifest_bytes)
        except InvalidSignature:
            continue
        signer = kid
        break
    if signer is None:
        raise SignatureError(
            f"bundle {p}: signature does not verify against any of the {len(keys)} trusted "
            f"key(s) {sorted(keys)}; it was tampered with or signed by another key"
        )
    try:
        manifest = parse_manifest(manifest_bytes)
    except ManifestError as err:
        raise BundleError(f"bundle {p}: {err}") from err
    if manifest.signer_key_id != signer:
        raise SignatureError(
            f"bundle {p}: manifest names signer {manifest.signer_key_id}, verified with {signer}"
        )
    model = members["model.onnx"]
    digest = hashlib.sha256(model).hexdigest()
    if digest != manifest.model.sha256:
        raise BundleError(
            f"bundle {p}: model.onnx sha256 {digest[:16]}... does not match the manifest's "
            f"{manifest.model.sha256[:16]}...; the model was tampered with"
        )
    summary = checked.get(digest) if checked is not None else None
    if summary is None:
        summary = check_onnx(model)
        if checked is not None:
            checked[digest] = summary
    return VerifiedBundle(p, manifest, manifest_bytes, model, summary, signer)


def read_unverified_manifest(path: str | Path) -> BundleManifest:
    """The manifest of a bundle without checking its signature (for `bundle inspect`)."""
    p = Path(path)
    members = _read_members(p)
    try:
        return parse_manifest(members["manifest.json"])
    except ManifestError as err:
        raise BundleError(f"bundle {p}: {err}") from err
