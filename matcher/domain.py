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

    @property
    def cache_key(self) -> str:
        """A name under which features of this model may be cached."""
        key = f"{self.name}-v{self.version}"
        return f"{key}-{self.fingerprint}" if self.fingerprint else key


@dataclass(frozen=True)
class LabelScore:
    label: str
    score: float


@dataclass(frozen=True)
class MatchResult:
    matches: list[LabelScore]
    model: ModelIdentity


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
