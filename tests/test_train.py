"""Training: dataset layout, cached batched features, the grid search and its report."""

from __future__ import annotations

import math
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from integrity.manifest import verify
from matcher.classifier import Classifier
from matcher.dataset import DatasetError, discover
from matcher.svm import cv_folds, param_grid
from matcher.views import PLANS, VIEW_MODES
from tests import samples
from tests.cli_output import run_module
from train import pipeline
from train.field_photos import field_kinds
from train.pipeline import TrainConfig, train
from train.verification import TARGET_FALSE_ACCEPT


def small_dataset(demo, root: Path, labels: int = 3, per_label: int = 6) -> Path:
    """A copy of a few demo labels, for trainings that must be quick."""
    for label in demo.labels[:labels]:
        source = sorted((demo.out / "train" / label).iterdir())[:per_label]
        (root / label).mkdir(parents=True)
        for path in source:
            shutil.copy(path, root / label / path.name)
    return root


def test_grid_is_the_original_one() -> None:
    grid = param_grid()
    linear, rbf = grid
    assert linear == {"kernel": ["linear"], "C": [1, 10, 100, 1000]}
    assert rbf["gamma"] == [1e-2, 1e-3, 1e-4, 1e-5]
    assert len(linear["C"]) + len(rbf["C"]) * len(rbf["gamma"]) == 20


def test_folds_shrink_with_a_warning_when_a_class_is_small() -> None:
    assert cv_folds(["a"] * 30 + ["b"] * 30, 10) == 10
    with pytest.warns(UserWarning, match="3-fold cross-validation instead of 10"):
        assert cv_folds(["a"] * 30 + ["b"] * 3, 10) == 3


def test_report_of_the_demo_training(trained, demo) -> None:
    report = trained.report
    labels = sorted(demo.labels)
    assert report["search"]["folds"] == 5
    assert len(report["search"]["candidates"]) == 20
    assert [c["rank"] for c in report["search"]["candidates"]].count(1) >= 1
    holdout = report["holdout"]
    assert holdout["labels"] == labels
    matrix = holdout["confusion_matrix"]
    assert len(matrix) == len(labels) and all(len(row) == len(labels) for row in matrix)
    assert sum(map(sum, matrix)) == report["data"]["holdout"]
    # Stratified 80/20: every label is held out in equal measure.
    assert report["data"]["holdout"] == math.ceil(0.2 * len(labels) * demo.train_views)
    assert set(holdout["per_class"]) == set(labels)
    assert holdout["accuracy"] >= 0.9


def test_a_rerun_takes_every_feature_from_the_cache(demo, embedded_backend, tmp_path) -> None:
    data = small_dataset(demo, tmp_path / "data")
    config = TrainConfig(
        data=data, out=tmp_path / "out", cache_dir=tmp_path / "cache", folds=2, progress=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # fewer folds than asked: expected here
        first = train(config, embedded_backend)
        (data / demo.labels[0] / "renamed.jpg").write_bytes(
            next((data / demo.labels[0]).iterdir()).read_bytes()
        )
        second = train(config, embedded_backend)
    assert first.report["data"]["features_computed"] == 18
    assert second.report["data"]["features_computed"] == 0
    assert second.report["data"]["features_cached"] == 19


def test_without_outside_photos_the_catalogues_own_photos_stand_in_for_them(
    demo, embedded_backend, tmp_path
) -> None:
    data = small_dataset(demo, tmp_path / "data", labels=4)
    config = TrainConfig(
        data=data,
        out=tmp_path / "out",
        cache_dir=tmp_path / "cache",
        matcher="knn",
        progress=False,
    )
    report = train(config, embedded_backend).report
    for mode, found in report["verification"]["views"].items():
        photos = found["calibration_photos"]
        # Each held-out photo and its field versions but those on clutter (cut from the other
        # items' photos), each scored on the items it is not (the demo's items have no twins).
        versions = [kind for kind in field_kinds(photos) if kind != "small_on_clutter"]
        assert found["outside_photos"] == 0 and found["false_accept_rate"] is None, mode
        assert found["impostor_photos"] == photos + len(versions), mode
        assert found["impostor_accept_rate"] is not None, mode
        if found["set_by_impostors"]:
            assert found["impostor_accept_rate"] <= TARGET_FALSE_ACCEPT, mode


def test_features_stream_through_a_file_that_is_gone_once_mapped(
    demo, embedded_backend, tmp_path
) -> None:
    data = small_dataset(demo, tmp_path / "data")
    config = TrainConfig(data=data, out=tmp_path / "out", cache_dir=None, progress=False)
    paths = discover(data).paths
    run = tmp_path / "run"  # the run folder being written (train.runs.new_run's)
    run.mkdir()
    extraction = pipeline._extract(paths, embedded_backend, None, config, run)
    # Read from the disk, not held in memory; the file itself already unlinked.
    assert isinstance(extraction.features, np.memmap)
    assert list(run.iterdir()) == []
    expected = embedded_backend.features([path.read_bytes() for path in paths])
    np.testing.assert_allclose(extraction.features, expected, atol=1e-5)


def test_unreadable_files_are_skipped_and_reported(demo, embedded_backend, tmp_path, capsys):
    data = small_dataset(demo, tmp_path / "data")
    label = demo.labels[1]
    (data / label / "broken.jpg").write_bytes(samples.bad_images()["truncated_jpeg"])
    (data / label / "notes.jpg").write_bytes(b"not an image at all")
    config = TrainConfig(
        data=data, out=tmp_path / "out", cache_dir=None, folds=2, batch_size=4, progress=True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = train(config, embedded_backend)
    rejected = result.report["data"]["rejected"]
    assert sorted(Path(p).name for p in rejected) == ["broken.jpg", "notes.jpg"]
    assert "not a recognised image" in rejected[str(data / label / "notes.jpg")]
    assert result.report["data"]["train"] + result.report["data"]["holdout"] == 18
    captured = capsys.readouterr()
    assert "features" in captured.err  # the progress bar
    assert "confusion matrix" in captured.out and "label order: 0=" in captured.out


def test_the_run_folder_is_vouched_for_by_its_manifest(trained) -> None:
    folder = trained.classifier_path.parent
    assert trained.classifier_path.name == "classifier.skops"
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
    # Every kept photo has its thumbnail, listed (its turned views show the same one).
    thumbnails = [name for name in manifest.files if name.startswith("references/")]
    assert len(thumbnails) == trained.report["index"]["photos"]
    assert manifest.excluded == ("report",)  # the HTML report is redrawn at will


def test_the_report_records_the_index_and_the_no_match_threshold(trained, demo) -> None:
    index, no_match = trained.report["index"], trained.report["no_match"]
    # Every photo, and each turned by 90, 180 and 270 degrees.
    assert index == {
        "file": "index.npz",
        "views": 4 * 12 * demo.train_views,
        "photos": 12 * demo.train_views,
        "turned_views": True,
        "references": "references",
    }
    assert no_match["score"] == "nearest_reference_similarity"
    assert no_match["false_reject_rate"] <= no_match["target_false_reject"] == 0.02
    # The demo's train/_outside/ photos measured the false accepts.
    assert no_match["outside_photos"] == 4 * demo.outside_views
    assert no_match["false_accept_rate"] is not None and 0 <= no_match["false_accept_rate"] <= 1
    assert len(no_match["curve"]) == 41
    assert "_outside" not in trained.report["data"]["counts"]


def test_each_views_mode_has_its_own_threshold(trained) -> None:
    report = trained.report
    by_views = report["no_match_views"]
    assert sorted(by_views) == sorted(VIEW_MODES)
    assert by_views["whole"] == report["no_match"]
    held_out = report["data"]["holdout"]
    for mode, calibration in by_views.items():
        # The held-out photos and two field versions of each, less those ranked wrongly.
        assert 0.8 * 3 * held_out <= calibration["matched_holdout"] <= 3 * held_out, mode
        assert calibration["false_reject_rate"] <= 0.02
        assert calibration["outside_photos"] == report["no_match"]["outside_photos"]
        views = report["views"][mode]
        assert views["views_per_photo"] == len(PLANS[mode])
        assert views["holdout_accuracy"] >= 0.9 and 0 < views["field_accuracy"] <= 1


def test_joblib_format_replaces_the_skops_file(demo, embedded_backend, tmp_path) -> None:
    data = small_dataset(demo, tmp_path / "data")
    out = tmp_path / "out"
    config = TrainConfig(
        data=data,
        out=out,
        cache_dir=tmp_path / "cache",
        folds=2,
        progress=False,
        matcher="svm",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # fewer folds than asked: expected here
        first = train(config, embedded_backend)
        second = train(replace(config, format="joblib"), embedded_backend)
    assert first.classifier_path == out / "classifier.skops"
    assert second.classifier_path == out / "classifier.joblib"
    assert sorted(p.name for p in out.iterdir()) == [
        "classifier.joblib",
        "features.npz",
        "index.npz",
        "keypoints.npz",
        "manifest.json",
        "references",
        "report.json",
    ]
    top = sorted({name.split("/")[0] for name in verify(out).files})
    assert top == [
        "classifier.joblib",
        "features.npz",
        "index.npz",
        "keypoints.npz",
        "references",
        "report.json",
    ]
    assert second.report["classifier"]["file"] == "classifier.joblib"
    loaded = Classifier.load(second.classifier_path)
    assert loaded.info.sha256 == second.report["classifier"]["sha256"]
    assert loaded.info.holdout_accuracy == second.report["holdout"]["accuracy"]


def test_cli_format_defaults_to_skops() -> None:
    from train.__main__ import parse_args

    assert parse_args(["data"]).format == "skops"
    assert parse_args(["data", "--format", "joblib"]).format == "joblib"
    with pytest.raises(SystemExit):
        parse_args(["data", "--format", "pickle"])


def test_cli_engine_defaults_to_the_servers() -> None:
    from matcher.settings import BackendSettings
    from train.__main__ import parse_args

    default = parse_args(["data"])
    assert (default.engine, default.precision) == ("auto", "fp32")
    assert BackendSettings.model_fields["engine"].default == default.engine
    chosen = parse_args(["data", "--engine", "tensorflow", "--precision", "bf16"])
    assert (chosen.engine, chosen.precision) == ("tensorflow", "bf16")
    with pytest.raises(SystemExit):
        parse_args(["data", "--engine", "onnxruntime"])


def test_dataset_layout_is_one_folder_per_label(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.JPG").write_bytes(b"")
    (tmp_path / "a" / ".hidden.jpg").write_bytes(b"")
    (tmp_path / "a" / "readme.txt").write_bytes(b"")
    (tmp_path / "b" / "y.png").write_bytes(b"")
    (tmp_path / ".git").mkdir()
    dataset = discover(tmp_path)
    assert dataset.label_names == ["a", "b"]
    assert [p.name for p in dataset.paths] == ["x.JPG", "y.png"]


def test_an_empty_label_folder_is_refused_not_dropped(tmp_path: Path) -> None:
    for label in ("a", "b", "c"):
        (tmp_path / label).mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"")
    (tmp_path / "b" / "y.jpg").write_bytes(b"")
    (tmp_path / "c" / "notes.txt").write_bytes(b"")  # no image: the item would vanish
    (tmp_path / "_aside").mkdir()  # reserved folders may be empty
    with pytest.raises(DatasetError, match=r"label folder\(s\) c under .* hold no images"):
        discover(tmp_path)


def test_one_label_is_not_a_dataset(tmp_path: Path) -> None:
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "x.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match="at least 2"):
        discover(tmp_path)


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    result = run_module("train", str(tmp_path / "missing"), "--no-progress")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("train:")]
    assert lines == [
        f"train: error: {tmp_path / 'missing'} is not a folder; expected DATA/<label>/<image> files"
    ]
    assert "Traceback" not in result.stderr
