"""`python -m export --precision bf16`: a backbone computing in bfloat16, checked on real photos.

The accuracy guard compares an fp32 and a bf16 export of EfficientNet-Lite0 with the same ImageNet
weights (`exported_model` is the fp32 one; the bf16 one is exported here through the CLI): on
real photos (scikit-image's and scikit-learn's sample photos, and the demo queries) the bf16
features keep a cosine similarity of at least 0.999 with fp32's, and the demo classifier, trained
on fp32 features, picks the same top label for at least 99% of the demo queries. Both figures
are printed (`pytest -s` shows them).

Also checked: the metadata says bf16, the signatures are unchanged (encoded images in, float32
features out), the SavedModel's own graph computes in bfloat16 (no runtime option needed), the
float32 layers are where matcher.backbones.precision puts them, and building a bf16 backbone leaves
the global Keras dtype policy alone. Speed is measured by bench/precision.py, not here.
"""

from __future__ import annotations

import io
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow.core.framework import types_pb2

from matcher.backbones import precision
from matcher.backbones.builder import ExportError, build_backbone
from matcher.layout import (
    FEATURE_MAPS_SIGNATURE,
    OUTPUT_KEY,
    SIGNATURE,
    read_model_info,
)
from tests.cli_output import run_module
from tests.conftest import query_images

LITE0_DIM = 1280
MIN_COSINE = 0.999
MIN_AGREEMENT = 0.99
#: scikit-image's bundled photos (colour and grey) and scikit-learn's two sample photos.
SKIMAGE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
    "coins",
    "moon",
    "page",
    "brick",
    "grass",
    "gravel",
    "cell",
    "clock",
    "text",
)


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")  # lossless: both models see the same pixels
    return buffer.getvalue()


def sample_photos() -> dict[str, bytes]:
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = {name: png(getattr(data, name)()) for name in SKIMAGE_PHOTOS}
    photos["stereo_motorcycle"] = png(data.stereo_motorcycle()[0])
    samples = load_sample_images()
    for filename, image in zip(samples.filenames, samples.images, strict=True):
        photos[Path(filename).stem] = png(image)
    return photos


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def ops_by_dtype(signature: tf.types.experimental.ConcreteFunction) -> dict[tuple[str, str], int]:
    """(op type, dtype name) -> count, over the signature's graph and every function it calls."""
    graph_def = signature.graph.as_graph_def()
    nodes = [*graph_def.node, *(n for f in graph_def.library.function for n in f.node_def)]
    counts: dict[tuple[str, str], int] = {}
    for node in nodes:
        if "T" in node.attr:
            key = (node.op, types_pb2.DataType.Name(node.attr["T"].type))
            counts[key] = counts.get(key, 0) + 1
    return counts


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Lite0 with the ImageNet weights of `exported_model`, exported in bf16 by the CLI."""
    base = tmp_path_factory.mktemp("bf16")
    result = run_module("export", "--precision", "bf16", "--base-path", str(base), timeout_s=None)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "computing in bf16" in result.stdout
    return base / "efficientnet_lite0" / "1"


@pytest.fixture(scope="module")
def bf16_backend(bf16_model: Path):
    from matcher.backends.embedded import EmbeddedBackend

    backend = EmbeddedBackend(bf16_model.parent)
    backend.load()
    return backend


# --- the export ---------------------------------------------------------------------------------


def test_metadata_says_bf16_and_nothing_else_changes(bf16_model: Path, exported_model) -> None:
    info = read_model_info(bf16_model)
    assert info.precision == "bf16"
    assert exported_model.info.precision == "fp32"
    assert read_model_info(exported_model.path).precision == "fp32"
    assert info == type(info)(**{**vars(exported_model.info), "precision": "bf16"})


def test_signatures_are_unchanged(bf16_model: Path, exported_model) -> None:
    fp32 = tf.saved_model.load(str(exported_model.path)).signatures
    bf16 = tf.saved_model.load(str(bf16_model)).signatures
    assert set(bf16) == set(fp32) == {SIGNATURE, FEATURE_MAPS_SIGNATURE}
    for name in fp32:
        assert bf16[name].structured_input_signature == fp32[name].structured_input_signature
        assert bf16[name].structured_outputs == fp32[name].structured_outputs
    (spec,) = bf16[SIGNATURE].structured_input_signature[1].values()
    assert (spec.dtype, spec.shape.as_list()) == (tf.string, [None])
    output = bf16[SIGNATURE].structured_outputs[OUTPUT_KEY]
    assert (output.dtype, output.shape.as_list()) == (tf.float32, [None, LITE0_DIM])
    for maps in bf16[FEATURE_MAPS_SIGNATURE].structured_outputs.values():
        assert maps.dtype == tf.float32


def test_the_savedmodel_itself_computes_in_bf16(bf16_model: Path) -> None:
    """The bfloat16 ops are in the saved graph: no runtime option is needed to get them."""
    counts = ops_by_dtype(tf.saved_model.load(str(bf16_model)).signatures[SIGNATURE])
    # Lite0 has 33 1x1/3x3 convolutions and 16 depthwise ones; 4 and 2 stay float32.
    assert counts.get(("Conv2D", "DT_BFLOAT16"), 0) >= 29
    assert counts.get(("DepthwiseConv2dNative", "DT_BFLOAT16"), 0) >= 14
    assert counts.get(("FusedBatchNormV3", "DT_BFLOAT16"), 0) >= 40
    # Keras' own BatchNormalization would show up as float32 Rsqrt; ours is FusedBatchNormV3.
    assert counts.get(("Rsqrt", "DT_FLOAT"), 0) == 0


# --- accuracy guard -----------------------------------------------------------------------------


def test_bf16_features_match_fp32_on_real_photos(
    embedded_backend, bf16_backend, demo, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = sample_photos()
    queries = [path.read_bytes() for _, path in query_images(demo)]
    on_photos = cosine(
        embedded_backend.features(list(photos.values())),
        bf16_backend.features(list(photos.values())),
    )
    on_queries = cosine(embedded_backend.features(queries), bf16_backend.features(queries))
    with capsys.disabled():  # the figures are the point: shown even without -s
        print(
            f"\nbf16 vs fp32 cosine: {len(photos)} sample photos min {on_photos.min():.5f} "
            f"mean {on_photos.mean():.5f}; {len(queries)} demo queries "
            f"min {on_queries.min():.5f} mean {on_queries.mean():.5f}"
        )
    worst = sorted(zip(on_photos, photos, strict=True))[:3]
    assert on_photos.min() >= MIN_COSINE, f"worst photos: {worst}"
    assert on_queries.min() >= MIN_COSINE


def test_classifier_top_label_agrees_on_demo_queries(
    embedded_backend, bf16_backend, demo, trained, capsys: pytest.CaptureFixture[str]
) -> None:
    from matcher.classifier import Classifier

    classifier = Classifier.load(trained.classifier_path)
    queries = [path.read_bytes() for _, path in query_images(demo)]
    fp32 = classifier.probabilities(embedded_backend.features(queries)).argmax(axis=1)
    bf16 = classifier.probabilities(bf16_backend.features(queries)).argmax(axis=1)
    agreement = float(np.mean(fp32 == bf16))
    with capsys.disabled():
        print(f"\nclassifier top label, bf16 vs fp32: {agreement:.1%} of {len(queries)} queries")
    assert agreement >= MIN_AGREEMENT


# --- building ----------------------------------------------------------------------------------


def test_bf16_build_leaves_the_global_policy_alone() -> None:
    before = keras.mixed_precision.global_policy().name
    bf16 = build_backbone("efficientnet_lite0", "random", precision="bf16")
    assert keras.mixed_precision.global_policy().name == before == "float32"
    fp32 = build_backbone("efficientnet_lite0", "random")
    assert {layer.dtype_policy.name for layer in fp32.model.layers} == {"float32"}
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")

    policies = {layer.name: layer.dtype_policy.name for layer in bf16.model.layers}
    prefix = [n for n in policies if n.startswith(("stem_", "block1a_", "block2a_"))]
    assert {policies[n] for n in prefix} == {"float32"}
    assert policies["avg_pool"] == "float32"
    rest = set(policies) - {*prefix, "avg_pool", "image"}
    assert {policies[n] for n in rest} == {precision.MIXED_POLICY}
    # The weights stay float32 variables; only the computation is bfloat16.
    assert {w.dtype for w in bf16.model.weights} == {"float32"}
    assert [layer.name for layer in bf16.model.layers] == [
        layer.name for layer in fp32.model.layers
    ]
    assert bf16.stage_names == fp32.stage_names
    maps = bf16.stages(tf.zeros([1, 224, 224, 3]))
    assert [m.dtype for m in maps] == [tf.float32, tf.bfloat16, tf.bfloat16, tf.bfloat16]


def test_inception_bf16_keeps_its_stem_float32_and_pools_any_layer_in_float32() -> None:
    backbone = build_backbone("inception_v3", "random", layer="mixed7", precision="bf16")
    convs = [c for c in backbone.model.layers if isinstance(c, keras.layers.Conv2D)]
    assert convs[0].dtype_policy.name == "float32"
    assert {c.dtype_policy.name for c in convs[1:]} == {precision.MIXED_POLICY}
    features = backbone.model(tf.zeros([1, 299, 299, 3]))
    assert (features.dtype, features.shape.as_list()) == (tf.float32, [1, 768])


def test_inference_batch_norm_matches_keras() -> None:
    rng = np.random.default_rng(0)
    keras_bn = keras.layers.BatchNormalization(epsilon=1e-3)
    keras_bn.build((None, 4, 4, 8))
    keras_bn.set_weights(
        [rng.uniform(0.5, 2, 8), rng.normal(size=8), rng.normal(size=8), rng.uniform(0.1, 3, 8)]
    )
    ours = precision.InferenceBatchNormalization.from_config(keras_bn.get_config())
    ours.build((None, 4, 4, 8))
    ours.set_weights(keras_bn.get_weights())
    x = tf.constant(rng.normal(size=(2, 4, 4, 8)), tf.float32)
    np.testing.assert_allclose(ours(x), keras_bn(x), rtol=1e-5, atol=1e-5)
    config = {**keras_bn.get_config(), "dtype": precision.MIXED_POLICY}
    mixed = precision.InferenceBatchNormalization.from_config(config)
    mixed.build((None, 4, 4, 8))
    mixed.set_weights(keras_bn.get_weights())
    out = mixed(x)
    assert out.dtype == tf.bfloat16
    np.testing.assert_allclose(tf.cast(out, tf.float32), keras_bn(x), rtol=2e-2, atol=2e-2)


def test_unknown_precision_and_frozen_graph_bf16_are_refused() -> None:
    from export.__main__ import parse_args

    with pytest.raises(ExportError, match="unknown precision 'fp16'"):
        build_backbone("efficientnet_lite0", "random", precision="fp16")
    with pytest.raises(SystemExit):
        parse_args(["--frozen-graph", "graph.pb", "--precision", "bf16"])
    with pytest.raises(SystemExit):
        parse_args(["--precision", "fp16"])
    assert parse_args(["--backbone", "inception_v3", "--precision", "bf16"]).precision == "bf16"
