"""Bundles on the hub: verified against trusted keys, immutable per version."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path
from typing import Any

import pytest

from cloud_hub.bundles import add_bundle, load_public_key, verify_bundle
from cloud_hub.errors import BundleConflict, BundleError, BundleNotFound, SignatureError
from cloud_hub.store import HubStore
from fleet_protocol.layouts import layout_key


def test_a_signed_bundle_is_added_once(sqlite_store: HubStore, small_bundle: Any,
                                       keypair: Any) -> None:
    """Verified with the trusted key; adding it again is a no-op; its manifest comes back."""
    record = add_bundle(sqlite_store, small_bundle.path, [keypair.public_path])
    assert (record.name, record.version, record.layout) == (
        "small", "1.2.0", layout_key(small_bundle.manifest))
    assert record.signer_key_id == small_bundle.manifest.signer_key_id
    again = sqlite_store.add_bundle(small_bundle.path,
                                    trusted_keys=[load_public_key(keypair.public_path)])
    assert again == record
    assert sqlite_store.bundle("small", "1.2.0") == small_bundle.manifest
    assert [b.version for b in sqlite_store.bundles()] == ["1.2.0"]


def test_a_bundle_signed_by_another_key_is_refused(sqlite_store: HubStore, small_bundle: Any,
                                                   other_keypair: Any) -> None:
    with pytest.raises(SignatureError, match="does not verify against any of the 1"):
        add_bundle(sqlite_store, small_bundle.path, [other_keypair.public_path])
    with pytest.raises(SignatureError, match="no trusted public keys"):
        add_bundle(sqlite_store, small_bundle.path, [])
    assert sqlite_store.bundles() == []


def test_a_tampered_model_or_a_broken_file_is_refused(tmp_path: Path, small_bundle: Any,
                                                      keypair: Any) -> None:
    tampered = tmp_path / "tampered.edgebundle"
    with zipfile.ZipFile(small_bundle.path) as src, zipfile.ZipFile(tampered, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info.filename, data + b"x" if info.filename == "model.onnx" else data)
    with pytest.raises(BundleError, match=r"model.onnx sha256 .* does not match"):
        verify_bundle(tampered, [keypair.public_path])
    truncated = tmp_path / "truncated.edgebundle"
    truncated.write_bytes(small_bundle.path.read_bytes()[:100])
    with pytest.raises(BundleError, match="truncated or not a bundle"):
        verify_bundle(truncated, [keypair.public_path])


def test_another_manifest_under_the_same_version_conflicts(
        sqlite_store: HubStore, small_bundle: Any, compile_fast: Any, keypair: Any,
        tmp_path: Path) -> None:
    from sklearn.linear_model import LogisticRegression

    from tests.conftest import make_classification_data

    X, y = make_classification_data(n=300, d=6, seed=5)
    other = compile_fast(LogisticRegression().fit(X, y), X, y, name="small", version="1.2.0",
                         out=tmp_path)
    add_bundle(sqlite_store, small_bundle.path, [keypair.public_path])
    copy = tmp_path / "copy.edgebundle"
    shutil.copy(other.path, copy)
    with pytest.raises(BundleConflict, match=r"small 1\.2\.0 is already on the hub"):
        add_bundle(sqlite_store, copy, [keypair.public_path])


def test_an_unknown_bundle_names_what_is_known(sqlite_store: HubStore,
                                               small_bundle: Any) -> None:
    sqlite_store.add_bundle(small_bundle.manifest)
    with pytest.raises(BundleNotFound, match=r"small 9.9.9 was never added.*known: small 1.2.0"):
        sqlite_store.bundle("small", "9.9.9")
