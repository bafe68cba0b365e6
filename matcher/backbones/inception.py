"""Inception v3 as in the original design: the 2048-d average-pooled `pool_3` features."""

from __future__ import annotations

import warnings
from pathlib import Path

import keras
import tensorflow as tf

NAME = "inception_v3"
INPUT_SIZE = 299
FEATURE_DIM = 2048
#: The original post's four stages, named as in the frozen graph: 32 maps of 149x149, 32 of
#: 147x147, 288 of 35x35, 768 of 17x17.
STAGE_NAMES = ("conv", "conv_1", "mixed_2", "mixed_7")
WEIGHTS_FILE = "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
WEIGHTS_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/" + WEIGHTS_FILE
)


class WeightsUnavailableError(RuntimeError):
    """The requested weights cannot be had; the message says what to do instead."""


def normalize(images: tf.Tensor) -> tf.Tensor:
    """RGB 0..255 -> [-1, 1], as Keras' Inception v3 was trained."""
    return images / 127.5 - 1.0


def stage_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The Keras layers of STAGE_NAMES. Keras numbers its unnamed activations per process, so
    the first two convolutions' activations are found by position, not by name."""
    activations = [layer for layer in model.layers if isinstance(layer, keras.layers.Activation)]
    return [activations[0], activations[1], model.get_layer("mixed2"), model.get_layer("mixed7")]


def build_inception_v3(weights: str) -> keras.Model:
    """Inception v3 without its classifier, global-average-pooled to 2048 features.

    `weights`: "imagenet" (Keras downloads the file once, into ~/.keras/models), a local
    weights file (the `_notop.h5` Keras publishes), or "random" (tests only).
    """
    if weights == "random":
        source: str | None = None
    elif weights == "imagenet":
        source = "imagenet"
    else:
        path = Path(weights)
        if not path.is_file():
            raise WeightsUnavailableError(f"weights file {path} does not exist")
        source = str(path)
    try:
        with warnings.catch_warnings():
            # A mismatched file makes Keras warn once per layer; the error below says it all.
            warnings.simplefilter("ignore")
            return keras.applications.InceptionV3(
                include_top=False,
                weights=source,
                input_shape=(INPUT_SIZE, INPUT_SIZE, 3),
                pooling="avg",
            )
    except Exception as exc:  # Keras raises a bare Exception when the download fails.
        if source != "imagenet":
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise WeightsUnavailableError(
                f"cannot load weights from {weights}: {first_line} "
                "(is it an Inception v3 no-top weights file?)"
            ) from exc
        raise WeightsUnavailableError(
            "cannot download the Inception v3 ImageNet weights (offline?); download "
            f"{WEIGHTS_URL} on a machine that is online and pass --weights PATH_TO/{WEIGHTS_FILE}"
        ) from exc
