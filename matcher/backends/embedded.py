"""The `embedded` feature backend: the exported SavedModel run in-process by TensorFlow."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from integrity.manifest import IntegrityError, verify
from matcher.backends.base import PreparedModel
from matcher.backends.tf_messages import invalid_argument_error
from matcher.domain import BackboneInfo
from matcher.errors import ModelLoadError, NotReadyError
from matcher.layout import (
    INPUT_KEY,
    OUTPUT_KEY,
    SIGNATURE,
    read_model_info,
    resolve_version,
)

log = logging.getLogger(__name__)


class EmbeddedBackend:
    """Runs `<model_dir>/<version>/` (TF Serving's layout) with TensorFlow in this process.

    Without a pinned version it serves the newest one; hot reload follows new versions as they
    appear (export renames a finished version into place, so a half-written one is never seen).
    """

    kind = "embedded"

    def __init__(self, model_dir: Path, version: int | None = None) -> None:
        self._model_dir = model_dir
        self._version = version
        # One reference, replaced whole: a call reads it once and uses one model throughout.
        self._served: PreparedModel | None = None

    def load(self) -> None:
        self.activate(self.prepare())

    def candidate(self) -> Hashable | None:
        """The newest (or pinned) version folder and its file sizes, when not served yet."""
        try:
            version, path = resolve_version(self._model_dir, self._version)
        except FileNotFoundError:
            return None  # nothing to load: keep serving what is loaded
        if self._served is not None and self._served.info.version == version:
            return None
        # Sizes and times change while someone copies files in, so a copy in progress is
        # seen as unsettled (and, if refused, is tried again once it changes).
        stats = [p.stat() for p in sorted(path.rglob("*")) if p.is_file()]
        return (
            version,
            len(stats),
            sum(s.st_size for s in stats),
            max((s.st_mtime_ns for s in stats), default=0),
        )

    def prepare(self) -> PreparedModel:
        # Imported here: the tfserving backend must not pay for TensorFlow.
        import tensorflow as tf

        try:
            version, path = resolve_version(self._model_dir, self._version)
            verify_version(path)
            meta = read_model_info(path)
            signature = tf.saved_model.load(str(path)).signatures[SIGNATURE]
            _warm_up(tf, signature, meta.input_size)
            fingerprint = hashlib.sha256((path / "saved_model.pb").read_bytes()).hexdigest()[:16]
        except (OSError, KeyError, ValueError, tf.errors.OpError) as exc:
            raise ModelLoadError(f"cannot load SavedModel from {self._model_dir}: {exc}") from exc
        info = BackboneInfo(
            meta.backbone, version, meta.input_size, meta.feature_dim, fingerprint, meta.layer
        )
        log.info("loaded SavedModel %s version %d from %s", meta.backbone, version, path)
        return PreparedModel(info, signature)

    def activate(self, prepared: PreparedModel) -> None:
        self._served = prepared

    def check(self) -> None:
        """In-process: once loaded, the model is always there."""

    def close(self) -> None:
        """Nothing to release: the model goes with the process."""

    @property
    def ready(self) -> bool:
        return self._served is not None

    @property
    def info(self) -> BackboneInfo:
        if self._served is None:
            raise NotReadyError("the feature backend is not loaded yet")
        return self._served.info

    def features(self, images: Sequence[bytes]) -> np.ndarray:
        import tensorflow as tf

        served = self._served
        if served is None:
            raise NotReadyError("the feature backend is not loaded yet")
        try:
            outputs = served.handle(**{INPUT_KEY: tf.constant(list(images), dtype=tf.string)})
        except tf.errors.InvalidArgumentError as exc:
            # Usually the in-graph decoder refusing an image (corrupt or truncated data).
            raise invalid_argument_error(exc.message, f"SavedModel {served.info.name}") from exc
        return np.asarray(outputs[OUTPUT_KEY].numpy(), dtype=np.float32)


def verify_version(path: Path) -> None:
    """Refuse a version folder that does not match its manifest, before TensorFlow reads it."""
    try:
        verify(path, "savedmodel")
    except IntegrityError as exc:
        raise ModelLoadError(f"{exc}; refusing to load the SavedModel") from exc


def _warm_up(tf: Any, signature: Any, size: int) -> None:
    """Run one image through the graph so the first real request is not the slow one."""
    image = tf.io.encode_jpeg(tf.zeros([size, size, 3], tf.uint8)).numpy()
    signature(**{INPUT_KEY: tf.constant([image])})
