"""Ed25519 signing keys: generate, load, sign.

The private key never leaves the build machine; devices hold only public keys. The private key
file is created with mode 0600 and written atomically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from compiler.errors import SigningError
from edge_agent.atomic import atomic_write_bytes
from edge_agent.bundle import key_id

__all__ = ["KeyPair", "generate_keys", "load_private_key"]


@dataclass(frozen=True)
class KeyPair:
    private_path: Path
    public_path: Path
    key_id: str


def generate_keys(directory: str | Path, name: str = "edgefleet", *,
                  overwrite: bool = False) -> KeyPair:
    """Write `<name>.key` (private, 0600) and `<name>.pub` (public) into `directory`."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    private_path = folder / f"{name}.key"
    public_path = folder / f"{name}.pub"
    for p in (private_path, public_path):
        if p.exists() and not overwrite:
            raise SigningError(f"{p} exists; refusing to overwrite a key (pass --force to replace)")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    atomic_write_bytes(private_path, private_pem, mode=0o600)
    atomic_write_bytes(public_path, public_pem, mode=0o644)
    return KeyPair(private_path, public_path, key_id(key.public_key()))


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """Load a PEM Ed25519 private key, naming the file and the problem when it fails."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as err:
        raise SigningError(f"cannot read signing key {p}: {err.strerror}") from err
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise SigningError(
            f"signing key {p} is not an unencrypted PEM private key "
            "(make one with `edgefleet keys generate`)"
        ) from err
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"signing key {p} is {type(key).__name__}, expected Ed25519")
    return key
