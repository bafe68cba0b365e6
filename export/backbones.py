"""The backbones that can be exported, each a Keras model from normalised pixels to features."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import tensorflow as tf

from export import efficientnet_lite, inception
from export.torch_pickle import load_legacy_state_dict


class ExportError(RuntimeError):
    """An export that cannot proceed; the message says what to do."""


@dataclass(frozen=True)
class Backbone:
    """A feature extractor ready to be exported."""

    name: str
    #: float32 [N, S, S, 3] normalised pixels -> float32 [N, feature_dim].
    model: keras.Model
    input_size: int
    feature_dim: int
    #: RGB 0..255 float -> what `model` expects.
    normalize: Callable[[tf.Tensor], tf.Tensor]
    #: Where the weights came from, recorded in the model's metadata.
    weights: str


def names() -> list[str]:
    """Every backbone name `build_backbone` accepts."""
    return [*efficientnet_lite.VARIANTS, inception.NAME]


def build_backbone(name: str, weights: str = "imagenet") -> Backbone:
    """Build a backbone by name.

    `weights`: "imagenet" (the default: genuine ImageNet weights), a path to a local weights
    file (Inception v3), or "random" (for tests only: features carry no meaning).
    """
    if name in efficientnet_lite.VARIANTS:
        return _efficientnet_lite(name, weights)
    if name == inception.NAME:
        return _inception(weights)
    raise ExportError(f"unknown backbone {name!r}; choose one of {', '.join(names())}")


def _efficientnet_lite(name: str, weights: str) -> Backbone:
    if weights not in ("imagenet", "random"):
        raise ExportError(f"{name} takes --weights imagenet or random, not {weights!r}")
    variant = efficientnet_lite.VARIANTS[name]
    state = None
    source = "random"
    if weights == "imagenet":
        try:
            path = efficientnet_lite.weights_path(name)
        except RuntimeError as exc:  # the weights package is not installed
            raise ExportError(str(exc)) from exc
        state = load_legacy_state_dict(path)
        source = f"imagenet:{path.name}"
    model = efficientnet_lite.build_efficientnet_lite(name, state)
    return Backbone(
        name,
        model,
        variant.input_size,
        efficientnet_lite.FEATURE_DIM,
        efficientnet_lite.normalize,
        source,
    )


def _inception(weights: str) -> Backbone:
    try:
        model = inception.build_inception_v3(weights)
    except inception.WeightsUnavailableError as exc:
        raise ExportError(str(exc)) from exc
    source = weights if weights in ("imagenet", "random") else f"file:{Path(weights).name}"
    return Backbone(
        inception.NAME,
        model,
        inception.INPUT_SIZE,
        inception.FEATURE_DIM,
        inception.normalize,
        source,
    )
