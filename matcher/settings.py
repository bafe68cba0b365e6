"""Settings of the matching library: which feature backend, which classifier, what limits.

Every setting is a field with a default and a description, and an environment variable
(`MATCHER_MODEL_DIR`); a program with flags (the server, `train`) turns the same fields into
flags, so each default is written once, here. Built once in a program's `main()` and passed to
constructors; nothing is read at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from matcher.views import DEFAULT_VIEWS, ViewMode


class BackendSettings(BaseSettings):
    """Where the backbone's features come from (`matcher.factory.make_backend`)."""

    model_config = SettingsConfigDict(env_prefix="MATCHER_", extra="ignore")

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
    engine: Literal["auto", "openvino", "tensorflow"] = Field(
        "auto",
        description="Embedded backend: what runs the network. `openvino` runs the OpenVINO "
        "model export writes into each version (2-3x TensorFlow's speed on a CPU; TensorFlow "
        "is not imported); `tensorflow` runs the SavedModel's serving_default; `auto` takes "
        "openvino where the version has its model, tensorflow otherwise.",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "fp32",
        description="openvino engine: compute in float32, or bfloat16 (only on a CPU with "
        "AVX512_BF16 or AMX; refused elsewhere; it misses the 0.999 accuracy guard, so it "
        "runs only by name); `auto` is float32. Features are float32 either way.",
    )
    engine_threads: int | None = Field(
        None,
        ge=1,
        description="openvino engine: inference threads (one per core when unset); "
        "`train --ray` sets it to each model actor's CPUs.",
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
        "matcher.backends.tfs_api FILE`; unset reads them from the installed "
        "tensorflow-serving-api files (without importing TensorFlow).",
    )


class CoreSettings(BackendSettings):
    """The matcher core: the backend, the classifier, image limits, batching, hot reload."""

    classifier: Path = Field(
        Path("models/classifiers/efficientnet_lite0"),
        description="The trained classifier: a training run folder (what `make train` writes, "
        "any matcher), or an svm's .skops (loads without running code) or .joblib (a pickle: "
        "runs code when loaded) file. Verified before it is opened.",
    )
    classifier_sha256: str | None = Field(
        None,
        description="Expected sha256 of the classifier file, checked instead of the "
        "manifest.json beside it: pins trust outside the folder. A mismatch refuses the file.",
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
    decode_pixel_budget: int = Field(
        100_000_000,
        gt=0,
        description="Pixels (width x height, by the header; a large JPEG at its reduced DCT "
        "scale) of the images being decoded and matched at once; more wait in arrival order, "
        "and beyond --max-queued-requests waiting, RESOURCE_EXHAUSTED. Bounds decode memory at "
        "about 5 bytes a pixel (docs/benchmarks.md); at least --max-image-pixels.",
    )
    min_image_side: int = Field(
        16, gt=0, description="Smallest image width or height accepted, pixels."
    )
    no_match_threshold: float | None = Field(
        None,
        ge=-1.0,
        le=1.0,
        description="Similarity to the nearest catalogue view below which Match answers "
        "NO_MATCH, for every request that sets none; unset uses the threshold `train` "
        "calibrated (report.json's no_match).",
    )
    min_inliers: int | None = Field(
        None,
        ge=0,
        description="Keypoints of a photo that one rotation, scale and shift must map onto a "
        "catalogue photo to verify its label by geometry, for every request that sets none; "
        "unset uses the count `train` recorded (report.json's verification); 0 turns the "
        "geometric check off (the verdict then rests on similarity alone).",
    )
    views: ViewMode = Field(
        DEFAULT_VIEWS,
        description="How thoroughly Match looks at a photo when the request does not say: "
        "`whole` (the photo alone), `crops` (and a 3 x 3 grid of crops 0.4 of its sides: 10 model "
        "calls' worth of work) or `crops_rotations` (and the photo turned by quarter turns: "
        "13). Each has its own no-match threshold, calibrated at training.",
    )

    @model_validator(mode="after")
    def _budget_holds_the_largest_image(self) -> CoreSettings:
        if self.decode_pixel_budget < self.max_image_pixels:
            raise ValueError(
                f"decode_pixel_budget ({self.decode_pixel_budget}) must be at least "
                f"max_image_pixels ({self.max_image_pixels}), or the largest image allowed "
                "could never be decoded"
            )
        return self

    reload_interval_s: float = Field(
        5.0,
        ge=0,
        description="How often the classifier file and the SavedModel versions are checked "
        "for a new model to swap in; 0 turns hot reload off.",
    )
