"""Server settings: command-line flags, falling back to MATCHER_* environment variables.

The core's settings (backend, classifier, limits, batching, reload) are `matcher.settings`'s;
this adds what the gRPC process alone needs: where it listens, TLS and auth, metrics, logs.
Built once in `main()` and passed to constructors; nothing is read at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import CliApp, SettingsConfigDict

from matcher.settings import CoreSettings

MIB = 1 << 20


class Settings(CoreSettings):
    """Every setting is a flag (`--model-dir`) and an environment variable (`MATCHER_MODEL_DIR`).

    A flag wins over the environment variable, which wins over the default.
    """

    model_config = SettingsConfigDict(
        env_prefix="MATCHER_",
        cli_prog_name="python -m service",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        extra="ignore",
    )

    host: str = Field("localhost", description="Interface to listen on; 0.0.0.0 for all.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    health_check_interval_s: float = Field(
        2.0,
        gt=0,
        description="How often the feature backend is checked; health follows it "
        "(NOT_SERVING while TF Serving is unreachable).",
    )
    max_receive_bytes: int = Field(
        16 * MIB, gt=0, description="Largest request message accepted, bytes."
    )
    grace_s: float = Field(
        5.0,
        ge=0,
        description="On SIGTERM, how long in-flight calls may take to finish.",
    )
    max_concurrent_rpcs: int = Field(
        128,
        ge=1,
        description="Calls handled at once; more get RESOURCE_EXHAUSTED. With "
        "--max-receive-bytes this bounds request memory.",
    )
    log_level: str = Field("INFO", description="Logging level.")
    log_format: Literal["text", "json"] = Field(
        "text",
        description="`json` writes one JSON object per line (for log collectors); both carry "
        "the request id.",
    )

    # --- TLS and authentication ---
    tls_cert: Path | None = Field(
        None, description="Server certificate chain (PEM); with --tls-key turns TLS on."
    )
    tls_key: Path | None = Field(None, description="Server private key (PEM).")
    tls_client_ca: Path | None = Field(
        None,
        description="CA bundle (PEM) for client certificates: when set, every client must "
        "present a certificate it signed (mutual TLS).",
    )
    auth_token_file: Path | None = Field(
        None,
        description="File holding the bearer token clients must send as `authorization: "
        "Bearer <token>`; unset turns token checks off.",
    )
    health_requires_auth: bool = Field(
        False,
        description="Whether health checks need the token (off: Kubernetes probes send none).",
    )
    reflection_requires_auth: bool = Field(
        True, description="Whether server reflection needs the token."
    )

    # --- HTTP/JSON API and the field-testing page ---
    http_port: int = Field(
        8080,
        ge=-1,
        le=65535,
        description="Port of the HTTP/JSON API (/v1/match, ...) and the field-testing page (/) on "
        "--host, with the same TLS, token and limits as gRPC; 0 picks a free one, -1 turns it "
        "off.",
    )
    feedback_dir: Path | None = Field(
        None,
        description="Where the page's confirmed or corrected photos are saved, as "
        "<dir>/<label>/<photo> for `matcher-train add <dir>/<label>`; unset turns feedback off.",
    )

    # --- metrics ---
    metrics_port: int = Field(
        9464,
        ge=-1,
        le=65535,
        description="Port of the Prometheus /metrics endpoint on --host; 0 picks a free one, "
        "-1 turns it off.",
    )


def load_settings(argv: list[str] | None = None) -> Settings:
    """Parse flags (and the environment) into Settings; exits with usage on bad flags."""
    return CliApp.run(Settings, cli_args=argv if argv is not None else None)
