"""Test certificates made on the spot with `cryptography`: a CA, a server and a client.

Nothing here is committed or downloaded: each test session signs its own short-lived set, so no
key ever leaves the temporary folder and none can expire in the repository.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_FOR = datetime.timedelta(days=2)


@dataclass(frozen=True)
class CertFiles:
    """PEM files in one folder: the CA certificate, and a certificate and key for each party."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a second CA that signed nothing the server trusts
    other_client_cert: Path  # a client certificate from that CA
    other_client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key() -> ec.EllipticCurvePrivateKey:
    # P-256 keys sign in microseconds; RSA key generation would dominate the fixture.
    return ec.generate_private_key(ec.SECP256R1())


def _builder(subject: str, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALID_FOR)
    )


def _ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    cert = (
        _builder(common_name, _name(common_name), key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    common_name: str,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    usage: x509.ObjectIdentifier,
    names: list[x509.GeneralName] | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert, ca_key = ca
    key = _key()
    builder = (
        _builder(common_name, ca_cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


def make_certs(folder: Path) -> CertFiles:
    """Write a CA, a server certificate for localhost and 127.0.0.1, and client certificates
    (one from the CA, one from an unrelated CA) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = _ca("Matcher test CA")
    other_ca = _ca("Some other CA")
    server = _leaf(
        "localhost",
        ca,
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client = _leaf("matcher-test-client", ca, ExtendedKeyUsageOID.CLIENT_AUTH)
    other_client = _leaf("stranger", other_ca, ExtendedKeyUsageOID.CLIENT_AUTH)
    return CertFiles(
        ca=_write_cert(folder / "ca.pem", ca[0]),
        server_cert=_write_cert(folder / "server.pem", server[0]),
        server_key=_write_key(folder / "server.key", server[1]),
        client_cert=_write_cert(folder / "client.pem", client[0]),
        client_key=_write_key(folder / "client.key", client[1]),
        other_ca=_write_cert(folder / "other-ca.pem", other_ca[0]),
        other_client_cert=_write_cert(folder / "stranger.pem", other_client[0]),
        other_client_key=_write_key(folder / "stranger.key", other_client[1]),
    )
