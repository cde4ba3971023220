"""Throwaway TLS certificates for tests that run a TLS broker (the agent's sync, the hub's
MQTT client)."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path


def make_certs(folder: Path, client_cn: str = "pi-0001") -> dict[str, Path]:
    """A CA, a server certificate for localhost and 127.0.0.1, and a client certificate (CN
    ``client_cn``): PEM files ``ca``, ``server``, ``server_key``, ``client``, ``client_key``
    (and ``ca_key``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    out: dict[str, Path] = {}

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(label: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        out[label] = folder / f"{label}.pem"
        out[label].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{label}_key"] = folder / f"{label}.key"
        out[f"{label}_key"].write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("test ca")).issuer_name(name("test ca"))
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    write("ca", ca, ca_key)
    for label, cn, san in (("server", "localhost", True), ("client", client_cn, False)):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
                   .public_key(key.public_key()).serial_number(2 if san else 3)
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       ca_key.public_key()), critical=False))
        if san:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(
                    ipaddress.ip_address("127.0.0.1"))]), critical=False)
        write(label, builder.sign(ca_key, hashes.SHA256()), key)
    return out
