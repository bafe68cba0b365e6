"""The small contracts of feature backends: an extractor, and a backend the server serves from.

Two protocols, so that each implementation claims only what it does: `train.hog.HogBackend` is
an extractor; the embedded and TF Serving backends are full backends (mypy checks both).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from matcher.domain import BackboneInfo


@dataclass(frozen=True)
class PreparedModel:
    """A backbone made ready to serve beside the one serving now (hot reload)."""

    info: BackboneInfo
    #: What the backend serves it with (a loaded signature; nothing for TF Serving).
    handle: Any = None


class FeatureExtractor(Protocol):
    """Turns a batch of encoded images into feature vectors: what extraction and training use.

    `load` and `features` block (TensorFlow or network calls); callers on an event loop run
    them in a worker thread.
    """

    #: "embedded", "tfserving", or another extractor's name ("hog").
    kind: str

    def load(self) -> None:
        """Load or connect to the model; raises ModelLoadError when that is impossible."""

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


class FeatureBackend(FeatureExtractor, Protocol):
    """An extractor the server can serve from: health checks, hot reload, a clean stop."""

    def check(self) -> None:
        """Raise BackendUnavailableError when the loaded model cannot be reached now."""

    def candidate(self) -> Hashable | None:
        """A key naming the model that should be served now, or None when it is served already.

        Cheap (a directory listing or one status call). The key changes whenever what would be
        loaded changes, so a watcher can wait for it to settle and remember refused ones.
        """

    def prepare(self) -> PreparedModel:
        """Load the model `candidate` names, beside the served one (blocking, slow).

        Raises ModelLoadError when it cannot be served; the served model is untouched.
        """

    def activate(self, prepared: PreparedModel) -> None:
        """Serve `prepared` from the next `features` call on (cheap)."""

    def close(self) -> None:
        """Release connections and threads (at server stop); the backend is not used again."""
