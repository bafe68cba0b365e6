"""Loading classifiers: verified before opened (pin or manifest), skops without running code,
old-style joblib files still served."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path

import grpc
import joblib
import numpy as np
import pytest
import skops.io
from sklearn.calibration import CalibratedClassifierCV
from sklearn.model_selection import GridSearchCV
from sklearn.svm import SVC

from integrity.manifest import MANIFEST_FILE, read_manifest, verify, write_manifest
from matcher.classifier import SKOPS_ALLOWED_TYPES, Classifier, file_sha256
from matcher.errors import ModelLoadError
from matcher.factory import make_core
from matcher.v1 import matcher_pb2, matcher_pb2_grpc
from service.config import Settings
from service.server import start_server
from tests.conftest import query_images


class _RunsCode:
    """Unpickling this creates a marker file: what a hostile joblib file could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _RunsCodeOnRestore:
    """Restoring this creates a marker file: what a hostile type inside a skops file could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __setstate__(self, state: dict) -> None:
        Path(state["marker"]).touch()
        self.__dict__.update(state)


def run_copy(trained, tmp_path: Path) -> Path:
    """A private copy of the trained run folder (classifier, report.json, manifest...)."""
    folder = tmp_path / "run"
    shutil.copytree(trained.classifier_path.parent, folder)
    return folder / trained.classifier_path.name


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_joblib_file_nothing_vouches_for_is_refused_unopened(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.joblib"
    path.write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(ModelLoadError, match=re.escape(f"python -m integrity write {tmp_path}`")):
        Classifier.load(path)
    with pytest.raises(ModelLoadError, match=r"--classifier-sha256 is 0{64}; refusing to load"):
        Classifier.load(path, expected_sha256="0" * 64)
    # Swapped in after the folder's manifest was written: the manifest does not vouch for it.
    path.write_bytes(b"the file that was checked")
    write_manifest(path.parent)
    path.write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(ModelLoadError, match=r"hostile\.joblib has sha256"):
        Classifier.load(path)
    assert not marker.exists()


def test_the_trained_folder_verifies_against_its_manifest(trained) -> None:
    folder = trained.classifier_path.parent
    manifest = verify(folder, "classifier")
    top = sorted({name.split("/")[0] for name in manifest.files})
    assert top == [
        "classifier.skops",
        "features.npz",
        "index.npz",
        "keypoints.npz",
        "references",
        "report.json",
    ]
    assert manifest.files["classifier.skops"].sha256 == file_sha256(trained.classifier_path)
    assert (manifest.kind, manifest.tool) == ("classifier", "train")


def test_a_tampered_classifier_is_refused_naming_both_digests(trained, tmp_path: Path) -> None:
    path = run_copy(trained, tmp_path)
    flip_byte(path)
    with pytest.raises(ModelLoadError) as caught:
        Classifier.load(path)
    message = str(caught.value)
    assert f"{path} has sha256 {file_sha256(path)}" in message
    assert trained.report["classifier"]["sha256"] in message
    assert "refusing to load" in message


def test_a_tampered_report_is_refused_too(trained, tmp_path: Path) -> None:
    path = run_copy(trained, tmp_path)
    report = json.loads((path.parent / "report.json").read_text())
    report["backbone"]["name"] = "inception_v3"
    (path.parent / "report.json").write_text(json.dumps(report))
    with pytest.raises(ModelLoadError, match=r"report\.json has sha256"):
        Classifier.load(path)


def test_a_file_the_manifest_does_not_list_is_refused(trained, tmp_path: Path) -> None:
    path = run_copy(trained, tmp_path)
    other = path.with_name("other.skops")
    shutil.copy(path, other)
    with pytest.raises(ModelLoadError, match=r"other\.skops is not listed in"):
        Classifier.load(other)


def test_a_pin_replaces_the_manifest(trained, tmp_path: Path) -> None:
    path = run_copy(trained, tmp_path)
    (path.parent / MANIFEST_FILE).unlink()
    classifier = Classifier.load(path, file_sha256(path).upper())
    assert classifier.info.sha256 == file_sha256(path)
    assert classifier.info.holdout_accuracy == trained.report["holdout"]["accuracy"]


def test_a_report_the_manifest_does_not_cover_is_not_read(trained, tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    path = folder / trained.classifier_path.name
    shutil.copy(trained.classifier_path, path)
    write_manifest(folder)
    shutil.copy(trained.report_path, folder / "report.json")  # added later, unlisted
    classifier = Classifier.load(path)
    assert classifier.info.holdout_accuracy is None
    assert classifier.info.backbone is None


def test_the_trained_classifier_loads_with_its_report(trained) -> None:
    classifier = Classifier.load(trained.classifier_path)
    assert classifier.info.sha256 == file_sha256(trained.classifier_path)
    assert classifier.info.feature_dim == 1280
    assert classifier.info.backbone == "efficientnet_lite0"
    assert classifier.info.holdout_accuracy == trained.report["holdout"]["accuracy"]
    assert classifier.info.type_name == "CalibratedClassifierCV(SVC)"


def test_an_unknown_suffix_is_refused(trained, tmp_path: Path) -> None:
    path = tmp_path / "classifier.bin"
    shutil.copy(trained.classifier_path, path)
    with pytest.raises(ModelLoadError, match=r"unknown format \.bin; expected \.skops or"):
        Classifier.load(path, file_sha256(path))


@pytest.fixture(scope="module")
def demo_features(demo, embedded_backend) -> tuple[np.ndarray, list[str]]:
    """Real features and labels of a quarter of the demo training views."""
    from matcher.dataset import discover
    from matcher.extraction import extract_features

    dataset = discover(demo.out / "train")
    keep = [i for i in range(len(dataset.paths)) if i % 4 == 0]
    paths = [dataset.paths[i] for i in keep]
    features = extract_features(paths, embedded_backend, None, progress=False).features
    return features, [dataset.labels[i] for i in keep]


def skops_file(estimator: object, folder: Path) -> Path:
    """`estimator` written as train writes it: a .skops file and the folder's manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "classifier.skops"
    skops.io.dump(estimator, path)
    write_manifest(folder)
    return path


def test_skops_round_trips_the_calibrated_svm_exactly(demo_features, tmp_path: Path) -> None:
    features, labels = demo_features
    for kernel, gamma in (("linear", "scale"), ("rbf", 1e-3)):
        estimator = CalibratedClassifierCV(
            SVC(kernel=kernel, C=10, gamma=gamma), ensemble=False, cv=2
        )
        estimator.fit(features, labels)
        loaded = Classifier.load(skops_file(estimator, tmp_path / kernel))
        # Through the same code path (the service's own probabilities), bit for bit.
        in_memory = Classifier(estimator, loaded.info)
        assert np.array_equal(loaded.probabilities(features), in_memory.probabilities(features))
        assert loaded.labels == list(estimator.classes_)
        assert loaded.info.params["kernel"] == kernel


def test_skops_round_trips_an_old_style_svm_exactly(legacy_classifier, demo_features, tmp_path):
    features, _ = demo_features
    estimator = joblib.load(legacy_classifier)
    loaded = Classifier.load(skops_file(estimator, tmp_path / "legacy"))
    in_memory = Classifier(estimator, loaded.info)
    assert np.array_equal(loaded.probabilities(features), in_memory.probabilities(features))
    assert loaded.info.type_name == "SVC"


@pytest.mark.parametrize("hook", ["object", "function"])
def test_a_skops_file_with_an_untrusted_type_is_refused_unopened(
    demo_features, tmp_path: Path, hook: str
) -> None:
    features, labels = demo_features
    marker = tmp_path / "pwned"
    estimator = CalibratedClassifierCV(SVC(kernel="linear"), ensemble=False, cv=2).fit(
        features, labels
    )
    estimator.hook = _RunsCodeOnRestore(marker) if hook == "object" else os.system
    untrusted = f"{__name__}._RunsCodeOnRestore" if hook == "object" else "posix.system"
    # The manifest vouches for the bytes; the types are still refused.
    path = skops_file(estimator, tmp_path / "run")
    assert "classifier.skops" in read_manifest(path.parent).files
    with pytest.raises(
        ModelLoadError, match=f"does not need, refused unopened: {re.escape(untrusted)}$"
    ):
        Classifier.load(path)
    assert not marker.exists()
    assert untrusted not in SKOPS_ALLOWED_TYPES


def test_a_corrupt_skops_file_is_a_load_error(tmp_path: Path) -> None:
    path = tmp_path / "classifier.skops"
    path.write_bytes(b"PK\x03\x04 not really a zip file")
    with pytest.raises(ModelLoadError, match="is not a readable skops file"):
        Classifier.load(path, file_sha256(path))


@pytest.fixture(scope="module")
def legacy_classifier(tmp_path_factory, demo_features) -> Path:
    """A file as the original training code wrote it: GridSearchCV(SVC(probability=True))."""
    features, labels = demo_features
    grid = {"C": [1, 10], "kernel": ["linear"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # probability=True, deprecated in 1.9
        # random_state: Platt scaling's internal split, else the file differs run to run.
        search = GridSearchCV(SVC(probability=True, random_state=0), grid, cv=2).fit(
            features, labels
        )
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
        metrics_port=0,
        model_dir=exported_model.path.parent,
        classifier=legacy_classifier,
        classifier_sha256=file_sha256(legacy_classifier),
        # The photo alone: this is about reading the old file, not about views (whose mean the
        # SVM ranks by without an index; tests/test_multiview.py).
        views="whole",
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
    assert report["classifier"]["file"] == "classifier.skops"
    assert report["classifier"]["sha256"] == file_sha256(trained.classifier_path)
    assert report["backbone"]["name"] == "efficientnet_lite0"
    assert report["backbone"]["version"] == 1
    assert (report["backbone"]["engine"], report["backbone"]["precision"]) == ("openvino", "fp32")
