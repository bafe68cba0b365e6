"""The `embedded` feature backend: the exported model run in-process, by one of two engines.

- `openvino` (`matcher.backends.openvino_engine`): the OpenVINO model export writes inside
  each version, with the graph's preprocessing done in Python; TensorFlow is never imported.
- `tensorflow` (`matcher.backends.tensorflow_engine`): the SavedModel's `serving_default`,
  the graph TF Serving runs.

`auto` (the default) takes openvino where the version has its model (every version exported
since the engine exists), tensorflow otherwise, so older versions still load. Both give the
same features to a cosine of 0.999 or better (`tests/test_engines.py`): a classifier trained
with one serves with the other, and with TF Serving.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from integrity.manifest import IntegrityError, verify
from matcher.backends import openvino_engine, tensorflow_engine
from matcher.backends.base import PreparedModel
from matcher.domain import BackboneInfo
from matcher.errors import ModelLoadError, NotReadyError
from matcher.layout import read_model_info, resolve_version

log = logging.getLogger(__name__)

#: `--engine`.
ENGINES = ("auto", openvino_engine.ENGINE, tensorflow_engine.ENGINE)


class Runner(Protocol):
    """A loaded model that turns encoded images into features (one engine's)."""

    engine: str
    precision: str

    def features(self, images: Sequence[bytes]) -> np.ndarray: ...


class EmbeddedBackend:
    """Runs `<model_dir>/<version>/` (TF Serving's layout) in this process.

    Without a pinned version it serves the newest one; hot reload follows new versions as they
    appear (export renames a finished version into place, so a half-written one is never seen).
    """

    kind = "embedded"

    def __init__(
        self,
        model_dir: Path,
        version: int | None = None,
        engine: str = "auto",
        precision: str = "fp32",
        threads: int | None = None,
    ) -> None:
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
        self._model_dir = model_dir
        self._version = version
        self._engine = engine
        #: The openvino engine's (fp32, bf16 or auto); a SavedModel's is fixed at export.
        self._precision = precision
        #: The openvino engine's inference threads (None: one per core it may use).
        self._threads = threads
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
        try:
            version, path = resolve_version(self._model_dir, self._version)
            verify_version(path)
            meta = read_model_info(path)
            runner = self._runner(path, meta.input_size, meta.precision, meta.backbone)
            fingerprint = hashlib.sha256((path / "saved_model.pb").read_bytes()).hexdigest()[:16]
        except (OSError, KeyError, ValueError) as exc:
            raise ModelLoadError(f"cannot load the model from {self._model_dir}: {exc}") from exc
        info = BackboneInfo(
            meta.backbone,
            version,
            meta.input_size,
            meta.feature_dim,
            fingerprint,
            meta.layer,
            runner.engine,
            runner.precision,
        )
        log.info(
            "loaded %s version %d from %s with %s (%s)",
            meta.backbone,
            version,
            path,
            runner.engine,
            runner.precision,
        )
        return PreparedModel(info, runner)

    def _runner(self, path: Path, input_size: int, precision: str, name: str) -> Runner:
        engine = self._engine
        if engine == "auto":
            engine = (
                openvino_engine.ENGINE
                if openvino_engine.has_model(path)
                else tensorflow_engine.ENGINE
            )
        if engine == openvino_engine.ENGINE:
            # Its precision is chosen here; a SavedModel's (`precision`) is TensorFlow's, and a
            # bf16 export has no OpenVINO model (`export.openvino_model`).
            return openvino_engine.OpenVinoRunner(path, input_size, self._precision, self._threads)
        import tensorflow as tf

        try:
            return tensorflow_engine.TensorFlowRunner(path, input_size, precision, name)
        except tf.errors.OpError as exc:
            raise ModelLoadError(f"TensorFlow cannot load {path}: {exc}") from exc

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

    @property
    def runner(self) -> Runner:
        """The served engine's runner (benchmarks time its parts)."""
        served = self._served
        if served is None:
            raise NotReadyError("the feature backend is not loaded yet")
        runner: Runner = served.handle
        return runner

    def features(self, images: Sequence[bytes]) -> np.ndarray:
        return self.runner.features(images)


def verify_version(path: Path) -> None:
    """Refuse a version folder that does not match its manifest, before TensorFlow reads it."""
    try:
        verify(path, "savedmodel")
    except IntegrityError as exc:
        raise ModelLoadError(f"{exc}; refusing to load the SavedModel") from exc
