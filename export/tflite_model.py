"""The on-device model: a LiteRT (TFLite) file of the backbone and the catalogue head, for a phone.

`python -m export tflite --model-dir M --classifier RUN --out DIR` writes, from a SavedModel
version and a `knn` or `prototype` training run:

    DIR/matcher_fp32.tflite   float32 throughout
    DIR/matcher_int8.tflite   int8 weights and activations, calibrated on the catalogue's own
                              reference views; the few layers int8 hurts most stay float
    DIR/labels.txt            the labels, one per line, in the order of the outputs
    DIR/matcher.json          what the metadata inside each model says (input, outputs, labels,
                              the no-match threshold)
    DIR/manifest.json         sha256 of every file above

The backbone's weights are read back from the SavedModel's own variables (a Keras model of the
same architecture is built and restored from `variables/`), so the phone runs the very weights
the server runs. Input: float32 [1, S, S, 3], RGB in 0..255, the photo resized to S x S (the
server resizes the whole frame with an antialiased bilinear filter); normalisation is inside.
Outputs (signature `serving_default`):

    features     [1, D]  the backbone's pooled features (what Embed returns)
    similarity   [1, L]  each label's best cosine similarity to its reference views (knn) or
                         to its prototype, on features centred on the catalogue's mean view,
                         as the server's LabelScore.similarity for the whole photo
    probability  [1, L]  softmax(similarity / temperature), as LabelScore.score

The verdict is the server's: MATCH when max(similarity) >= the threshold in the metadata.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from integrity.manifest import write_manifest
from matcher.backbones.builder import ExportError, build_backbone
from matcher.classifier import INDEX_MATCHERS, TEMPERATURE, Classifier
from matcher.layout import REFERENCES_DIR, read_model_info
from matcher.pixels import network_input

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int8")
MODEL_FILE = "matcher_{precision}.tflite"
LABELS_FILE = "labels.txt"
METADATA_FILE = "matcher.json"
#: The name of the model's metadata entry holding METADATA_FILE's JSON.
METADATA_NAME = "matcher"
INPUT_NAME = "pixels"
OUTPUTS = ("features", "similarity", "probability")
#: Catalogue views the int8 model is calibrated on (at most), and those its per-layer errors
#: are measured on.
CALIBRATION_VIEWS = 200
DEBUG_VIEWS = 20
#: A layer whose int8 output is off by more than this many quantisation steps (RMSE / scale,
#: measured on catalogue views) stays float: on EfficientNet-Lite0, the stem and first blocks.
MAX_LAYER_ERROR = 0.45


@dataclass(frozen=True)
class OnDeviceModels:
    """What `export_tflite` wrote."""

    folder: Path
    files: dict[str, Path]
    metadata: dict[str, Any]
    #: int8 only: how many layers stayed float (of how many quantisable ones).
    float_layers: tuple[int, int] | None = None


def export_tflite(
    version_dir: Path,
    run: Path,
    out: Path,
    precisions: tuple[str, ...] = PRECISIONS,
) -> OnDeviceModels:
    """Write the on-device models of SavedModel `version_dir` with the catalogue of `run`."""
    info = read_model_info(version_dir)
    classifier = Classifier.load(run)
    catalogue = classifier.catalogue
    if classifier.matcher not in INDEX_MATCHERS or catalogue is None:
        raise ExportError(
            f"{run} was trained with --matcher {classifier.matcher}; the on-device head is the "
            "catalogue index: train with --matcher knn or prototype"
        )
    if info.feature_dim != catalogue.index.dim:
        raise ExportError(
            f"{run} holds {catalogue.index.dim} features per view, {version_dir} gives "
            f"{info.feature_dim}: they do not belong together"
        )
    backbone = _restored_backbone(version_dir, info.backbone, info.layer)
    head = _head(classifier)
    network = _network(backbone, head, info.input_size)
    threshold = catalogue.threshold
    metadata = {
        "format": 1,
        "backbone": info.backbone,
        "feature_layer": info.layer,
        "classifier_sha256": classifier.info.sha256,
        "matcher": classifier.matcher,
        "input": {
            "name": INPUT_NAME,
            "shape": [1, info.input_size, info.input_size, 3],
            "dtype": "float32",
            "range": [0, 255],
            "colour": "RGB",
            "resize": "whole frame to input size, bilinear, antialiased (no crop, no padding)",
        },
        "outputs": {
            name: _output_doc(name, info.feature_dim, len(head.labels)) for name in OUTPUTS
        },
        "labels": head.labels,
        "temperature": TEMPERATURE,
        "no_match_threshold": threshold,
        "verdict": "MATCH when max(similarity) >= no_match_threshold, else NO_MATCH",
    }
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    float_layers = None
    staging = Path(tempfile.mkdtemp(prefix=".tflite-", dir=out))
    for precision in precisions:
        if precision == "fp32":
            data = _converter(network, staging / precision).convert()
        elif precision == "int8":
            views = _calibration_views(run, info.input_size)
            data, float_layers = _int8(_converter(network, staging / precision), views)
        else:
            raise ExportError(f"unknown precision {precision!r}; choose fp32 or int8")
        path = out / MODEL_FILE.format(precision=precision)
        path.write_bytes(_with_metadata(data, {**metadata, "precision": precision}))
        files[precision] = path
        log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
    shutil.rmtree(staging)
    (out / LABELS_FILE).write_text("".join(f"{label}\n" for label in head.labels))
    (out / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    # A folder of plain files, checked like a run folder: every file listed.
    write_manifest(out, tool="export", kind="classifier")
    return OnDeviceModels(out, files, metadata, float_layers)


def read_metadata(model: bytes) -> dict[str, Any]:
    """The `matcher` metadata inside a model written by `export_tflite`."""
    from tensorflow.lite.tools import flatbuffer_utils

    parsed = flatbuffer_utils.convert_bytearray_to_object(bytearray(model))
    for entry in parsed.metadata or []:
        if entry.name.decode() == METADATA_NAME:
            found: dict[str, Any] = json.loads(bytes(parsed.buffers[entry.buffer].data))
            return found
    raise ValueError("the model has no matcher metadata")


@dataclass(frozen=True)
class _Head:
    labels: list[str]
    centre: np.ndarray
    #: [L * G, D] reference views, each label's group padded to G rows with copies of its own
    #: views (a max over copies is the max), or [L, D] prototypes.
    vectors: np.ndarray
    group: int


def _head(classifier: Classifier) -> _Head:
    assert classifier.catalogue is not None
    index = classifier.catalogue.index
    if classifier.matcher == "prototype":
        return _Head(index.labels, index.centre, index.prototypes(), 1)
    rows = [np.flatnonzero(np.asarray(index.row_labels) == label) for label in index.labels]
    group = max(len(r) for r in rows)
    padded = np.concatenate([index.vectors[np.resize(r, group)] for r in rows])
    return _Head(index.labels, index.centre, padded.astype(np.float32), group)


def _restored_backbone(version_dir: Path, name: str, layer: str | None) -> Any:
    """The backbone's Keras model with the SavedModel's own weights."""
    backbone = build_backbone(name, weights="random", layer=layer)
    try:
        status = tf.train.Checkpoint(model=backbone.model).read(
            str(version_dir / "variables" / "variables")
        )
        status.assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as exc:
        raise ExportError(
            f"cannot read the {name} weights back from {version_dir}/variables (a frozen-graph "
            f"export has none): {str(exc).splitlines()[0]}"
        ) from exc
    return backbone


def _network(backbone: Any, head: _Head, size: int) -> Any:
    """The frozen function: pixels -> features, similarity, probability."""
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    centre = tf.constant(head.centre[None])
    vectors = tf.constant(head.vectors)  # [rows, D]: a fully connected layer as it is
    labels = len(head.labels)

    @tf.function(input_signature=[tf.TensorSpec([1, size, size, 3], tf.float32, name=INPUT_NAME)])
    def on_device(pixels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        features = tf.cast(backbone.model(backbone.normalize(pixels), training=False), tf.float32)
        # matcher.index.normalise: unit length after centring.
        centred = tf.math.l2_normalize(features - centre, axis=1, epsilon=1e-24)
        similarity = tf.reduce_max(
            tf.reshape(tf.matmul(centred, vectors, transpose_b=True), [1, labels, head.group]),
            axis=2,
        )
        probability = tf.nn.softmax(similarity / TEMPERATURE, axis=1)
        return features, similarity, probability  # OUTPUTS' order; named by `_converter`

    return convert_variables_to_constants_v2(on_device.get_concrete_function())


def _converter(network: Any, staging: Path) -> Any:
    """A converter of `network` as signature `serving_default`, its outputs named.

    Through a SavedModel of the frozen function: converting the function itself gives a model
    without a signature, whose outputs are only "Identity", "Identity_1", ..."""
    spec = tf.TensorSpec(network.inputs[0].shape, tf.float32, name=INPUT_NAME)
    module = tf.Module()
    module.serve = tf.function(
        lambda pixels: dict(zip(OUTPUTS, network(pixels), strict=True)), input_signature=[spec]
    )
    tf.saved_model.save(
        module, str(staging), signatures={"serving_default": module.serve.get_concrete_function()}
    )
    return tf.lite.TFLiteConverter.from_saved_model(str(staging))


def _calibration_views(run: Path, size: int) -> list[np.ndarray]:
    """Network inputs of the catalogue's reference thumbnails (every label, evenly)."""
    paths = sorted(p for p in (run / REFERENCES_DIR).rglob("*") if p.is_file())
    if not paths:
        raise ExportError(f"{run}/{REFERENCES_DIR} holds no reference views to calibrate on")
    step = max(1, len(paths) // CALIBRATION_VIEWS)
    return [network_input(p.read_bytes(), size)[None] for p in paths[::step][:CALIBRATION_VIEWS]]


def _int8(converter: Any, views: list[np.ndarray]) -> tuple[bytes, tuple[int, int]]:
    """Full-integer quantisation calibrated on `views`, the layers it hurts most left float
    (TensorFlow's quantisation debugger measures each layer's error on catalogue views)."""

    def dataset() -> Iterator[list[np.ndarray]]:
        for view in views:
            yield [view]

    def debug_dataset() -> Iterator[list[np.ndarray]]:
        for view in views[:DEBUG_VIEWS]:
            yield [view]

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = dataset
    with warnings.catch_warnings():
        # The debugger runs TensorFlow's own deprecated tf.lite.Interpreter; nothing to act on.
        warnings.filterwarnings("ignore", ".*tf.lite.Interpreter is deprecated")
        warnings.filterwarnings("ignore", ".*Statistics for quantized inputs were expected")
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=debug_dataset
        )
        debugger.run()
        dump = io.StringIO()
        debugger.layer_statistics_dump(dump)
        rows = list(csv.DictReader(io.StringIO(dump.getvalue())))
        kept_float = [
            row["tensor_name"]
            for row in rows
            if float(row["scale"]) > 0
            and float(row["mean_squared_error"]) ** 0.5 / float(row["scale"]) > MAX_LAYER_ERROR
        ]
        options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=kept_float)
        selective = tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=debug_dataset, debug_options=options
        )
        data: bytes = selective.get_nondebug_quantized_model()
    return data, (len(kept_float), len(rows))


def _with_metadata(model: bytes, metadata: dict[str, Any]) -> bytes:
    """`model` with `metadata` as JSON in a metadata entry named "matcher"."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    parsed = flatbuffer_utils.convert_bytearray_to_object(bytearray(model))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(metadata).encode(), dtype=np.uint8)
    parsed.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = METADATA_NAME
    entry.buffer = len(parsed.buffers) - 1
    parsed.metadata = [*(parsed.metadata or []), entry]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(parsed))


def _output_doc(name: str, feature_dim: int, labels: int) -> dict[str, Any]:
    shapes = {"features": [1, feature_dim], "similarity": [1, labels], "probability": [1, labels]}
    return {"shape": shapes[name], "dtype": "float32"}


def default_out(version_dir: Path) -> Path:
    """Where `python -m export tflite` writes by default: build/tflite/<backbone>."""
    return Path("build") / "tflite" / read_model_info(version_dir).backbone
