"""The small contract every feature backend fulfils."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from service.domain import BackboneInfo


class FeatureBackend(Protocol):
    """Turns a batch of encoded images into bottleneck features.

    `load` and `features` block (TensorFlow or network calls); callers on an event loop run
    them in a worker thread.
    """

    #: "embedded" or "tfserving".
    kind: str

    def load(self) -> None:
        """Load or connect to the model; raises ModelLoadError when that is impossible."""

    def check(self) -> None:
        """Raise BackendUnavailableError when the loaded model cannot be reached now."""

    @property
    def ready(self) -> bool:
        """Whether `features` can be called."""

    @property
    def info(self) -> BackboneInfo:
        """The backbone being served (valid once loaded)."""

    def features(self, images: Sequence[bytes]) -> np.ndarray:
        """Return float32 [len(images), feature_dim] for a batch of encoded images.

        Raises InvalidImageError when an image cannot be decoded, BackendUnavailableError
        when the model cannot be reached.
        """
