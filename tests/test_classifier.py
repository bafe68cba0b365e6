"""Loading classifiers: verified before opened, old-style files still served."""

from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path

import grpc
import joblib
import numpy as np
import pytest
from sklearn.model_selection import GridSearchCV
from sklearn.svm import SVC

from matcher.v1 import matcher_pb2, matcher_pb2_grpc
from service.classifier import Classifier, file_sha256
from service.config import Settings
from service.errors import ModelLoadError
from service.server import make_core, start_server
from tests.conftest import query_images


class _RunsCode:
    """Unpickling this creates a marker file: what a hostile joblib file could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_file_without_a_recorded_digest_is_refused_unopened(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.joblib"
    path.write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(ModelLoadError, match="--classifier-sha256"):
        Classifier.load(path)
    with pytest.raises(ModelLoadError, match="refusing to load"):
        Classifier.load(path, expected_sha256="0" * 64)
    assert not marker.exists()


def test_a_tampered_file_does_not_match_its_report(trained, tmp_path: Path) -> None:
    copy = tmp_path / "classifier.joblib"
    copy.write_bytes(trained.classifier_path.read_bytes() + b"\0")
    (tmp_path / "report.json").write_text(trained.report_path.read_text())
    with pytest.raises(ModelLoadError, match="expected " + trained.report["classifier"]["sha256"]):
        Classifier.load(copy)


def test_a_report_for_another_file_is_not_used(trained, tmp_path: Path) -> None:
    other = tmp_path / "other.joblib"
    other.write_bytes(trained.classifier_path.read_bytes())
    (tmp_path / "report.json").write_text(trained.report_path.read_text())
    with pytest.raises(ModelLoadError, match="no recorded sha256"):
        Classifier.load(other)


def test_the_trained_classifier_loads_with_its_report(trained) -> None:
    classifier = Classifier.load(trained.classifier_path)
    assert classifier.info.sha256 == file_sha256(trained.classifier_path)
    assert classifier.info.feature_dim == 1280
    assert classifier.info.backbone == "efficientnet_lite0"
    assert classifier.info.holdout_accuracy == trained.report["holdout"]["accuracy"]


@pytest.fixture(scope="module")
def legacy_classifier(tmp_path_factory, demo, embedded_backend) -> Path:
    """A file as the original training code wrote it: GridSearchCV(SVC(probability=True))."""
    from train.dataset import discover
    from train.pipeline import features_for

    dataset = discover(demo.out / "train")
    keep = [i for i in range(len(dataset.paths)) if i % 4 == 0]  # a quarter is plenty
    features = features_for([dataset.paths[i] for i in keep], embedded_backend)
    labels = [dataset.labels[i] for i in keep]
    grid = {"C": [1, 10], "kernel": ["linear"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # probability=True, deprecated in 1.9
        search = GridSearchCV(SVC(probability=True), grid, cv=2).fit(features, labels)
    path = tmp_path_factory.mktemp("legacy") / "svm.joblib"
    joblib.dump(search.best_estimator_, path)
    return path


def test_an_old_style_file_is_described(legacy_classifier: Path) -> None:
    classifier = Classifier.load(legacy_classifier, file_sha256(legacy_classifier))
    assert classifier.info.type_name == "SVC"
    assert classifier.info.params == {"kernel": "linear", "C": classifier.info.params["C"]}
    assert classifier.info.holdout_accuracy is None
    probabilities = classifier.probabilities(np.zeros((2, 1280), np.float32))
    assert probabilities.shape == (2, 12)
    assert np.allclose(probabilities.sum(axis=1), 1.0)


async def test_an_old_style_file_is_served(legacy_classifier: Path, exported_model, demo) -> None:
    settings = Settings(
        port=0,
        model_dir=exported_model.path.parent,
        classifier=legacy_classifier,
        classifier_sha256=file_sha256(legacy_classifier),
    )
    running = await start_server(settings, make_core(settings))
    try:
        await running.load_models()
        async with grpc.aio.insecure_channel(f"localhost:{running.port}") as channel:
            stub = matcher_pb2_grpc.MatcherStub(channel)
            wrong = []
            for label, path in query_images(demo):
                request = matcher_pb2.ImageRequest(image=path.read_bytes(), top_k=1)
                response = await stub.Match(request, timeout=60)
                if response.matches[0].label != label:
                    wrong.append(path.name)
            # Trained on a quarter of the views with a tiny grid: most queries still match.
            assert len(wrong) <= len(query_images(demo)) // 10, wrong
            info = await stub.GetModelInfo(matcher_pb2.GetModelInfoRequest(), timeout=60)
            assert info.classifier_type == "SVC"
            assert not info.HasField("holdout_accuracy")
    finally:
        await running.stop(0)


def test_a_classifier_for_another_feature_size_is_refused(tmp_path: Path, exported_model) -> None:
    rng = np.random.default_rng(0)
    estimator = SVC(kernel="linear")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        estimator.set_params(probability=True)
        estimator.fit(rng.normal(size=(40, 2048)), ["a", "b"] * 20)
    path = tmp_path / "inception.joblib"
    joblib.dump(estimator, path)
    settings = Settings(
        model_dir=exported_model.path.parent,
        classifier=path,
        classifier_sha256=file_sha256(path),
    )
    with pytest.raises(ModelLoadError, match="expects 2048 features but backbone"):
        make_core(settings).load()


def test_report_json_records_what_the_service_checks(trained) -> None:
    report = json.loads(trained.report_path.read_text())
    assert report["classifier"]["file"] == "classifier.joblib"
    assert report["classifier"]["sha256"] == file_sha256(trained.classifier_path)
    assert report["backbone"]["name"] == "efficientnet_lite0"
    assert report["backbone"]["version"] == 1
