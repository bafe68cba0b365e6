"""The `embedded` feature backend: the exported SavedModel run in-process by TensorFlow."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from export.layout import (
    INPUT_KEY,
    OUTPUT_KEY,
    SIGNATURE,
    read_model_info,
    resolve_version,
)
from service.backends.tf_messages import decoder_reason
from service.domain import BackboneInfo
from service.errors import InvalidImageError, ModelLoadError, NotReadyError

log = logging.getLogger(__name__)


class EmbeddedBackend:
    """Runs `<model_dir>/<version>/` (TF Serving's layout) with TensorFlow in this process."""

    kind = "embedded"

    def __init__(self, model_dir: Path, version: int | None = None) -> None:
        self._model_dir = model_dir
        self._version = version
        self._signature = None
        self._info: BackboneInfo | None = None

    def load(self) -> None:
        # Imported here: the tfserving backend must not pay for TensorFlow.
        import tensorflow as tf

        try:
            version, path = resolve_version(self._model_dir, self._version)
            meta = read_model_info(path)
            self._signature = tf.saved_model.load(str(path)).signatures[SIGNATURE]
        except (OSError, KeyError, ValueError) as exc:
            raise ModelLoadError(f"cannot load SavedModel from {self._model_dir}: {exc}") from exc
        self._warm_up(tf, meta.input_size)
        fingerprint = hashlib.sha256((path / "saved_model.pb").read_bytes()).hexdigest()[:16]
        self._info = BackboneInfo(
            meta.backbone, version, meta.input_size, meta.feature_dim, fingerprint, meta.layer
        )
        log.info("loaded SavedModel %s version %d from %s", meta.backbone, version, path)

    def _warm_up(self, tf: Any, size: int) -> None:
        """Run one image through the graph so the first real request is not the slow one."""
        image = tf.io.encode_jpeg(tf.zeros([size, size, 3], tf.uint8)).numpy()
        self._signature(**{INPUT_KEY: tf.constant([image])})

    def check(self) -> None:
        """In-process: once loaded, the model is always there."""

    @property
    def ready(self) -> bool:
        return self._signature is not None

    @property
    def info(self) -> BackboneInfo:
        if self._info is None:
            raise NotReadyError("the feature backend is not loaded yet")
        return self._info

    def features(self, images: Sequence[bytes]) -> np.ndarray:
        import tensorflow as tf

        if self._signature is None:
            raise NotReadyError("the feature backend is not loaded yet")
        try:
            outputs = self._signature(**{INPUT_KEY: tf.constant(list(images), dtype=tf.string)})
        except tf.errors.InvalidArgumentError as exc:
            # The in-graph decoder refused an image (corrupt or truncated data).
            raise InvalidImageError(
                f"image could not be decoded: {decoder_reason(exc.message)}"
            ) from exc
        return outputs[OUTPUT_KEY].numpy()
