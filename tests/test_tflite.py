"""The on-device models (`python -m export tflite`) run by the LiteRT interpreter from PyPI
(`ai-edge-litert`): features against the SavedModel's `serving_default`, top-1 against the
server's Match on the demo queries, the metadata, the manifest; sizes and latency printed."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter

from export.__main__ import main as export_main
from export.tflite_model import LABELS_FILE, METADATA_FILE, OUTPUTS, export_tflite, read_metadata
from integrity.manifest import verify
from matcher.layout import SIGNATURE
from matcher.pixels import network_input
from tests.conftest import outside_queries, query_images
from tests.test_http_api import serving
from train.pipeline import TrainConfig, train

#: The issue's bars: feature cosine with the SavedModel.
MIN_COSINE = {"fp32": 0.999, "int8": 0.98}


@pytest.fixture(scope="module")
def knn_run(demo, embedded_backend, tmp_path_factory, feature_cache):
    config = TrainConfig(
        data=demo.out / "train",
        out=tmp_path_factory.mktemp("tflite-run") / "run",
        cache_dir=feature_cache,
        progress=False,
        matcher="knn",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return train(config, embedded_backend)


@pytest.fixture(scope="module")
def on_device(exported_model, knn_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("tflite") / "models"
    return export_tflite(exported_model.path, knn_run.report_path.parent, out)


@pytest.fixture(scope="module")
def savedmodel_features(exported_model, demo):
    serve = tf.saved_model.load(str(exported_model.path)).signatures[SIGNATURE]
    paths = [path for _, path in query_images(demo)] + outside_queries(demo)
    return {
        path: serve(images=tf.constant([path.read_bytes()]))["features"].numpy()[0]
        for path in paths
    }


def run_model(path, images, size: int) -> tuple[dict, float]:
    """Each image's outputs, and the mean seconds per image."""
    runner = Interpreter(model_path=str(path)).get_signature_runner()
    outputs, seconds = {}, 0.0
    for image in images:
        pixels = network_input(image.read_bytes(), size)[None]
        start = time.perf_counter()
        outputs[image] = runner(pixels=pixels)
        seconds += time.perf_counter() - start
    return outputs, seconds / len(images)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_the_files_metadata_and_manifest(on_device, knn_run, demo):
    folder = on_device.folder
    manifest = verify(folder)
    assert set(manifest.files) == {
        "matcher_fp32.tflite",
        "matcher_int8.tflite",
        LABELS_FILE,
        METADATA_FILE,
    }
    labels = (folder / LABELS_FILE).read_text().splitlines()
    items = (demo.out / "train").iterdir()
    assert labels == sorted(p.name for p in items if p.is_dir() and not p.name.startswith("_"))
    for precision, path in on_device.files.items():
        metadata = read_metadata(path.read_bytes())
        assert metadata["precision"] == precision
        assert metadata["labels"] == labels
        assert metadata["no_match_threshold"] == pytest.approx(
            knn_run.report["no_match"]["threshold"]
        )
        assert metadata["input"]["shape"] == [1, 224, 224, 3]
        signature = Interpreter(model_path=str(path)).get_signature_list()
        assert signature == {"serving_default": {"inputs": ["pixels"], "outputs": sorted(OUTPUTS)}}


@pytest.mark.parametrize("precision", ["fp32", "int8"])
async def test_features_and_top1_against_the_savedmodel_and_the_server(
    precision, on_device, savedmodel_features, settings, knn_run, demo
):
    queries = query_images(demo)
    images = [path for _, path in queries] + outside_queries(demo)
    outputs, seconds = run_model(on_device.files[precision], images, 224)
    cosines = [cosine(outputs[p]["features"][0], savedmodel_features[p]) for p in images]
    metadata = on_device.metadata
    # The server, with this run, looking at the whole photo as the phone does (and, as the
    # on-device model, with no geometric check of its answers).
    whole = settings.model_copy(
        update={"classifier": knn_run.report_path.parent, "views": "whole", "min_inliers": 0}
    )
    agree, verdicts_agree = 0, 0
    async with serving(whole) as running:
        for path in images:
            answer = await running.core.match(path.read_bytes(), 1)
            similarity = outputs[path]["similarity"][0]
            agree += metadata["labels"][int(np.argmax(similarity))] == answer.matches[0].label
            matched = float(similarity.max()) >= metadata["no_match_threshold"]
            verdicts_agree += answer.verdict is not None and matched == answer.verdict.matched
            # A softmax; int8 quantises it to steps of 1/256.
            total = outputs[path]["probability"][0].sum()
            assert total == pytest.approx(1.0, abs=1e-4 if precision == "fp32" else 1e-2)
    size_mb = on_device.files[precision].stat().st_size / 1e6
    print(
        f"{precision}: {size_mb:.1f} MB, {seconds * 1000:.1f} ms per image (LiteRT, this CPU), "
        f"feature cosine with serving_default min {min(cosines):.5f} mean {np.mean(cosines):.5f}, "
        f"top-1 as the server {agree}/{len(images)}, verdict as the server "
        f"{verdicts_agree}/{len(images)}"
        + (
            f", {on_device.float_layers[0]} of {on_device.float_layers[1]} layers float"
            if precision == "int8"
            else ""
        )
    )
    if precision == "fp32":
        assert min(cosines) >= MIN_COSINE["fp32"]
        assert agree == len(images)
        assert verdicts_agree >= len(images) - 1  # one photo may sit on the threshold
    else:
        # int8 moves a few photos' features more than the rest: the bar is on the typical one.
        assert np.median(cosines) >= MIN_COSINE["int8"]
        assert min(cosines) >= 0.9
        assert agree >= 0.95 * len(images)


def test_the_cli_writes_one_precision_and_refuses_an_svm_run(
    exported_model, trained, knn_run, tmp_path, capsys
):
    out = tmp_path / "fp32-only"
    argv = ["tflite", "--model-dir", str(exported_model.path.parent), "--classifier"]
    assert (
        export_main(
            [*argv, str(knn_run.report_path.parent), "--out", str(out), "--precision", "fp32"]
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["matcher_fp32.tflite", LABELS_FILE, METADATA_FILE, "manifest.json"]
    )
    assert "fp32:" in capsys.readouterr().out
    assert export_main([*argv, str(trained.report_path.parent), "--out", str(tmp_path / "x")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("export tflite: error: ") and "--matcher knn or prototype" in error
    assert len(error.splitlines()) == 1
