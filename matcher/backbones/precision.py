"""Run a backbone in bfloat16 on CPUs that have it (AVX512_BF16, AMX), float32 where it counts.

`python -m export --precision bf16` exports a SavedModel whose convolutions compute in bfloat16,
by Keras mixed precision baked into the graph: layers get the `mixed_bfloat16` dtype policy
(weights stay float32 variables, cast to bfloat16 inside the graph). The SavedModel therefore
runs in bfloat16 wherever it is loaded (the embedded backend, TF Serving), with no runtime
option. Decoding, resizing and normalising before the model, and the feature pooling at its
end, stay float32, so the signatures are unchanged: encoded images in, float32 features out.

Not every layer is converted. A layer whose dot products are short loses most to bfloat16's
8-bit mantissa: rounding the weights and inputs of a 27-term stem convolution or of a 9-term
depthwise convolution does not average out as in a 1000-term one, and whatever the first layers
lose, every later layer carries. Measured on EfficientNet-Lite0 with its ImageNet weights and 20
real photos, converting every layer gives features whose cosine similarity to float32's is only
0.9948 (min; mean 0.998). Per block, almost all of the loss is in the stem, block1a and block2a
(each alone up to 0.0023, 0.0032 and 0.0010 of 1 - cosine; every later block 1e-4 or less), so
each backbone names a float32 prefix (`FLOAT32_PREFIX`). With it, Lite0's minimum is 0.9997.

Layer types in bfloat16: ReLU6 is `tf.nn.relu6` and 6 is exact in bfloat16, so clipping is
unaffected. Keras' BatchNormalization casts a bfloat16 input to float32 and back around four
element-wise ops: correct, but two extra passes per layer that also keep TensorFlow from fusing
the normalisation into the convolution, which left Lite0 no faster in bf16 than in fp32. It is
replaced by `InferenceBatchNormalization` (FusedBatchNormV3, float32 statistics).

Grappler's `auto_mixed_precision_onednn_bfloat16` rewrite is the other way to bfloat16. It is an
option of the process that runs the graph, not of the SavedModel: it does reach a SavedModel
loaded by the embedded backend, if set (`tf.config.optimizer.set_experimental_options`) before
the model's functions first run, and would reach TF Serving only through a session config in a
platform config file, on a oneDNN build. It converts every eligible op, with no float32 prefix
(Lite0: min cosine 0.987 on the same photos), and changes every other graph of the process. It
is therefore not used; bench/precision.py --grappler-amp measures it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import keras
import tensorflow as tf

FP32 = "fp32"
BF16 = "bf16"
PRECISIONS = (FP32, BF16)

#: Keras' policy for layers that compute in bfloat16 and keep float32 weights.
MIXED_POLICY = "mixed_bfloat16"

#: CPU flags (as in /proc/cpuinfo) with native bfloat16 arithmetic that oneDNN uses.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")

#: Picks, in a backbone's layer order, the last layer that stays float32.
PrefixEnd = Callable[[keras.Model], keras.layers.Layer]


def _lite_prefix(model: keras.Model) -> keras.layers.Layer:
    # The stem (27-term convolution) and the first two blocks (depthwise 3x3 at stride <= 4);
    # block2b on adds at most 1e-4 to 1 - cosine each (see the module docstring).
    return model.get_layer("block2a_project_bn")


def _inception_prefix(model: keras.Model) -> keras.layers.Layer:
    # The stem convolution's activation: Keras numbers unnamed layers per process, so it is
    # found by position, as matcher.backbones.inception.stage_layers does. Its next convolution
    # sums 288 terms; the ImageNet weights are not available offline, so this was not measured.
    return next(layer for layer in model.layers if isinstance(layer, keras.layers.Activation))


#: Per backbone family (a name prefix): the last layer kept float32.
FLOAT32_PREFIX: dict[str, PrefixEnd] = {
    "efficientnet_lite": _lite_prefix,
    "inception_v3": _inception_prefix,
}


class InferenceBatchNormalization(keras.layers.BatchNormalization):  # type: ignore[misc]
    """BatchNormalization whose inference is TensorFlow's FusedBatchNormV3 in the layer's dtype.

    Keras' layer casts bfloat16 inputs to float32, normalises with four element-wise ops and
    casts back, so in bfloat16 every BN costs two extra passes over its feature map and stands
    between a convolution and its activation. FusedBatchNormV3 takes bfloat16 in and out with
    float32 statistics (the same arithmetic, one op), which TensorFlow's graph optimiser can fuse
    with the convolution before it. Measured at batch 32 on 2 cores, it takes Lite0 in bf16 from
    0.95x to about 1.3x fp32's speed, and Inception v3 from about 1.7x to 2x. Training, and
    anything but a 4-D channels-last input, take Keras' own path.
    """

    def call(
        self, inputs: tf.Tensor, training: bool | None = None, mask: tf.Tensor | None = None
    ) -> tf.Tensor:
        if training or mask is not None or len(inputs.shape) != 4 or self.axis not in (-1, 3):
            return super().call(inputs, training=training, mask=mask)
        channels = inputs.shape[-1]
        # Weights are float32 (BatchNormalization never autocasts them), as the op wants.
        scale = self.gamma if self.scale else tf.ones([channels], tf.float32)
        offset = self.beta if self.center else tf.zeros([channels], tf.float32)
        outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
            inputs,
            scale,
            offset,
            mean=self.moving_mean,
            variance=self.moving_variance,
            epsilon=self.epsilon,
            is_training=False,
        )
        return outputs


def float32_layers(backbone: str, model: keras.Model) -> set[str]:
    """Names of the layers of `model` that stay float32 when backbone `backbone` runs in bf16.

    These are the layers up to the backbone's float32 prefix (none for an unknown backbone) and
    every global pooling layer, whose mean over the feature map is the output.
    """
    ends = [end for family, end in FLOAT32_PREFIX.items() if backbone.startswith(family)]
    keep: set[str] = set()
    if ends:
        last = ends[0](model).name
        for layer in model.layers:
            keep.add(layer.name)
            if layer.name == last:
                break
    pooling = (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D)
    keep.update(layer.name for layer in model.layers if isinstance(layer, pooling))
    return keep


def to_bfloat16(model: keras.Model, keep_float32: set[str]) -> keras.Model:
    """A copy of functional `model` whose layers compute in bfloat16, except `keep_float32`.

    Each layer is rebuilt from its config with the `mixed_bfloat16` policy (or `float32`), and
    the weights are copied, as float32. Layers cast their inputs to their own compute dtype, so
    the float32 and bfloat16 parts join without explicit casts. The global Keras dtype policy
    is neither read nor changed.
    """

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        config = layer.get_config()
        if not isinstance(layer, keras.layers.InputLayer):
            config["dtype"] = "float32" if layer.name in keep_float32 else MIXED_POLICY
        if type(layer) is keras.layers.BatchNormalization:
            return InferenceBatchNormalization.from_config(config)
        return layer.__class__.from_config(config)

    converted = keras.models.clone_model(model, clone_function=clone)
    converted.set_weights(model.get_weights())
    return converted


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool | None:
    """Whether this CPU does bfloat16 arithmetic natively; None when it cannot be told.

    Without it, TensorFlow emulates bfloat16 and a bf16 model runs slower than float32.
    """
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return any(flag in flags.split() for flag in BF16_CPU_FLAGS)
