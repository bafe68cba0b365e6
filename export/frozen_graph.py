"""The original network: TensorFlow's 2015 frozen Inception v3 graph as a batchable SavedModel.

The original work took Inception v3's 2048-d `pool_3` features from the frozen graph
`classify_image_graph_def.pb`, feeding one JPEG at a time to `DecodeJpeg/contents:0`. That graph
decodes and resizes a single image, and its `pool_3/_reshape` hard-codes a batch of one. This
module cuts the graph at `Mul:0`, the normalised [1, 299, 299, 3] pixels the convolutions read,
and feeds it a batch decoded in the graph by `matcher.preprocess` and normalised with the graph's
own constants, `(x - 128) * (1/128)`. It returns `pool_3:0` as the features, and four stages for
the `feature_maps` signature. The export has the same signatures as the Keras
exports: encoded images (1-D string) -> `features` float32 [N, 2048]. Nothing tells the service
which one it serves, except `weights` in the metadata (`frozen:classify_image_graph_def.pb`).

How to use the real classify_image_graph_def.pb
-----------------------------------------------

On a machine that is online, download the archive that TensorFlow's `classify_image.py` used and
extract it (about 90 MB; it also holds the label maps and `cropped_panda.jpg`):

    curl -LO http://download.tensorflow.org/models/image/imagenet/inception-2015-12-05.tgz
    tar xzf inception-2015-12-05.tgz

(the same file is served at https://storage.googleapis.com/download.tensorflow.org/models/image/
imagenet/inception-2015-12-05.tgz). Then convert it where the models live:

    .venv/bin/python -m export --frozen-graph classify_image_graph_def.pb

This writes `models/backbones/inception_v3/<next version>/`. Use `--base-path` and `--model-name`
to choose another folder or name, and `--version` to choose the version number. Then
`make run BACKBONE=inception_v3` trains on it and serves it: its export step finds the version
and leaves it alone. Convert with the TensorFlow that serves the model, as for any export.

What the conversion changes, and why:

* The graph's own `DecodeJpeg -> ResizeBilinear` takes one JPEG. Ours takes any batch of JPEG,
  PNG, GIF or BMP and resizes with antialiasing. The pixels therefore differ slightly from the
  original ones, but they are decoded and resized exactly as for the other backbones.
* `pool_3:0` [N, 1, 1, 2048] is reshaped to [N, 2048] for any N (the graph's `pool_3/_reshape`
  would fail for N > 1).
* The 2015 graph normalises with `BatchNormWithGlobalNormalization`. TensorFlow removed that op
  from GraphDef version 9 and only runs it in graphs that declare an older version. A SavedModel
  written today declares the current version, so each such node is rewritten as the ops
  `tf.nn.batch_normalization` uses, which compute the same thing:
  `(x - mean) * rsqrt(variance + epsilon) [* gamma] + beta`.
* The weights stay constants, so the SavedModel holds them in `saved_model.pb` (about the size of
  the `.pb`) and `variables/` holds none.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import tensorflow as tf
from google.protobuf.message import DecodeError
from tensorflow.core.framework import graph_pb2, node_def_pb2, tensor_shape_pb2
from tensorflow.python.framework import op_def_registry

from matcher.backbones import inception
from matcher.backbones.builder import Backbone, ExportError

FILE_NAME = "classify_image_graph_def.pb"
DOWNLOAD_URL = "http://download.tensorflow.org/models/image/imagenet/inception-2015-12-05.tgz"
#: The normalised pixels the convolutions read; everything upstream of it is replaced.
INPUT_NODE = "Mul"
#: Average-pooled mixed_10, [N, 1, 1, 2048]: the original features.
FEATURE_NODE = "pool_3"
#: The original post's stages (`inception.STAGE_NAMES`) -> their tensors in the frozen graph.
#: A mixed block ends in the concatenation `<block>/join`.
STAGE_TENSORS = {
    "conv": "conv:0",
    "conv_1": "conv_1:0",
    "mixed_2": "mixed_2/join:0",
    "mixed_7": "mixed_7/join:0",
}
_OLD_BATCH_NORM = "BatchNormWithGlobalNormalization"


class FrozenGraphFunction(tf.Module):
    """Normalised pixels [N, S, S, 3] -> some outputs of the imported graph, called as a Keras
    model is (`fn(pixels, training=False)`), so that `FeatureModule` can hold it as a model.

    `features` and `stages` share one imported function. The SavedModel therefore stores the
    graph's constants once, and at run time TensorFlow prunes whatever a signature does not use.
    """

    def __init__(
        self, function: tf.types.experimental.ConcreteFunction, outputs: slice, name: str
    ) -> None:
        super().__init__(name=name)
        self._function = function
        self._outputs = outputs

    def __call__(self, pixels: tf.Tensor, training: bool = False) -> tf.Tensor | list[tf.Tensor]:
        del training  # a frozen graph has no training mode
        selected = list(self._function(pixels))[self._outputs]
        return selected[0] if len(selected) == 1 else selected


def load_graph_def(path: Path | str) -> graph_pb2.GraphDef:
    """Read a binary frozen GraphDef; ExportError if it is missing or not a GraphDef."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"frozen graph {path} does not exist; see `python -m export --help`")
    graph_def = graph_pb2.GraphDef()
    try:
        graph_def.ParseFromString(path.read_bytes())
    except DecodeError as exc:
        raise ExportError(f"{path} is not a binary TensorFlow GraphDef ({exc})") from None
    return graph_def


def build_frozen_graph_backbone(path: Path | str) -> Backbone:
    """The `inception_v3` backbone from the frozen graph at `path`, ready for `export_backbone`.

    Features are `pool_3` [N, 2048]. The `feature_maps` stages are conv, conv_1, mixed_2 and
    mixed_7, or none when the graph lacks any of them. Raises ExportError when the graph is not
    usable (no `pool_3`, no `Mul` fed by `Sub` and `ResizeBilinear`, or ops this TensorFlow
    lacks).
    """
    path = Path(path)
    graph_def = load_graph_def(path)
    nodes = {node.name: node for node in graph_def.node}
    if FEATURE_NODE not in nodes:
        raise ExportError(
            f"{path.name} has no node {FEATURE_NODE!r}: not Inception v3's {FILE_NAME}?"
        )
    size, offset, scale = _preprocessing(nodes, path.name)
    stage_names = inception.STAGE_NAMES
    has_stages = all(_node_name(STAGE_TENSORS[name]) in nodes for name in stage_names)
    fetches = [f"{FEATURE_NODE}:0", *(STAGE_TENSORS[n] for n in stage_names if has_stages)]

    prepared = prepare_graph_def(graph_def, size, [_node_name(f) for f in fetches])
    function = _import(prepared, fetches, path.name)
    pooled = function.structured_outputs[0].shape
    if pooled.rank != 4 or pooled[1:3] != [1, 1] or pooled[-1] is None:
        raise ExportError(f"{FEATURE_NODE} of {path.name} is {pooled}, not [N, 1, 1, D]")
    feature_dim = int(pooled[-1])

    # tf.Modules, not plain functions: FeatureModule keeps `model` and `stages` as attributes.
    model = _Features(FrozenGraphFunction(function, slice(0, 1), name="pool_3"), feature_dim)
    stages = FrozenGraphFunction(function, slice(1, None), name="stages") if has_stages else None
    return Backbone(
        name=inception.NAME,
        model=model,  # called like a Keras model; see FeatureModule
        input_size=size,
        feature_dim=feature_dim,
        normalize=lambda images: (images - offset) * scale,
        weights=f"frozen:{path.name}",
        layer=FEATURE_NODE,
        stages=stages,
        stage_names=stage_names if has_stages else (),
    )


class _Features(tf.Module):
    """`pool_3` [N, 1, 1, D] -> [N, D] for any N (the graph's own reshape fixes N to 1)."""

    def __init__(self, pool_3: FrozenGraphFunction, feature_dim: int) -> None:
        super().__init__(name="features")
        self.pool_3 = pool_3
        self._feature_dim = feature_dim

    def __call__(self, pixels: tf.Tensor, training: bool = False) -> tf.Tensor:
        return tf.reshape(self.pool_3(pixels, training), [-1, self._feature_dim])


def prepare_graph_def(
    graph_def: graph_pb2.GraphDef, size: int, outputs: Iterable[str]
) -> graph_pb2.GraphDef:
    """A copy of `graph_def` that TensorFlow 2 can run batched from `Mul` to `outputs`.

    `Mul` becomes a float placeholder [None, size, size, 3], and only the nodes the outputs need
    are kept, so the single-image decode and resize, `pool_3/_reshape` and `softmax` are
    dropped. The old batch-norm op is rewritten as current ops. Device pins are removed, so that
    TensorFlow Serving places the ops, and so are `_output_shapes`, stale once the batch varies.
    """
    prepared = graph_pb2.GraphDef()
    prepared.versions.CopyFrom(graph_def.versions)
    prepared.library.CopyFrom(graph_def.library)
    kept = _ancestors(graph_def, outputs, stop_at={INPUT_NODE})
    for node in graph_def.node:
        if node.name not in kept:
            continue
        if node.name == INPUT_NODE:
            prepared.node.append(_placeholder(INPUT_NODE, size))
        elif node.op == _OLD_BATCH_NORM:
            prepared.node.extend(_batch_normalization(node))
        else:
            copy = prepared.node.add()
            copy.CopyFrom(node)
            copy.device = ""
            if "_output_shapes" in copy.attr:
                del copy.attr["_output_shapes"]
    _check_ops(prepared)
    return prepared


def _import(
    graph_def: graph_pb2.GraphDef, fetches: list[str], file_name: str
) -> tf.types.experimental.ConcreteFunction:
    """The prepared graph as one function: pixels -> [pool_3, *stages]."""

    def import_graph() -> None:
        tf.compat.v1.import_graph_def(graph_def, name="")

    try:
        wrapped = tf.compat.v1.wrap_function(import_graph, signature=[])
        graph = wrapped.graph
        # Pruning copies just these nodes into a new function, without the import's leftovers.
        return wrapped.prune(
            feeds=graph.as_graph_element(f"{INPUT_NODE}:0"),
            fetches=[graph.as_graph_element(name) for name in fetches],
        )
    except (ValueError, KeyError, tf.errors.OpError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ExportError(f"cannot import {file_name}: {first_line}") from exc


def _preprocessing(
    nodes: dict[str, node_def_pb2.NodeDef], file_name: str
) -> tuple[int, float, float]:
    """(input size, offset, scale) from the graph's `ResizeBilinear -> Sub -> Mul` chain.

    Read rather than assumed, so that the normalisation is the graph's own: 128 and 1/128 in
    the 2015 graph.
    """
    mul = nodes.get(INPUT_NODE)
    if mul is None or mul.op != "Mul":
        raise ExportError(f"{file_name} has no {INPUT_NODE!r} node (the normalised pixels)")
    sub_name, scale = _const_operand(mul, nodes, file_name)
    sub = nodes.get(sub_name)
    if sub is None or sub.op != "Sub":
        raise ExportError(f"{file_name}: {INPUT_NODE!r} does not multiply a 'Sub' by a constant")
    resize_name, offset = _const_operand(sub, nodes, file_name, position=1)
    resize = nodes.get(resize_name)
    if resize is None or not resize.op.startswith("Resize") or len(resize.input) < 2:
        raise ExportError(f"{file_name}: 'Sub' does not subtract from a resized image")
    size_node = nodes.get(_node_name(resize.input[1]))
    if size_node is None or size_node.op != "Const":
        raise ExportError(f"{file_name}: {resize.name!r} has no constant size")
    height, width = (int(v) for v in tf.make_ndarray(size_node.attr["value"].tensor))
    if height != width:
        raise ExportError(f"{file_name} resizes to {height}x{width}; only square inputs are served")
    return height, offset, scale


def _const_operand(
    node: node_def_pb2.NodeDef,
    nodes: dict[str, node_def_pb2.NodeDef],
    file_name: str,
    position: int | None = None,
) -> tuple[str, float]:
    """(the other input's node name, the scalar constant) of a binary op with one constant.

    `position` pins where the constant must be (1 for `x - c`, which is not `c - x`).
    """
    names = [_node_name(name) for name in node.input if not name.startswith("^")]
    for index, name in enumerate(names):
        const = nodes.get(name)
        if const is None or const.op != "Const" or position not in (None, index):
            continue
        value = tf.make_ndarray(const.attr["value"].tensor)
        if value.size == 1 and len(names) == 2:
            return names[1 - index], float(value.reshape(()))
    raise ExportError(f"{file_name}: {node.name!r} has no scalar constant operand")


def _ancestors(
    graph_def: graph_pb2.GraphDef, outputs: Iterable[str], stop_at: set[str]
) -> set[str]:
    """Names of the nodes `outputs` depend on (themselves included), not looking past `stop_at`."""
    inputs = {node.name: [_node_name(name) for name in node.input] for node in graph_def.node}
    seen: set[str] = set()
    todo = list(outputs)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name not in stop_at:
            todo.extend(inputs.get(name, []))
    return seen


def _node_name(tensor_or_input: str) -> str:
    """`^name`, `name:1` or `name` -> `name`."""
    return tensor_or_input.lstrip("^").split(":")[0]


def _placeholder(name: str, size: int) -> node_def_pb2.NodeDef:
    node = node_def_pb2.NodeDef(name=name, op="Placeholder")
    node.attr["dtype"].type = tf.float32.as_datatype_enum
    dims = [tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in (-1, size, size, 3)]
    node.attr["shape"].shape.CopyFrom(tensor_shape_pb2.TensorShapeProto(dim=dims))
    return node


def _batch_normalization(node: node_def_pb2.NodeDef) -> list[node_def_pb2.NodeDef]:
    """`BatchNormWithGlobalNormalization` as the ops it stands for; the last keeps its name.

    Inputs are (t, mean, variance, beta, gamma); gamma is used only with
    `scale_after_normalization`, as in the removed kernel.
    """
    t, mean, variance, beta, gamma = (name for name in node.input if not name.startswith("^"))
    control = [name for name in node.input if name.startswith("^")]
    dtype = node.attr["T"].type
    epsilon = node.attr["variance_epsilon"].f
    prefix = f"{node.name}/_rewritten"

    def op(suffix: str, kind: str, *inputs: str) -> node_def_pb2.NodeDef:
        new = node_def_pb2.NodeDef(name=f"{prefix}/{suffix}", op=kind, input=inputs)
        new.attr["T"].type = dtype
        return new

    eps = node_def_pb2.NodeDef(name=f"{prefix}/epsilon", op="Const")
    eps.attr["dtype"].type = dtype
    numpy_dtype = tf.dtypes.as_dtype(dtype).as_numpy_dtype
    eps.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(np.asarray(epsilon, numpy_dtype)))
    nodes = [
        eps,
        op("variance_epsilon", "AddV2", variance, eps.name),
        op("rsqrt", "Rsqrt", f"{prefix}/variance_epsilon"),
    ]
    factor = f"{prefix}/rsqrt"
    if node.attr["scale_after_normalization"].b:
        nodes.append(op("scale", "Mul", factor, gamma))
        factor = f"{prefix}/scale"
    nodes += [
        op("centered", "Sub", t, mean),
        op("normalized", "Mul", f"{prefix}/centered", factor),
    ]
    out = node_def_pb2.NodeDef(
        name=node.name, op="AddV2", input=[f"{prefix}/normalized", beta, *control]
    )
    out.attr["T"].type = dtype
    return [*nodes, out]


def _check_ops(graph_def: graph_pb2.GraphDef) -> None:
    """Fail now, with the op's name, rather than when TensorFlow Serving loads the model."""
    for op in sorted({node.op for node in graph_def.node}):
        op_def = op_def_registry.get(op)
        if op_def is None:
            raise ExportError(f"the frozen graph uses op {op!r}, unknown to this TensorFlow")
        if op_def.deprecation.version:
            raise ExportError(
                f"the frozen graph uses op {op!r}, removed in GraphDef version "
                f"{op_def.deprecation.version} ({op_def.deprecation.explanation})"
            )
