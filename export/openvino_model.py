"""The OpenVINO model of a backbone, derived at export from the SavedModel's own weights.

Written inside the SavedModel version (`openvino/model.xml` + `.bin`) before the manifest, so
the manifest covers it and TF Serving, which reads only `saved_model.pb` and `variables/`,
serves the version unchanged. The OpenVINO model is the network alone: float32 pixels
[N, S, S, 3] in 0..255 (decoded and resized by `matcher.pixels`, as the graph does) through
the backbone's normalisation and layers to float32 features [N, D]. It is converted from the
same Keras model and `tf.function` the SavedModel is traced from, so it cannot drift from it.
"""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf

from matcher.backbones.builder import Backbone, ExportError
from matcher.backbones.precision import FP32
from matcher.layout import OPENVINO_INPUT, OPENVINO_MODEL_FILE


def write_openvino_model(backbone: Backbone, version_dir: Path) -> Path | None:
    """Convert `backbone` to OpenVINO IR under `version_dir`; returns the .xml path, or None
    for a bf16 export, which TensorFlow alone runs.

    A bf16 export's graph casts to bfloat16 between layers (Keras mixed precision), and
    OpenVINO's CPU plugin cannot compile those casts; OpenVINO chooses its own precision at
    load instead (`--precision bf16` on an fp32 export), so such a version has no OpenVINO
    model and the `auto` engine serves it with TensorFlow."""
    if backbone.precision != FP32:
        return None
    import openvino as ov  # only export and the openvino engine need it

    size = backbone.input_size

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
    def network(pixels: tf.Tensor) -> tf.Tensor:
        return tf.cast(backbone.model(backbone.normalize(pixels), training=False), tf.float32)

    try:
        model = ov.convert_model(network)
    except Exception as exc:  # the converter raises its own kinds, all meaning "cannot"
        raise ExportError(f"OpenVINO cannot convert {backbone.name}: {exc}") from exc
    model.inputs[0].get_tensor().set_names({OPENVINO_INPUT})
    path = version_dir / OPENVINO_MODEL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    # Weights stay float32 in the file: precision is chosen where the model runs.
    ov.save_model(model, str(path), compress_to_fp16=False)
    return path
