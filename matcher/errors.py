"""The one error hierarchy of the matcher core.

The core raises these; `service/servicer.py` maps each class to a gRPC status in one place, so
no code outside the transport knows about gRPC.
"""

from __future__ import annotations


class MatcherError(Exception):
    """Base of every error the matcher reports to a caller. The message is shown to them."""


class InvalidImageError(MatcherError):
    """The request's image is empty, not an image, unsupported, or outside the size limits."""


class InvalidRequestError(MatcherError):
    """A request argument other than the image is out of range."""


class NotFoundError(MatcherError):
    """The request names something the loaded models do not hold (a reference id)."""


class NotReadyError(MatcherError):
    """The models are not loaded yet (or failed to load)."""


class BackendUnavailableError(MatcherError):
    """The feature backend (TensorFlow Serving) cannot be reached or did not answer in time."""


class OverloadedError(MatcherError):
    """Too many requests are already waiting for the model."""


class ModelLoadError(MatcherError):
    """A model file is missing, does not verify, or does not fit the other model."""


class ConfigurationError(MatcherError):
    """The settings do not fit together, or a file they name cannot be used; refuses to start."""
