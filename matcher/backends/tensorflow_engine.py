"""The `tensorflow` engine: the SavedModel's `serving_default` run in-process by TensorFlow.

The same graph TF Serving runs, decoding and resizing included; the reference the fast engine
is measured against (`tests/test_engines.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from matcher.backends.tf_messages import invalid_argument_error
from matcher.layout import INPUT_KEY, OUTPUT_KEY, SIGNATURE

ENGINE = "tensorflow"


class TensorFlowRunner:
    """One loaded `serving_default` signature, warmed up."""

    engine = ENGINE

    def __init__(self, version_dir: Path, input_size: int, precision: str, name: str) -> None:
        import tensorflow as tf  # only this engine (and export, train's plots) pays for it

        self._tf = tf
        self._name = name
        #: Baked into the SavedModel at export (`matcher.backbones.precision`).
        self.precision = precision
        self._signature = tf.saved_model.load(str(version_dir)).signatures[SIGNATURE]
        # One image through the graph, so the first real request is not the slow one.
        image = tf.io.encode_jpeg(tf.zeros([input_size, input_size, 3], tf.uint8)).numpy()
        self.features([image])

    def features(self, images: Sequence[bytes]) -> np.ndarray:
        tf = self._tf
        try:
            outputs = self._signature(**{INPUT_KEY: tf.constant(list(images), dtype=tf.string)})
        except tf.errors.InvalidArgumentError as exc:
            # Usually the in-graph decoder refusing an image (corrupt or truncated data).
            raise invalid_argument_error(exc.message, f"SavedModel {self._name}") from exc
        return np.asarray(outputs[OUTPUT_KEY].numpy(), dtype=np.float32)
