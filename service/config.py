"""Server settings: command-line flags, falling back to MATCHER_* environment variables.

Built once in `main()` and passed to constructors; nothing is read at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

MIB = 1 << 20


class Settings(BaseSettings):
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
    backend: Literal["embedded", "tfserving"] = Field(
        "embedded",
        description="Feature backend: `embedded` runs the SavedModel in this process; "
        "`tfserving` calls TensorFlow Serving's PredictionService.",
    )
    model_dir: Path = Field(
        Path("models/backbones/efficientnet_lite0"),
        description="Embedded backend: the model base path holding numbered SavedModel "
        "versions (TF Serving's layout).",
    )
    model_version: int | None = Field(
        None, description="SavedModel version to serve; the latest when unset."
    )
    model_name: str = Field(
        "efficientnet_lite0",
        description="tfserving backend: the model name in TF Serving.",
    )
    tfserving_target: str = Field(
        "localhost:8500", description="tfserving backend: TF Serving's gRPC address."
    )
    tfserving_timeout_s: float = Field(
        10.0, gt=0, description="tfserving backend: deadline of each call to TF Serving, seconds."
    )
    tfserving_version_label: str | None = Field(
        None,
        description="tfserving backend: serve the version with this label (TF Serving's "
        "version_labels) instead of --model-version or the latest.",
    )
    tfserving_signature: str = Field(
        "serving_default", description="tfserving backend: the SavedModel signature to call."
    )
    tfserving_max_attempts: int = Field(
        3,
        ge=1,
        description="tfserving backend: attempts per call when TF Serving answers UNAVAILABLE "
        "(gRPC retries with exponential backoff; other errors are not retried).",
    )
    tfserving_api_descriptors: Path | None = Field(
        None,
        description="tfserving backend: TF Serving's API descriptors written by `python -m "
        "service.backends.tfs_api FILE`; unset reads them from the installed "
        "tensorflow-serving-api files (without importing TensorFlow).",
    )
    batch_max_size: int = Field(
        32,
        ge=1,
        description="Most images in one model call: concurrent requests are batched "
        "(like TF Serving's max_batch_size); 1 turns batching off.",
    )
    batch_timeout_s: float = Field(
        0.0,
        ge=0,
        description="How long a model call may wait for more requests to fill its batch "
        "(like batch_timeout_micros); 0 runs at once when the model is idle.",
    )
    max_queued_requests: int = Field(
        64,
        ge=1,
        description="Requests allowed to wait for the model; beyond that, RESOURCE_EXHAUSTED. "
        "Keep it plus --batch-max-size below --max-concurrent-rpcs, so that health checks "
        "still find a free slot when the model is saturated.",
    )
    health_check_interval_s: float = Field(
        2.0,
        gt=0,
        description="How often the feature backend is checked; health follows it "
        "(NOT_SERVING while TF Serving is unreachable).",
    )
    classifier: Path = Field(
        Path("models/classifiers/efficientnet_lite0/classifier.skops"),
        description="The trained classifier: .skops (loads without running code) or .joblib (a "
        "pickle: runs code when loaded). Verified before it is opened.",
    )
    classifier_sha256: str | None = Field(
        None,
        description="Expected sha256 of the classifier file, checked instead of the "
        "manifest.json beside it: pins trust outside the folder. A mismatch refuses the file.",
    )
    max_receive_bytes: int = Field(
        16 * MIB, gt=0, description="Largest request message accepted, bytes."
    )
    max_image_side: int = Field(
        10_000,
        gt=0,
        description="Largest image width or height accepted, pixels (header check).",
    )
    max_image_pixels: int = Field(
        50_000_000,
        gt=0,
        description="Largest width x height accepted (header check): bounds decode memory.",
    )
    min_image_side: int = Field(
        16, gt=0, description="Smallest image width or height accepted, pixels."
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

    # --- metrics ---
    metrics_port: int = Field(
        9464,
        ge=-1,
        le=65535,
        description="Port of the Prometheus /metrics endpoint on --host; 0 picks a free one, "
        "-1 turns it off.",
    )

    # --- hot reload ---
    reload_interval_s: float = Field(
        5.0,
        ge=0,
        description="How often the classifier file and the SavedModel versions are checked "
        "for a new model to swap in; 0 turns hot reload off.",
    )


def load_settings(argv: list[str] | None = None) -> Settings:
    """Parse flags (and the environment) into Settings; exits with usage on bad flags."""
    return CliApp.run(Settings, cli_args=argv if argv is not None else None)
