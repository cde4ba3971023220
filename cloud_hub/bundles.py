"""Bundles on the hub: verify a ``.edgebundle`` file and keep its manifest.

The hub needs a bundle's manifest to judge fleet drift (its layouts and calibrated thresholds)
and, in later issues, to roll it out. It trusts a manifest only as the devices do: the zip
holds exactly ``manifest.json``, ``manifest.sig`` and ``model.onnx`` (sizes checked before
anything is decompressed), the Ed25519 signature over the manifest bytes verifies against one
of the trusted public keys, the manifest names that key, and ``model.onnx`` hashes to the
manifest's sha256. (The ONNX allow-list check stays on the device, which runs the model.)

``add_bundle(store, path, keys)`` is what ``edgefleet hub add-bundle`` calls.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy.engine import Connection

from cloud_hub.errors import BundleConflict, BundleError, SignatureError
from cloud_hub.store import BundleRecord, HubStore
from cloud_hub.tables import bundles
from fleet_protocol.errors import ManifestError
from fleet_protocol.layouts import layout_key
from fleet_protocol.manifest import BundleManifest, canonical_json, parse_manifest

__all__ = ["VerifiedBundle", "add_bundle", "key_id", "load_public_key", "store_bundle",
           "verify_bundle"]

MEMBERS = ("manifest.json", "manifest.sig", "model.onnx")
MAX_BUNDLE_BYTES = 512 * 1024 * 1024
_LIMITS = {"manifest.json": 16 * 1024 * 1024, "manifest.sig": 64,
           "model.onnx": 400 * 1024 * 1024}

KeySource = Ed25519PublicKey | str | Path


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle file whose signature, manifest and model hash checked out."""

    path: Path
    manifest: BundleManifest
    sha256: str  # of the whole file
    signer_key_id: str


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex digits of sha256(raw public key), as ``BundleManifest.signer_key_id``."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """A PEM Ed25519 public key; SignatureError naming the file when it is anything else."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as err:
        raise SignatureError(f"cannot read public key {p}: {err.strerror}") from err
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as err:
        raise SignatureError(f"public key {p} is not a PEM public key (make one with "
                             "`edgefleet keys generate`)") from err
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"public key {p} is {type(key).__name__}, expected Ed25519")
    return key


def _members(path: Path) -> tuple[dict[str, bytes], str]:
    try:
        data = path.read_bytes() if path.stat().st_size <= MAX_BUNDLE_BYTES else None
    except OSError as err:
        raise BundleError(f"cannot read bundle {path}: {err.strerror}") from err
    if data is None:
        raise BundleError(f"bundle {path} is over the {MAX_BUNDLE_BYTES} bytes limit")
    digest = hashlib.sha256(data).hexdigest()
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            names = sorted(i.filename for i in infos)
            if names != sorted(MEMBERS):
                raise BundleError(f"bundle {path} holds {names}; expected exactly "
                                  f"{list(MEMBERS)}")
            for info in infos:
                if info.file_size > _LIMITS[info.filename]:
                    raise BundleError(f"bundle {path}: {info.filename} is {info.file_size} "
                                      f"bytes, over the {_LIMITS[info.filename]} limit")
            return {i.filename: zf.read(i) for i in infos}, digest
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as err:
        raise BundleError(f"bundle {path} is truncated or not a bundle ({err}); copy it "
                          "again") from err


def verify_bundle(path: str | Path, trusted_keys: Sequence[KeySource]) -> VerifiedBundle:
    """Open a bundle file and verify it against ``trusted_keys`` (keys or PEM paths)."""
    p = Path(path)
    keys = {key_id(k): k for k in (
        k if isinstance(k, Ed25519PublicKey) else load_public_key(k) for k in trusted_keys)}
    if not keys:
        raise SignatureError("no trusted public keys given; cannot verify any bundle (pass "
                             "the .pub file of the key that signs your bundles)")
    members, digest = _members(p)
    manifest_bytes, signature = members["manifest.json"], members["manifest.sig"]
    signer = None
    for kid, key in keys.items():
        try:
            key.verify(signature, manifest_bytes)
        except InvalidSignature:
            continue
        signer = kid
        break
    if signer is None:
        raise SignatureError(f"bundle {p}: signature does not verify against any of the "
                             f"{len(keys)} trusted key(s) {sorted(keys)}; it was tampered with "
                             "or signed by another key")
    try:
        manifest = parse_manifest(manifest_bytes)
    except ManifestError as err:
        raise BundleError(f"bundle {p}: {err}") from err
    if manifest.signer_key_id != signer:
        raise SignatureError(f"bundle {p}: manifest names signer {manifest.signer_key_id}, "
                             f"verified with {signer}")
    model_hash = hashlib.sha256(members["model.onnx"]).hexdigest()
    if model_hash != manifest.model.sha256:
        raise BundleError(f"bundle {p}: model.onnx sha256 {model_hash[:16]}... does not match "
                          f"the manifest's {manifest.model.sha256[:16]}...; the model was "
                          "tampered with")
    return VerifiedBundle(p, manifest, digest, signer)


def store_bundle(store: HubStore, manifest: BundleManifest, *, sha256: str) -> BundleRecord:
    """Keep a verified manifest; the same one again is a no-op, another one under the same
    name and version a BundleConflict."""
    text = canonical_json(manifest).decode("utf-8")
    record = BundleRecord(manifest.name, manifest.version, sha256, layout_key(manifest),
                          manifest.signer_key_id, store.clock())

    def write(conn: Connection) -> BundleRecord:
        row = conn.execute(sa.select(bundles).where(
            bundles.c.name == manifest.name, bundles.c.version == manifest.version)
            .with_for_update()).first()
        if row is None:
            conn.execute(bundles.insert().values(
                name=record.name, version=record.version, sha256=record.sha256,
                manifest=text, layout=record.layout, signer_key_id=record.signer_key_id,
                added_at=record.added_at))
            return record
        if row.manifest != text:
            raise BundleConflict(
                f"bundle {manifest.name} {manifest.version} is already on the hub with another "
                f"manifest (sha256 {row.sha256[:16]}...); a version is immutable: compile the "
                "new model under a new version")
        return BundleRecord(row.name, row.version, row.sha256, row.layout, row.signer_key_id,
                            row.added_at)

    return store.run_write(write, what=f"adding bundle {manifest.name} {manifest.version}")


def add_bundle(store: HubStore, path: str | Path,
               trusted_keys: Sequence[KeySource]) -> BundleRecord:
    """Verify a ``.edgebundle`` file against ``trusted_keys`` and add its manifest to the hub."""
    verified = verify_bundle(path, trusted_keys)
    return store_bundle(store, verified.manifest, sha256=verified.sha256)
