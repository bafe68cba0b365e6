"""Feature layer choice at export, and the feature_maps signature of four stages."""

from __future__ import annotations

from pathlib import Path

import pytest
import tensorflow as tf

from export.savedmodel import export_backbone
from matcher.backbones.builder import ExportError, build_backbone
from matcher.layout import FEATURE_MAPS_SIGNATURE, INPUT_KEY, SIGNATURE, read_model_info
from tests import samples


def test_lite0_feature_maps_show_four_stages_early_to_late(exported_model) -> None:
    loaded = tf.saved_model.load(str(exported_model.path))
    maps = loaded.signatures[FEATURE_MAPS_SIGNATURE](**{INPUT_KEY: tf.constant([samples.jpeg()])})
    shapes = [tuple(maps[f"stage{i}"].shape) for i in range(1, 5)]
    assert shapes == [(1, 112, 112, 32), (1, 56, 56, 24), (1, 28, 28, 40), (1, 14, 14, 112)]
    info = read_model_info(exported_model.path)
    assert info.layer == "head_activation"
    assert len(info.stages) == 4 and info.stages[0] == "stem_activation"


@pytest.fixture(scope="module")
def mid_level(tmp_path_factory):
    backbone = build_backbone("efficientnet_lite0", "imagenet", layer="block6a_project_bn")
    return export_backbone(backbone, tmp_path_factory.mktemp("mid"), model_name="lite0_mid")


def test_a_named_layer_is_pooled_into_the_features(mid_level) -> None:
    info = read_model_info(mid_level.path)
    assert (info.layer, info.feature_dim) == ("block6a_project_bn", 192)
    loaded = tf.saved_model.load(str(mid_level.path))
    features = loaded.signatures[SIGNATURE](**{INPUT_KEY: tf.constant([samples.jpeg()] * 2)})
    assert tuple(features["features"].shape) == (2, 192)


def test_inception_stages_are_the_original_four() -> None:
    backbone = build_backbone("inception_v3", "random", layer="mixed7")
    assert backbone.stage_names == ("conv", "conv_1", "mixed_2", "mixed_7")
    shapes = [tuple(t.shape[1:]) for t in backbone.stages.outputs]
    assert shapes == [(149, 149, 32), (147, 147, 32), (35, 35, 288), (17, 17, 768)]
    assert (backbone.layer, backbone.feature_dim) == ("mixed7", 768)


def test_an_unknown_layer_names_some_that_exist() -> None:
    with pytest.raises(ExportError, match=r"has no layer 'nope'; e\.g\. stem_activation"):
        build_backbone("efficientnet_lite0", "random", layer="nope")


def test_the_service_reports_the_layer(tmp_path: Path, mid_level) -> None:
    from matcher.backends.embedded import EmbeddedBackend

    backend = EmbeddedBackend(mid_level.path.parent)
    backend.load()
    assert backend.info.layer == "block6a_project_bn"
    assert backend.info.feature_dim == 192


def test_several_layers_are_pooled_and_concatenated_in_order() -> None:
    """`--layer a,b`: multi-layer features, each layer's average pool side by side."""
    import keras
    import numpy as np

    layers = "block5c_add,block6d_add"
    both = build_backbone("efficientnet_lite0", "random", layer=layers, seed=3)
    assert (both.layer, both.feature_dim) == (layers, 112 + 192)
    pixels = np.random.default_rng(0).uniform(-1, 1, (2, 224, 224, 3)).astype(np.float32)
    features = both.model(pixels).numpy()
    for name, columns in (("block5c_add", slice(0, 112)), ("block6d_add", slice(112, 304))):
        maps = both.model.get_layer(name).output
        alone = keras.Model(both.model.input, maps)(pixels).numpy().mean(axis=(1, 2))
        np.testing.assert_allclose(features[:, columns], alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layer", ["block5c_add,block5c_add", " , ", "block5c_add,nope"])
def test_a_bad_layer_list_is_refused_by_name(layer: str) -> None:
    with pytest.raises(ExportError, match=r"distinct layers|no layer 'nope'"):
        build_backbone("efficientnet_lite0", "random", layer=layer)


def test_a_layer_pooled_over_a_grid_keeps_where_its_patterns_sit() -> None:
    """`NAME:2`: the mean of each cell of a 2 x 2 split, cell by cell, channels last."""
    import keras
    import numpy as np

    backbone = build_backbone("efficientnet_lite0", "random", layer="block6d_add:2", seed=3)
    assert (backbone.layer, backbone.feature_dim) == ("block6d_add:2", 4 * 192)
    pixels = np.random.default_rng(1).uniform(-1, 1, (1, 224, 224, 3)).astype(np.float32)
    maps = keras.Model(backbone.model.input, backbone.model.get_layer("block6d_add").output)
    grid = maps(pixels).numpy()[0]  # 7 x 7 x 192: cells of 3 x 3, the last row and column left
    cells = [grid[r : r + 3, c : c + 3].mean(axis=(0, 1)) for r in (0, 3) for c in (0, 3)]
    np.testing.assert_allclose(
        backbone.model(pixels).numpy()[0], np.concatenate(cells), rtol=1e-4, atol=1e-5
    )
