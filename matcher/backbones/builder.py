"""The backbones that can be exported, each a Keras model from normalised pixels to features."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import keras
import tensorflow as tf

from matcher.backbones import efficientnet_lite, inception
from matcher.backbones.precision import FP32, PRECISIONS, float32_layers, to_bfloat16
from matcher.backbones.torch_pickle import load_legacy_state_dict


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
    #: The layer whose output is average-pooled into the features.
    layer: str = ""
    #: Normalised pixels -> the feature maps of four stages, early to late (for pictures of
    #: how the network sees an image); None when the backbone cannot show them.
    stages: keras.Model | None = None
    #: A name for each stage, recorded in the metadata.
    stage_names: tuple[str, ...] = ()
    #: "fp32", or "bf16": the model computes in bfloat16 (see matcher.backbones.precision),
    #: recorded in the metadata. Its input and features are float32 either way.
    precision: str = FP32


def names() -> list[str]:
    """Every backbone name `build_backbone` accepts."""
    return [*efficientnet_lite.VARIANTS, inception.NAME]


def build_backbone(
    name: str,
    weights: str = "imagenet",
    layer: str | None = None,
    precision: str = "fp32",
    seed: int | None = None,
) -> Backbone:
    """Build a backbone by name.

    `weights`: "imagenet" (the default: genuine ImageNet weights), a path to a local weights
    file (Inception v3), or "random" (for tests only: features carry no meaning).
    `layer`: the layer whose output is average-pooled into the features; the last by default
    (e.g. Inception's `mixed7` gives mid-level 768-d features); several, comma-separated,
    concatenate their pooled outputs.
    `precision`: "fp32" (the default), or "bf16" to compute in bfloat16 on CPUs that have it,
    with float32 weights, input and features (see matcher.backbones.precision). The global
    Keras dtype policy is left as it was.
    `seed`: seeds Keras' random initialisation (and Python's and numpy's, which Keras seeds
    with it), so that two builds with random weights get the same weights, in two processes
    too; None leaves the random state alone.
    """
    if seed is not None:
        keras.utils.set_random_seed(seed)
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if name in efficientnet_lite.VARIANTS:
        backbone = _efficientnet_lite(name, weights, precision)
    elif name == inception.NAME:
        backbone = _inception(weights, precision)
    else:
        raise ExportError(f"unknown backbone {name!r}; choose one of {', '.join(names())}")
    return _pooled_at(backbone, layer) if layer else backbone


def _pooled_at(backbone: Backbone, layer: str) -> Backbone:
    """The same backbone with features average-pooled from `layer` instead of the last one.

    `layer` may name several layers, comma-separated: each is average-pooled and the pooled
    vectors are concatenated in that order (multi-layer features: on Fashion-MNIST, whose
    small grey photos are far from ImageNet, mid-level layers together beat the last one;
    docs/benchmarks.md, "Large catalogues"). `NAME:G` pools that layer over a G x G grid of
    cells instead of the whole map (G x G x channels features): where photos are aligned, as
    product shots on a plain background are, where a pattern sits is worth keeping."""
    parts = [part.strip() for part in layer.split(",") if part.strip()]
    names = [part.partition(":")[0] for part in parts]
    if not parts or len(set(names)) != len(names):
        raise ExportError(f"--layer {layer!r}: name one or more distinct layers, comma-separated")
    pooled = []
    for part, name in zip(parts, names, strict=True):
        grid_text = part.partition(":")[2] or "1"
        if not grid_text.isdigit() or int(grid_text) < 1:
            raise ExportError(f"--layer {part!r}: the grid after ':' is a whole number >= 1")
        try:
            output = backbone.model.get_layer(name).output
        except ValueError:
            raise ExportError(
                f"{backbone.name} has no layer {name!r}; e.g. "
                f"{', '.join(_layer_examples(backbone))}"
            ) from None
        if len(output.shape) != 4:
            raise ExportError(f"layer {name!r} does not output feature maps [N, H, W, C]")
        pooled.append(_pool(output, name, int(grid_text)))
    features = pooled[0] if len(pooled) == 1 else keras.layers.Concatenate(name="layers")(pooled)
    label = "_".join(part.replace(":", "x") for part in parts)
    model = keras.Model(backbone.model.input, features, name=f"{backbone.name}_{label}")
    return replace(
        backbone, model=model, feature_dim=int(features.shape[-1]), layer=",".join(parts)
    )


def _pool(maps: keras.KerasTensor, name: str, grid: int) -> keras.KerasTensor:
    """[N, H, W, C] maps -> [N, grid x grid x C]: the mean of each cell of a grid x grid split
    (the whole map for 1). Cells are H // grid rows high (the last rows of an odd map are left
    out, as a strided pool leaves them)."""
    if grid == 1:
        return keras.layers.GlobalAveragePooling2D(name=f"{name}_avg_pool")(maps)
    height, width = int(maps.shape[1]), int(maps.shape[2])
    if height < grid or width < grid:
        raise ExportError(f"layer {name!r} is {height}x{width}: too small for a {grid}x{grid} grid")
    cell = (height // grid, width // grid)
    cells = keras.layers.AveragePooling2D(cell, strides=cell, name=f"{name}_grid{grid}")(maps)
    return keras.layers.Flatten(name=f"{name}_grid{grid}_flat")(cells)


def _layer_examples(backbone: Backbone) -> list[str]:
    """Layer names worth pooling: Inception's mixed blocks, EfficientNet-Lite's block outputs."""
    prefixes = ("mixed", "stem_activation", "head_activation")
    names = [layer.name for layer in backbone.model.layers]
    chosen = [n for n in names if n.startswith(prefixes) or n.endswith(("_project_bn", "_add"))]
    return [*chosen[:3], "...", *chosen[-3:]] if len(chosen) > 6 else chosen


def _in_precision(name: str, model: keras.Model, precision: str) -> keras.Model:
    """`model` itself for fp32; for bf16 a copy that computes in bfloat16 (same layer names)."""
    if precision == FP32:
        return model
    return to_bfloat16(model, float32_layers(name, model))


def _stages(model: keras.Model, layers: list[keras.layers.Layer]) -> keras.Model:
    return keras.Model(model.input, [layer.output for layer in layers], name="stages")


def _efficientnet_lite(name: str, weights: str, precision: str) -> Backbone:
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
    model = _in_precision(name, efficientnet_lite.build_efficientnet_lite(name, state), precision)
    pyramid = efficientnet_lite.stage_output_layers(name)
    # Early to late, like the original Inception pictures: strides 2, 4, 8 and 16.
    stage_layers = ["stem_activation", pyramid[1], pyramid[2], pyramid[4]]
    stages = _stages(model, [model.get_layer(name) for name in stage_layers])
    return Backbone(
        name,
        model,
        variant.input_size,
        efficientnet_lite.FEATURE_DIM,
        efficientnet_lite.normalize,
        source,
        layer="head_activation",
        stages=stages,
        stage_names=tuple(stage_layers),
        precision=precision,
    )


def _inception(weights: str, precision: str) -> Backbone:
    try:
        model = inception.build_inception_v3(weights)
    except inception.WeightsUnavailableError as exc:
        raise ExportError(str(exc)) from exc
    model = _in_precision(inception.NAME, model, precision)
    source = weights if weights in ("imagenet", "random") else f"file:{Path(weights).name}"
    return Backbone(
        inception.NAME,
        model,
        inception.INPUT_SIZE,
        inception.FEATURE_DIM,
        inception.normalize,
        source,
        layer="mixed10",
        stages=_stages(model, inception.stage_layers(model)),
        stage_names=inception.STAGE_NAMES,
        precision=precision,
    )
