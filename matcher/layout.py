"""Where every artefact lives, and the name of every file in it: one home for each.

Two folders: a backbone in TensorFlow Serving's layout, `<base>/<model_name>/<version>/` with
our metadata in it (written by `export`); and a classifier run folder (written by `train`): the
classifier, its report, the features it was trained on and the manifest over them all. Kept free
of TensorFlow so that the serving process can read it cheaply.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from integrity.manifest import MANIFEST_FILE

SIGNATURE = "serving_default"
#: A second signature: encoded images -> the feature maps of four stages (`stage1`..`stage4`).
FEATURE_MAPS_SIGNATURE = "feature_maps"
INPUT_KEY = "images"
OUTPUT_KEY = "features"
#: TF Serving replays these requests when it loads a version, so the first real call is fast.
WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"
#: Our description of the exported backbone; TF Serving ignores it.
MODEL_INFO_FILE = "assets.extra/matcher_model.json"
#: The OpenVINO model of the same network, written by export beside the SavedModel (TF Serving
#: ignores it): float32 pixels in, features out (`export.openvino_model`).
OPENVINO_MODEL_FILE = "openvino/model.xml"
#: Its input's name: decoded, resized float32 pixels [N, S, S, 3] in 0..255 (`matcher.pixels`).
OPENVINO_INPUT = "pixels"

# --- a classifier run folder ---
#: Classifier file per format. skops rebuilds the estimator without running code from the
#: file; joblib is a pickle (runs code when loaded), kept for files and tools that expect it.
CLASSIFIER_FILES = {"skops": "classifier.skops", "joblib": "classifier.joblib"}
DEFAULT_FORMAT = "skops"
#: The training report `train` writes beside the classifier.
REPORT_FILE = "report.json"
#: Every image's features, label, path and split, for the report's pictures.
FEATURES_FILE = "features.npz"
#: The catalogue index: every reference view's normalised features, label and id.
INDEX_FILE = "index.npz"
#: Every catalogue photo's local keypoints, for geometric verification (`matcher.geometry`).
KEYPOINTS_FILE = "keypoints.npz"
#: A small JPEG of every reference view, at `REFERENCES_DIR/<reference id>.jpg`.
REFERENCES_DIR = "references"
#: Longest side of those thumbnails, pixels.
THUMBNAIL_SIDE = 256
#: Folders of a training folder (DATA/<name>/) that are not labels start with this; the one
#: named OUTSIDE_DIR holds photos of things outside the catalogue, for the no-match threshold.
RESERVED_PREFIX = "_"
OUTSIDE_DIR = "_outside"
#: Files beside the classifier whose change means a new classifier is being put in place
#: (`integrity.manifest` names the manifest; it is re-exported here with the others).
COMPANION_FILES = (MANIFEST_FILE, REPORT_FILE, INDEX_FILE)

__all__ = [
    "CLASSIFIER_FILES",
    "COMPANION_FILES",
    "DEFAULT_FORMAT",
    "FEATURES_FILE",
    "FEATURE_MAPS_SIGNATURE",
    "INDEX_FILE",
    "INPUT_KEY",
    "KEYPOINTS_FILE",
    "MANIFEST_FILE",
    "MODEL_INFO_FILE",
    "OUTPUT_KEY",
    "OUTSIDE_DIR",
    "REFERENCES_DIR",
    "REPORT_FILE",
    "RESERVED_PREFIX",
    "SIGNATURE",
    "THUMBNAIL_SIDE",
    "WARMUP_FILE",
    "ExportedModelInfo",
    "read_model_info",
    "resolve_version",
    "thumbnail_path",
    "versions",
]


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


#: Joins a photo's id and a quarter turn in the id of a turned reference view
#: (`astronaut/0001.jpg@90`): the catalogue photo turned, indexed beside it.
TURN_MARK = "@"
_TURN_SUFFIXES = tuple(f"{TURN_MARK}{degrees}" for degrees in (90, 180, 270))


def photo_of(reference_id: str) -> str:
    """The catalogue photo a reference view was cut from: itself, or the photo it turns."""
    for suffix in _TURN_SUFFIXES:
        if reference_id.endswith(suffix):
            return reference_id.removesuffix(suffix)
    return reference_id


def thumbnail_path(run_dir: Path, reference_id: str) -> Path:
    """Where the thumbnail of a reference view lives in a run folder (a turned view shows
    the photo it turns, as the user photographed it)."""
    return run_dir / REFERENCES_DIR / f"{photo_of(reference_id)}.jpg"


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
