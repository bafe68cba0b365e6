"""Plain data the matcher core works with; `service/converters.py` turns it into messages."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ModelIdentity:
    """Which models answered: the backbone, its SavedModel version, the classifier file."""

    backbone: str
    model_version: int
    classifier_sha256: str


@dataclass(frozen=True)
class BackboneInfo:
    """What the feature backend serves."""

    name: str
    version: int
    input_size: int
    feature_dim: int
    #: Identifies the exact model files where the backend can tell (embedded); else "".
    fingerprint: str = ""
    #: The layer pooled into the features, where the backend can tell; else "".
    layer: str = ""
    #: What runs the network in process ("openvino", "tensorflow"); "" for a remote backend.
    engine: str = ""
    #: What the network computes in ("fp32", "bf16"), where the backend can tell; else "".
    precision: str = ""

    @property
    def cache_key(self) -> str:
        """A name under which features of this model may be cached.

        Both engines give the same float32 features (to a cosine of 0.999), so they share
        entries; a network run in OpenVINO's bfloat16 differs more and gets its own."""
        key = f"{self.name}-v{self.version}"
        key = f"{key}-{self.fingerprint}" if self.fingerprint else key
        return (
            f"{key}-openvino-bf16" if (self.engine, self.precision) == ("openvino", "bf16") else key
        )


@dataclass(frozen=True)
class LabelScore:
    label: str
    score: float
    #: The label's most similar reference view ("" without an index) and its similarity.
    reference_id: str = ""
    similarity: float | None = None
    #: The view of the photo that came closest to that reference view (`matcher.views`).
    query_view: str = ""
    #: Keypoints of the photo that one similarity transform maps onto a view of this label
    #: (`matcher.geometry`); None when the label was not checked.
    inliers: int | None = None
    #: The reference view those inliers are on ("" when not checked).
    verified_reference_id: str = ""


@dataclass(frozen=True)
class Verdict:
    """Whether the photo shows a catalogue item: `score` (the nearest view's similarity)
    compared with `threshold`."""

    matched: bool
    score: float
    threshold: float
    #: Geometric verification (`matcher.geometry`): the first label's inliers and the count
    #: that verifies it; None when the answer was not checked. With them, the photo matches
    #: when it is verified or, failing that, when `score` reaches `threshold`.
    inliers: int | None = None
    min_inliers: int | None = None

    @property
    def verified(self) -> bool:
        return (
            self.inliers is not None
            and self.min_inliers is not None
            and (self.inliers >= self.min_inliers)
        )


@dataclass(frozen=True)
class MatchResult:
    matches: list[LabelScore]
    model: ModelIdentity
    #: None when the classifier came without an index (or no threshold is known).
    verdict: Verdict | None = None
    #: The views mode the photo was looked at with.
    views: str = "whole"


@dataclass(frozen=True)
class Reference:
    """One reference view: its thumbnail, for a person to compare a photo with."""

    reference_id: str
    label: str
    image: bytes
    media_type: str = "image/jpeg"


@dataclass(frozen=True)
class EmbedResult:
    features: np.ndarray
    model: ModelIdentity


@dataclass(frozen=True)
class ModelDescription:
    """Everything GetModelInfo reports."""

    labels: list[str]
    backbone: BackboneInfo
    classifier_type: str
    classifier_params: dict[str, str]
    holdout_accuracy: float | None
    model: ModelIdentity
    feature_backend: str
    reference_views: int = 0
    no_match_threshold: float | None = None
    default_views: str = "whole"
    #: The inliers that verify a label (`matcher.geometry`); None when nothing is checked.
    min_inliers: int | None = None
