"""Transport security: TLS (optionally mutual) on the port, bearer-token checks on calls.

Every file is read once, at start; a missing, unreadable or unusable one refuses the start with
a ConfigurationError naming the flag and the file (never a token).
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import grpc

from matcher.errors import ConfigurationError
from service import auth
from service.config import Settings
from service.grpc_types import ServerInterceptor

log = logging.getLogger(__name__)


def interceptors(settings: Settings) -> list[ServerInterceptor]:
    """Server interceptors that check credentials sent in call metadata."""
    if settings.auth_token_file is None:
        return []
    token = auth.read_token(settings.auth_token_file)
    exempt: list[str] = []
    if not settings.health_requires_auth:
        exempt += auth.HEALTH_METHODS
    if not settings.reflection_requires_auth:
        exempt += auth.REFLECTION_METHODS
    if settings.tls_cert is None:
        log.warning(
            "bearer tokens travel in plaintext: use --tls-cert/--tls-key unless a service "
            "mesh encrypts the traffic"
        )
    log.info("bearer token required%s", f" except for {', '.join(exempt)}" if exempt else "")
    return [auth.BearerTokenInterceptor(token, exempt)]


def add_port(server: grpc.aio.Server, address: str, settings: Settings) -> int:
    """Bind `address` with the transport security the settings ask for; the bound port."""
    credentials = server_credentials(settings)
    try:
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)
    except RuntimeError:
        # gRPC says only "Failed to bind"; its own log line above gives the cause.
        raise OSError(
            f"cannot listen on {address}: the port is in use or the host is not this machine's"
        ) from None


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings' files, checked now; None for plaintext."""
    _check_combination(settings)
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    cert = _read(settings.tls_cert, "--tls-cert")
    key = _read(settings.tls_key, "--tls-key")
    _check_pair(settings.tls_cert, settings.tls_key)
    client_ca = None
    if settings.tls_client_ca is not None:
        client_ca = _read(settings.tls_client_ca, "--tls-client-ca")
        _check_certificates(settings.tls_client_ca, "--tls-client-ca")
    log.info("TLS on%s", ", client certificates required" if client_ca else "")
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def http_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The HTTP port's TLS: the same certificate, key and client CA as the gRPC port's (checked
    by `server_credentials` first); None for plaintext."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=settings.tls_client_ca)
    return context


def _check_combination(settings: Settings) -> None:
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ConfigurationError("--tls-cert and --tls-key go together: set both or neither")
    if settings.tls_client_ca is not None and settings.tls_cert is None:
        raise ConfigurationError(
            "--tls-client-ca needs TLS: client certificates are checked only with "
            "--tls-cert and --tls-key"
        )


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None


def _check_pair(cert: Path, key: Path) -> None:
    """Parse the files with Python's OpenSSL: gRPC would only say that it cannot bind."""
    _check_certificates(cert, "--tls-cert")

    def refuse_encrypted() -> bytes:
        # Asked only for an encrypted key, which gRPC cannot use; also stops OpenSSL prompting.
        raise ConfigurationError(f"--tls-key {key} is encrypted; gRPC needs an unencrypted key")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=refuse_encrypted)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            problem = f"does not match the certificate in --tls-cert {cert}"
        else:
            problem = "is not a PEM private key"
        raise ConfigurationError(f"--tls-key {key} {problem}") from None


def _check_certificates(path: Path, flag: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError:
        raise ConfigurationError(f"{flag} {path} holds no PEM certificate") from None
