"""`export.frozen_graph`: the 2015 frozen Inception v3 graph as a batchable SavedModel.

The real `classify_image_graph_def.pb` (about 90 MB) cannot be downloaded here, so
`classify_image_graph_def` builds a small stand-in with the same node names, shapes at the four
stages, single-image preprocessing (`DecodeJpeg/contents` -> ... -> `Mul`), batch-of-one
`pool_3/_reshape`, `softmax`, and the old `BatchNormWithGlobalNormalization` op behind each
convolution. TensorFlow 2 refuses to create that op, so the stand-in writes those nodes by hand
and declares GraphDef version 8, the last that still runs it. The 2015 file predates version 9
too (TensorFlow only warned about the op when running it), so both run the same way: in a TF1
Session, one JPEG at a time, as the original work did.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from sklearn.datasets import load_sample_images
from tensorflow.core.framework import graph_pb2
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

from export.frozen_graph import FILE_NAME, build_frozen_graph_backbone
from export.savedmodel import ExportedModel, export_backbone
from matcher.backbones import inception
from matcher.backbones.builder import ExportError, build_backbone
from matcher.layout import (
    FEATURE_MAPS_SIGNATURE,
    INPUT_KEY,
    OUTPUT_KEY,
    SIGNATURE,
    ExportedModelInfo,
    read_model_info,
)
from matcher.preprocess import decode_batch
from tests import samples
from tests.cli_output import cli_stderr_lines, run_module

SIZE = 299
#: The real graph's stage shapes (H, W, C), matched by the stand-in.
STAGE_SHAPES = {
    "stage1": (149, 149, 32),
    "stage2": (147, 147, 32),
    "stage3": (35, 35, 288),
    "stage4": (17, 17, 768),
}

# TensorFlow's native start-up logging on stderr, not the CLI's output (as in test_export.py).


# --- the stand-in frozen graph ------------------------------------------------------------------


class _Builder:
    """Inception-v3-style blocks with random constant weights, named as in the 2015 graph."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        #: Batch-norm stand-ins (Identity nodes) to turn into the old op once the graph is built.
        self.batch_norms: list[tuple[str, bool]] = []

    def const(self, value: np.ndarray, name: str) -> tf.Tensor:
        return tf.constant(value.astype(np.float32), name=name)

    def conv(self, x: tf.Tensor, name: str, filters: int, kernel: int, stride: int) -> tf.Tensor:
        """`name/Conv2D` -> `name/batchnorm` -> `name` (Relu), VALID padding."""
        fan_in = kernel * kernel * int(x.shape[-1])
        weights = self.rng.normal(
            0, np.sqrt(2 / fan_in), (kernel, kernel, int(x.shape[-1]), filters)
        )
        y = tf.nn.conv2d(
            x,
            self.const(weights, f"{name}/conv2d_params"),
            [1, stride, stride, 1],
            "VALID",
            name=f"{name}/Conv2D",
        )
        for part, value in {
            "moving_mean": self.rng.normal(0, 0.1, filters),
            "moving_variance": self.rng.uniform(0.5, 2.0, filters),
            "beta": self.rng.normal(0, 0.1, filters),
            "gamma": self.rng.uniform(0.5, 1.5, filters),
        }.items():
            self.const(value, f"{name}/batchnorm/{part}")
        # Alternate, so that both forms of the old op are converted.
        self.batch_norms.append((f"{name}/batchnorm", len(self.batch_norms) % 2 == 0))
        return tf.nn.relu(tf.identity(y, name=f"{name}/batchnorm"), name=name)

    def max_pool(self, x: tf.Tensor, name: str) -> tf.Tensor:
        return tf.nn.max_pool2d(x, 3, 2, "VALID", name=name)

    def join(self, name: str, branches: list[tf.Tensor]) -> tf.Tensor:
        # The 2015 graph's `Concat` (axis first), not today's ConcatV2.
        axis = tf.constant(3, name=f"{name}/join/concat_dim")
        return tf.raw_ops.Concat(concat_dim=axis, values=branches, name=f"{name}/join")


def classify_image_graph_def(seed: int = 0) -> graph_pb2.GraphDef:
    """A small frozen graph with the 2015 Inception v3 graph's node names and interface."""
    builder = _Builder(seed)
    graph = tf.Graph()
    with graph.as_default():
        contents = tf.compat.v1.placeholder(tf.string, [], name="DecodeJpeg/contents")
        image = tf.io.decode_jpeg(contents, channels=3, name="DecodeJpeg")
        image = tf.expand_dims(tf.cast(image, tf.float32, name="Cast"), 0, name="ExpandDims")
        size = tf.constant([SIZE, SIZE], name="ResizeBilinear/size")
        # TF1's resize: no antialiasing, corner-aligned pixel grid (half_pixel_centers=False).
        image = tf.raw_ops.ResizeBilinear(images=image, size=size, name="ResizeBilinear")
        image = tf.subtract(image, tf.constant(128.0, name="Sub/y"), name="Sub")
        x = tf.multiply(image, tf.constant(1 / 128, name="Mul/y"), name="Mul")  # [1, 299, 299, 3]

        x = builder.conv(x, "conv", 32, 3, 2)  # 149
        x = builder.conv(x, "conv_1", 32, 3, 1)  # 147
        x = builder.max_pool(x, "pool")  # 73
        x = builder.conv(x, "conv_4", 64, 3, 1)  # 71
        x = builder.max_pool(x, "pool_1")  # 35
        x = builder.join(
            "mixed_2",
            [
                builder.conv(x, "mixed_2/conv", 96, 1, 1),
                builder.conv(x, "mixed_2/tower/conv", 192, 1, 1),
            ],
        )  # 35 x 35 x 288
        pooled = builder.max_pool(x, "mixed_7/pool")  # 17
        x = builder.join("mixed_7", [builder.conv(pooled, "mixed_7/conv", 480, 1, 1), pooled])
        pooled = builder.max_pool(x, "mixed_10/pool")  # 8
        x = builder.join(
            "mixed_10",
            [
                builder.conv(pooled, "mixed_10/conv", 1024, 1, 1),
                builder.conv(pooled, "mixed_10/tower/conv", 1024, 1, 1),
            ],
        )  # 8 x 8 x 2048
        pool_3 = tf.nn.avg_pool2d(x, 8, 1, "VALID", name="pool_3")
        # The batch size of one is a constant in the real graph too.
        flat = tf.reshape(
            pool_3, tf.constant([1, 2048], name="pool_3/_reshape/shape"), name="pool_3/_reshape"
        )
        weights = builder.const(builder.rng.normal(0, 0.02, (2048, 10)), "softmax/weights")
        logits = tf.add(
            tf.matmul(flat, weights, name="softmax/logits/MatMul"),
            builder.const(np.zeros(10), "softmax/biases"),
            name="softmax/logits",
        )
        tf.nn.softmax(logits, name="softmax")
    # Frozen graphs may record each output's (batch-1) shape; the converter must not keep them.
    graph_def = graph.as_graph_def(add_shapes=True)
    graph_def.versions.producer = 8
    nodes = {node.name: node for node in graph_def.node}
    for name, scale_after_normalization in builder.batch_norms:
        node = nodes[name]
        node.op = "BatchNormWithGlobalNormalization"
        conv = node.input[0]
        del node.input[:]
        node.input.extend(
            [conv, *(f"{name}/{p}" for p in ("moving_mean", "moving_variance", "beta", "gamma"))]
        )
        node.attr["variance_epsilon"].f = 0.001
        node.attr["scale_after_normalization"].b = scale_after_normalization
    return graph_def


# --- helpers ------------------------------------------------------------------------------------


def jpeg(image: Image.Image | np.ndarray, quality: int = 90) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return samples.encode(image, "JPEG", quality=quality)


def features(signature, images: list[bytes]) -> np.ndarray:
    return signature(**{INPUT_KEY: tf.constant(images, dtype=tf.string)})[OUTPUT_KEY].numpy()


def meta_graph(version_dir: Path) -> meta_graph_pb2.MetaGraphDef:
    """The SavedModel's graph and SignatureDefs, as TensorFlow Serving reads them."""
    saved_model = saved_model_pb2.SavedModel.FromString(
        (version_dir / "saved_model.pb").read_bytes()
    )
    (only,) = saved_model.meta_graphs
    return only


def interface(signature_def: meta_graph_pb2.SignatureDef) -> dict:
    """What a client sees of a SignatureDef: method, and each key's dtype and shape."""

    def specs(tensors) -> dict:
        return {
            key: (info.dtype, [d.size for d in info.tensor_shape.dim])
            for key, info in sorted(tensors.items())
        }

    return {
        "method": signature_def.method_name,
        "inputs": specs(signature_def.inputs),
        "outputs": specs(signature_def.outputs),
    }


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return run_module("export", *args, timeout_s=300, env=env)


class OriginalGraph:
    """The frozen graph as used in 2015: a TF1 Session, one image at a time."""

    def __init__(self, graph_def: graph_pb2.GraphDef) -> None:
        graph = tf.Graph()
        with graph.as_default():
            tf.compat.v1.import_graph_def(graph_def, name="")
        # Importing keeps the file's GraphDef version (8), so the old batch-norm op still runs.
        assert graph.graph_def_versions.producer == 8
        self.session = tf.compat.v1.Session(graph=graph)

    def run(self, fetch: str, feed: dict[str, object]) -> np.ndarray:
        return self.session.run(fetch, feed)

    def from_jpeg(self, image: bytes, fetch: str = "pool_3:0") -> np.ndarray:
        return self.run(fetch, {"DecodeJpeg/contents:0": image})


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph_def() -> graph_pb2.GraphDef:
    return classify_image_graph_def()


@pytest.fixture(scope="module")
def graph_file(tmp_path_factory: pytest.TempPathFactory, graph_def: graph_pb2.GraphDef) -> Path:
    path = tmp_path_factory.mktemp("inception-2015-12-05") / FILE_NAME
    path.write_bytes(graph_def.SerializeToString())
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, graph_file: Path) -> ExportedModel:
    return export_backbone(
        build_frozen_graph_backbone(graph_file), tmp_path_factory.mktemp("frozen")
    )


@pytest.fixture(scope="module")
def loaded(exported: ExportedModel) -> tf.Module:
    return tf.saved_model.load(str(exported.path))


@pytest.fixture(scope="module")
def serve(loaded: tf.Module):
    return loaded.signatures[SIGNATURE]


@pytest.fixture(scope="module")
def keras_export(tmp_path_factory: pytest.TempPathFactory) -> ExportedModel:
    """Our Keras Inception v3 export, the interface the frozen graph's export must match."""
    return export_backbone(
        build_backbone("inception_v3", "random"), tmp_path_factory.mktemp("keras")
    )


@pytest.fixture(scope="module")
def original(graph_def: graph_pb2.GraphDef) -> OriginalGraph:
    return OriginalGraph(graph_def)


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    """Five real photos as JPEGs, of different sizes and aspect ratios, all shrunk to 299."""
    china, flower = load_sample_images().images  # 427 x 640
    return [
        jpeg(china),
        jpeg(flower),
        jpeg(samples.photo((512, 512))),
        jpeg(samples.photo((300, 450)).rotate(90, expand=True)),
        jpeg(np.ascontiguousarray(china[::-1, 100:500])),
    ]


# --- 1. the same interface as the Keras export ---------------------------------------------------


def test_signatures_are_those_of_the_keras_export(
    exported: ExportedModel, keras_export: ExportedModel
) -> None:
    frozen, keras = meta_graph(exported.path), meta_graph(keras_export.path)
    assert sorted(frozen.signature_def) == sorted(keras.signature_def)
    assert {SIGNATURE, FEATURE_MAPS_SIGNATURE} <= set(frozen.signature_def)
    for name in (SIGNATURE, FEATURE_MAPS_SIGNATURE):
        assert interface(frozen.signature_def[name]) == interface(keras.signature_def[name]), name
    serving = interface(frozen.signature_def[SIGNATURE])
    assert serving["inputs"] == {INPUT_KEY: (tf.string.as_datatype_enum, [-1])}
    assert serving["outputs"] == {OUTPUT_KEY: (tf.float32.as_datatype_enum, [-1, 2048])}
    # The stand-in matches the real graph's stages, channels included.
    maps = interface(frozen.signature_def[FEATURE_MAPS_SIGNATURE])["outputs"]
    assert {key: tuple(shape[1:]) for key, (_, shape) in maps.items()} == STAGE_SHAPES


def test_loaded_signature_is_what_the_embedded_backend_expects(serve) -> None:
    args, kwargs = serve.structured_input_signature
    assert args == ()
    assert {k: (s.dtype, s.shape.as_list()) for k, s in kwargs.items()} == {
        INPUT_KEY: (tf.string, [None])
    }
    out = serve.structured_outputs[OUTPUT_KEY]
    assert (out.dtype, out.shape.as_list()) == (tf.float32, [None, 2048])


def test_metadata_and_constants(exported: ExportedModel, graph_file: Path) -> None:
    assert read_model_info(exported.path) == ExportedModelInfo(
        backbone="inception_v3",
        input_size=SIZE,
        feature_dim=2048,
        weights="frozen:classify_image_graph_def.pb",
        layer="pool_3",
        stages=list(inception.STAGE_NAMES),
    )
    assert exported.path == exported.path.parent.parent / "inception_v3" / "1"
    # The weights stay constants, stored once although both signatures use them.
    checkpoint = tf.train.list_variables(str(exported.path / "variables" / "variables"))
    assert [name for name, _ in checkpoint] == ["_CHECKPOINTABLE_OBJECT_GRAPH"]
    size = (exported.path / "saved_model.pb").stat().st_size
    assert 0.8 < size / graph_file.stat().st_size < 1.2
    # No removed op is left for TensorFlow Serving to refuse.
    library = meta_graph(exported.path).graph_def.library
    ops = {node.op for function in library.function for node in function.node_def}
    assert "Conv2D" in ops
    assert "BatchNormWithGlobalNormalization" not in ops
    assert not ops & {"ResizeBilinear", "Softmax"}  # the original's are cut off
    # Only our decoder is left (matcher.preprocess: accurate DCT; the original's used the default).
    decoders = [n for f in library.function for n in f.node_def if n.op == "DecodeJpeg"]
    assert decoders and {n.attr["dct_method"].s for n in decoders} == {b"INTEGER_ACCURATE"}


def test_the_openvino_engine_gives_the_same_features(
    exported: ExportedModel, photos: list[bytes]
) -> None:
    from matcher.backends.embedded import EmbeddedBackend

    features = {}
    for engine in ("tensorflow", "openvino"):
        backend = EmbeddedBackend(exported.path.parent, engine=engine)
        backend.load()
        assert backend.info.engine == engine
        features[engine] = backend.features(photos)
    a, b = features["tensorflow"], features["openvino"]
    cosines = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosines.min() >= 0.999, cosines


# --- 2. the same features as the original graph -------------------------------------------------


def test_same_network_as_the_original_on_the_same_pixels(
    loaded: tf.Module, serve, original: OriginalGraph, photos: list[bytes]
) -> None:
    """Fed identical pixels at `Mul:0`, the original graph (one image at a time, old batch-norm
    op) and the export (batched, rewritten batch norm) compute the same features."""
    pixels = ((decode_batch(tf.constant(photos), SIZE) - 128.0) * (1 / 128)).numpy()
    want = np.concatenate(
        [original.run("pool_3:0", {"Mul:0": pixels[i : i + 1]}).reshape(1, -1) for i in range(5)]
    )
    got = features(serve, photos)
    scale = np.abs(want).max()
    assert scale > 0.1
    # Bit-equal on CPU today (the rewritten batch norm rounds as the old kernel did). The margin
    # allows for batched convolutions taking another code path, as in test_export.py.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * scale)
    maps = loaded.signatures[FEATURE_MAPS_SIGNATURE](**{INPUT_KEY: tf.constant(photos[:2])})
    for key, tensor in zip(
        sorted(STAGE_SHAPES),
        ("conv:0", "conv_1:0", "mixed_2/join:0", "mixed_7/join:0"),
        strict=True,
    ):
        want_map = original.run(tensor, {"Mul:0": pixels[1:2]})[0]
        scale = np.abs(want_map).max()
        np.testing.assert_allclose(maps[key].numpy()[1], want_map, rtol=0, atol=1e-6 * scale)


def test_close_to_the_original_end_to_end(
    serve, original: OriginalGraph, photos: list[bytes]
) -> None:
    """From the JPEG bytes, the only difference is the resize: ours antialiases and samples
    pixel centres, the graph's 2015 `ResizeBilinear` does neither."""
    for photo in photos:
        # The decode is the same libjpeg call: identical pixels.
        ours = tf.io.decode_image(photo, channels=3, expand_animations=False).numpy()
        np.testing.assert_array_equal(original.from_jpeg(photo, "DecodeJpeg:0"), ours)
    want = np.concatenate([original.from_jpeg(photo).reshape(1, -1) for photo in photos])
    got = features(serve, photos)
    norms = np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1)
    cosines = np.sum(got * want, axis=1) / norms
    # The resized pixels differ by 2 to 6 levels on average (up to ~100 at sharp edges), which
    # moves the stand-in's features by a few percent. Cosine 0.9995 or more today; the bound
    # holds for the stand-in's random weights and says nothing about ImageNet weights.
    assert cosines.min() > 0.99
    # ...and the two pipelines do differ, so the test above is not vacuous.
    assert np.abs(got - want).max() > 1e-3 * np.abs(want).max()


def test_original_cannot_batch_but_the_export_can(
    serve, original: OriginalGraph, photos: list[bytes]
) -> None:
    pixels = ((decode_batch(tf.constant(photos[:2]), SIZE) - 128.0) * (1 / 128)).numpy()
    # The original takes one image: `Mul:0` is statically [1, 299, 299, 3] (from ExpandDims),
    # and the reshape after pool_3 is to a constant [1, 2048].
    graph = original.session.graph
    assert graph.get_tensor_by_name("Mul:0").shape.as_list() == [1, SIZE, SIZE, 3]
    assert graph.get_tensor_by_name("pool_3/_reshape:0").shape.as_list() == [1, 2048]
    with pytest.raises(ValueError, match="Cannot feed value of shape"):
        original.run("pool_3:0", {"Mul:0": pixels})
    batch = features(serve, photos)
    assert batch.shape == (5, 2048)
    alone = np.concatenate([features(serve, [photo]) for photo in photos])
    scale = np.abs(batch).max()
    np.testing.assert_allclose(batch, alone, rtol=0, atol=1e-5 * scale)
    spread = [np.abs(batch[i] - batch[j]).max() for i in range(5) for j in range(i + 1, 5)]
    assert min(spread) > 1e-2 * scale


# --- 3. graphs that cannot be converted ---------------------------------------------------------


def test_unusable_files_are_export_errors(tmp_path: Path, graph_def: graph_pb2.GraphDef) -> None:
    with pytest.raises(ExportError, match="does not exist"):
        build_frozen_graph_backbone(tmp_path / FILE_NAME)
    not_a_graph = tmp_path / "photo.pb"
    not_a_graph.write_bytes(samples.jpeg())
    with pytest.raises(ExportError, match="not a binary TensorFlow GraphDef"):
        build_frozen_graph_backbone(not_a_graph)
    unknown = graph_pb2.GraphDef()
    unknown.CopyFrom(graph_def)
    next(node for node in unknown.node if node.name == "conv_4").op = "NoSuchOp"
    (tmp_path / "unknown.pb").write_bytes(unknown.SerializeToString())
    with pytest.raises(ExportError, match="'NoSuchOp', unknown to this TensorFlow"):
        build_frozen_graph_backbone(tmp_path / "unknown.pb")


def graph_without_pool_3(graph_def: graph_pb2.GraphDef) -> graph_pb2.GraphDef:
    truncated = graph_pb2.GraphDef()
    truncated.versions.CopyFrom(graph_def.versions)
    truncated.node.extend(n for n in graph_def.node if not n.name.startswith(("pool_3", "softmax")))
    return truncated


# --- 4. the command line ------------------------------------------------------------------------


def test_cli_exports_the_frozen_graph(tmp_path: Path, graph_file: Path) -> None:
    result = run_cli("--frozen-graph", str(graph_file), "--base-path", str(tmp_path))
    assert result.returncode == 0, result.stderr
    version = tmp_path / "inception_v3" / "1"
    assert (version / "saved_model.pb").is_file()
    info = read_model_info(version)
    assert (info.backbone, info.weights, info.layer) == (
        "inception_v3",
        f"frozen:{FILE_NAME}",
        "pool_3",
    )
    assert "frozen:classify_image_graph_def.pb" in result.stdout


@pytest.mark.parametrize("case", ["missing", "no_pool_3"])
def test_cli_unusable_graph_is_one_line(
    tmp_path: Path, graph_def: graph_pb2.GraphDef, case: str
) -> None:
    path = tmp_path / FILE_NAME
    if case == "no_pool_3":
        path.write_bytes(graph_without_pool_3(graph_def).SerializeToString())
    base = tmp_path / "base"
    result = run_cli("--frozen-graph", str(path), "--base-path", str(base))
    assert result.returncode == 2, result.stderr
    lines = cli_stderr_lines(result)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("export: error:")
    assert ("does not exist" if case == "missing" else "no node 'pool_3'") in lines[0]
    assert "Traceback" not in result.stderr
    assert not base.exists() or not [p for p in base.rglob("*") if p.is_file()]


def test_cli_frozen_graph_takes_no_other_backbone(tmp_path: Path) -> None:
    for extra in (
        ["--weights", "random"],
        ["--layer", "mixed_7"],
        ["--backbone", "efficientnet_lite1"],
    ):
        result = run_cli("--frozen-graph", "x.pb", "--base-path", str(tmp_path), *extra)
        assert result.returncode == 2, result.stderr
        assert "--frozen-graph takes no" in result.stderr
    from export import __main__ as cli

    assert cli.FROZEN_GRAPH_BACKBONE == inception.NAME


def test_cli_if_missing_checks_the_inception_v3_folder(tmp_path: Path) -> None:
    existing = tmp_path / "inception_v3" / "4"
    existing.mkdir(parents=True)
    (existing / "saved_model.pb").write_bytes(b"placeholder")
    result = run_cli("--frozen-graph", "absent.pb", "--if-missing", "--base-path", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stdout
