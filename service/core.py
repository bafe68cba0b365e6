"""The matcher core: image bytes -> features -> probabilities -> ranked labels.

It knows nothing of gRPC. Blocking TensorFlow and scikit-learn calls run in worker threads
(through the dynamic batcher: one thread call per batch, for both models), so the event loop
keeps serving while a model works.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

from service.backends.base import FeatureBackend
from service.batcher import BatchingOptions, DynamicBatcher
from service.classifier import Classifier
from service.domain import (
    EmbedResult,
    LabelScore,
    MatchResult,
    ModelDescription,
    ModelIdentity,
)
from service.errors import ModelLoadError, NotReadyError
from service.images import ImageLimits, inspect_image

log = logging.getLogger(__name__)


class MatcherCore:
    """Matches images against the catalogue once `load` has succeeded."""

    def __init__(
        self,
        backend: FeatureBackend,
        load_classifier: Callable[[], Classifier],
        limits: ImageLimits,
        batching: BatchingOptions | None = None,
    ) -> None:
        self._backend = backend
        self._load_classifier = load_classifier
        self._limits = limits
        self._classifier: Classifier | None = None
        # One worker-thread call per batch does both models: features and probabilities.
        self.batcher = DynamicBatcher(self._answer_batch, batching or BatchingOptions())

    def load(self) -> None:
        """Load both models and check that they fit together (blocking)."""
        self._backend.load()
        classifier = self._load_classifier()
        backbone = self._backend.info
        if classifier.info.feature_dim != backbone.feature_dim:
            raise ModelLoadError(
                f"classifier expects {classifier.info.feature_dim} features but backbone "
                f"{backbone.name} gives {backbone.feature_dim}; retrain on this backbone"
            )
        if classifier.info.backbone not in (None, backbone.name):
            raise ModelLoadError(
                f"classifier was trained on {classifier.info.backbone} features but the "
                f"backend serves {backbone.name}"
            )
        self._classifier = classifier

    def check_backend(self) -> None:
        """Raise BackendUnavailableError when the feature backend cannot be reached (blocking)."""
        self._backend.check()

    @property
    def ready(self) -> bool:
        return self._classifier is not None and self._backend.ready

    async def match(self, image: bytes, top_k: int) -> MatchResult:
        """Rank the labels for one image; top_k == 0 means all labels."""
        classifier = self._require_ready()
        _, probabilities = await self._answer(image)
        return MatchResult(_ranked(classifier.labels, probabilities, top_k), self.identity())

    async def embed(self, image: bytes) -> EmbedResult:
        """The bottleneck feature vector of one image."""
        self._require_ready()
        features = await self._features(image)
        return EmbedResult(features[0], self.identity())

    def identity(self) -> ModelIdentity:
        classifier = self._require_ready()
        backbone = self._backend.info
        return ModelIdentity(backbone.name, backbone.version, classifier.info.sha256)

    def describe(self) -> ModelDescription:
        classifier = self._require_ready()
        info = classifier.info
        return ModelDescription(
            labels=list(info.labels),
            backbone=self._backend.info,
            classifier_type=info.type_name,
            classifier_params=dict(info.params),
            holdout_accuracy=info.holdout_accuracy,
            model=self.identity(),
            feature_backend=self._backend.kind,
        )

    async def _features(self, image: bytes) -> np.ndarray:
        """float32 [1, D] for one image."""
        features, _ = await self._answer(image)
        return features[np.newaxis]

    async def _answer(self, image: bytes) -> tuple[np.ndarray, np.ndarray]:
        """(features, probabilities) of one image, computed in a batch with concurrent ones."""
        inspect_image(image, self._limits)
        return await self.batcher.features(image)

    def _answer_batch(self, images: Sequence[bytes]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Blocking: features of a batch, then the classifier's probabilities for all of it."""
        features = self._backend.features(images)
        classifier = self._require_ready()
        return list(zip(features, classifier.probabilities(features), strict=True))

    def _require_ready(self) -> Classifier:
        if self._classifier is None or not self._backend.ready:
            raise NotReadyError("models are not loaded yet; retry shortly")
        return self._classifier


def _ranked(labels: list[str], probabilities: np.ndarray, top_k: int) -> list[LabelScore]:
    # Stable sort so that equal scores keep the classifier's label order.
    order = np.argsort(-probabilities, kind="stable")
    if top_k:
        order = order[:top_k]
    return [LabelScore(labels[i], float(np.clip(probabilities[i], 0.0, 1.0))) for i in order]
