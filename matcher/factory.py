"""The library's objects built from settings: the feature backend and the matcher core.

The one place where settings become a backend, so that the server and `train` extract features
through the same code with the same defaults.
"""

from __future__ import annotations

import functools

from matcher.admission import PixelBudget
from matcher.backends.base import FeatureBackend
from matcher.batcher import BatchingOptions
from matcher.classifier import Classifier
from matcher.core import MatcherCore
from matcher.images import ImageLimits
from matcher.settings import BackendSettings, CoreSettings


def make_backend(settings: BackendSettings) -> FeatureBackend:
    """The feature backend the settings ask for (not loaded yet)."""
    if settings.backend == "tfserving":
        # Imported only when chosen: each backend keeps the other's dependencies out.
        from matcher.backends.tfserving import TFServingBackend, TFServingOptions

        return TFServingBackend(
            TFServingOptions(
                target=settings.tfserving_target,
                model_name=settings.model_name,
                version=settings.model_version,
                version_label=settings.tfserving_version_label,
                signature=settings.tfserving_signature,
                timeout_s=settings.tfserving_timeout_s,
                max_attempts=settings.tfserving_max_attempts,
                descriptors=settings.tfserving_api_descriptors,
            )
        )
    from matcher.backends.embedded import EmbeddedBackend

    return EmbeddedBackend(
        settings.model_dir,
        settings.model_version,
        settings.engine,
        settings.precision,
        settings.engine_threads,
    )


def make_core(settings: CoreSettings, backend: FeatureBackend | None = None) -> MatcherCore:
    """The matcher core over the configured backend and classifier (not loaded yet)."""
    return MatcherCore(
        backend or make_backend(settings),
        functools.partial(Classifier.load, settings.classifier, settings.classifier_sha256),
        ImageLimits(
            min_side=settings.min_image_side,
            max_side=settings.max_image_side,
            max_pixels=settings.max_image_pixels,
        ),
        BatchingOptions(
            max_batch_size=settings.batch_max_size,
            timeout_s=settings.batch_timeout_s,
            max_queue=settings.max_queued_requests,
        ),
        settings.no_match_threshold,
        settings.views,
        PixelBudget(settings.decode_pixel_budget, settings.max_queued_requests),
        settings.min_inliers,
    )
