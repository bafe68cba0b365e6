"""TensorFlow Serving's on-disk layout, `<base>/<model_name>/<version>/`, and our metadata in it.

Kept free of TensorFlow so that the serving process can read it cheaply.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

SIGNATURE = "serving_default"
#: A second signature: encoded images -> the feature maps of four stages (`stage1`..`stage4`).
FEATURE_MAPS_SIGNATURE = "feature_maps"
INPUT_KEY = "images"
OUTPUT_KEY = "features"
#: TF Serving replays these requests when it loads a version, so the first real call is fast.
WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"
#: Our description of the exported backbone; TF Serving ignores it.
MODEL_INFO_FILE = "assets.extra/matcher_model.json"


@dataclass(frozen=True)
class ExportedModelInfo:
    """What `export` records about a SavedModel version."""

    backbone: str
    input_size: int
    feature_dim: int
    weights: str
    #: The layer average-pooled into the features.
    layer: str = ""
    #: Names of the stages the `feature_maps` signature returns, early to late.
    stages: list[str] = field(default_factory=list)
    #: "fp32", or "bf16" when the backbone computes in bfloat16 (its features are float32).
    precision: str = "fp32"
    signature: str = SIGNATURE
    input_key: str = INPUT_KEY
    output_key: str = OUTPUT_KEY

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


def versions(model_dir: Path) -> list[int]:
    """The numbered versions under a model base path, ascending (TF Serving ignores the rest)."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and p.is_dir())


def resolve_version(model_dir: Path, version: int | None) -> tuple[int, Path]:
    """The version to load (the latest when None) and its folder; FileNotFoundError if absent."""
    available = versions(model_dir)
    if not available:
        raise FileNotFoundError(f"no SavedModel versions under {model_dir}; run `make export`")
    chosen = available[-1] if version is None else version
    if chosen not in available:
        raise FileNotFoundError(f"version {chosen} not under {model_dir}; have {available}")
    return chosen, model_dir / str(chosen)


def read_model_info(version_dir: Path) -> ExportedModelInfo:
    """Read the metadata `export` wrote beside a SavedModel."""
    data = json.loads((version_dir / MODEL_INFO_FILE).read_text())
    return ExportedModelInfo(**data)
