"""The index matchers (`train --matcher knn|prototype`): trained, served from the run folder."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from integrity.manifest import verify
from matcher.classifier import Classifier
from matcher.errors import ModelLoadError
from matcher.factory import make_core
from tests.conftest import query_images
from train.pipeline import TrainConfig, train


@pytest.fixture(scope="module", params=["knn", "prototype"])
def index_run(request, demo, embedded_backend, tmp_path_factory, feature_cache):
    root = tmp_path_factory.mktemp(f"run-{request.param}")
    config = TrainConfig(
        data=demo.out / "train",
        out=root / "run",
        cache_dir=feature_cache,
        progress=False,
        matcher=request.param,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return request.param, train(config, embedded_backend)


def test_an_index_run_has_no_classifier_file_and_names_its_matcher(index_run) -> None:
    matcher, result = index_run
    folder = result.classifier_path
    assert folder.is_dir() and result.report["matcher"] == matcher
    assert not list(folder.glob("classifier.*"))
    manifest = verify(folder, "classifier")
    assert manifest.files["index.npz"].sha256 == result.report["classifier"]["sha256"]
    assert result.report["holdout"]["accuracy"] >= 0.9


async def test_the_run_folder_serves_ranked_labels_and_references(
    index_run, settings, embedded_backend, demo
) -> None:
    matcher, result = index_run
    core = make_core(
        settings.model_copy(update={"classifier": result.classifier_path}), embedded_backend
    )
    core.load()
    queries = query_images(demo)
    answers = [await core.match(path.read_bytes(), 0) for _, path in queries]
    await core.batcher.close()
    pairs = zip(queries, answers, strict=True)
    right = sum(answer.matches[0].label == label for (label, _), answer in pairs)
    assert right >= 0.9 * len(queries)
    for answer in answers:
        assert sum(m.score for m in answer.matches) == pytest.approx(1.0, abs=1e-5)
        assert answer.verdict is not None
        assert all(m.reference_id.startswith(f"{m.label}/") for m in answer.matches)
    description = core.describe()
    assert (
        description.classifier_type
        == {"knn": "NearestView", "prototype": "NearestPrototype"}[matcher]
    )
    assert description.model.classifier_sha256 == result.report["classifier"]["sha256"]


def test_the_index_matchers_rank_by_their_similarities(index_run, embedded_backend, demo) -> None:
    matcher, result = index_run
    classifier = Classifier.load(result.classifier_path)
    _, path = query_images(demo)[0]
    features = embedded_backend.features([path.read_bytes()])
    probabilities, found = classifier.rank(features)
    assert found is not None
    if matcher == "knn":
        assert probabilities.argmax() == found.similarity.argmax()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)


def test_a_svm_run_folder_loads_its_classifier_file(trained) -> None:
    from_folder = Classifier.load(trained.classifier_path.parent)
    assert from_folder.matcher == "svm"
    assert from_folder.info.sha256 == trained.report["classifier"]["sha256"]


def test_an_index_run_refuses_a_pinned_sha256(index_run) -> None:
    _, result = index_run
    with pytest.raises(ModelLoadError, match="through the folder's manifest"):
        Classifier.load(result.classifier_path, "0" * 64)


def test_a_folder_without_a_report_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="is not a training run folder"):
        Classifier.load(tmp_path)


async def test_items_are_added_and_removed_without_retraining_and_hot_reloaded(
    index_run, settings, embedded_backend, demo, tmp_path
) -> None:
    import asyncio
    import shutil

    from matcher.reload import ModelWatcher
    from train.edit import add_item, remove_item

    _, result = index_run
    run = tmp_path / "run"
    shutil.copytree(result.classifier_path, run)
    core = make_core(settings.model_copy(update={"classifier": run}), embedded_backend)
    core.load()
    watcher = ModelWatcher(core, run)
    label, path = query_images(demo)[0]

    async def settle() -> list[str]:
        # Two polls: a change is taken once it looked the same twice (a copy in progress).
        await asyncio.to_thread(watcher.check_once)
        outcome = await asyncio.to_thread(watcher.check_once)
        assert outcome.refused == {}
        return core.describe().labels

    def keypoint_photos() -> set[str]:
        catalogue = core.read_classifier().catalogue
        assert catalogue is not None and catalogue.verification is not None
        return {photo.split("/")[0] for photo in catalogue.verification.keypoints.ids}

    removed = remove_item(run, label)
    assert removed.photos == demo.train_views
    assert label not in await settle()
    answer = await core.match(path.read_bytes(), 1)
    assert answer.matches[0].label != label
    assert not (run / "references" / label).exists()
    # Its keypoints went with it: nothing is left to verify it by.
    assert label not in keypoint_photos()

    added = add_item(run, demo.out / "train" / label, embedded_backend)
    assert (added.photos, added.total_photos) == (
        demo.train_views,
        result.report["index"]["photos"],
    )
    assert label in await settle()
    answer = await core.match(path.read_bytes(), 1)
    await core.batcher.close()
    assert answer.matches[0].label == label
    # The added photos' keypoints joined the store: the item is verified by geometry again.
    assert label in keypoint_photos()
    assert answer.verdict is not None and answer.verdict.verified
    assert answer.matches[0].verified_reference_id.startswith(f"{label}/")
    assert (await core.reference(answer.matches[0].reference_id)).label == label
    report = json.loads((run / "report.json").read_text())
    assert [edit["what"] for edit in report["edits"]] == [
        f"removed {demo.train_views} photos of {label}",
        f"added {demo.train_views} photos of {label}",
    ]
    verify(run, "classifier")


def test_the_cli_refuses_to_add_to_an_svm_run_in_one_line(trained, demo) -> None:
    from tests.cli_output import run_module

    folder = demo.out / "train" / demo.labels[0]
    done = run_module("train", "add", str(folder), "--run", str(trained.classifier_path.parent))
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("train:")]
    assert len(lines) == 1 and "--matcher knn or prototype" in lines[0]


# ---- the linear matcher (large catalogues) and `--matcher auto` -----------------------------


@pytest.fixture(scope="module")
def linear_run(demo, embedded_backend, tmp_path_factory, feature_cache):
    config = TrainConfig(
        data=demo.out / "train",
        out=tmp_path_factory.mktemp("run-linear") / "run",
        cache_dir=feature_cache,
        progress=False,
        matcher="linear",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return train(config, embedded_backend)


def test_a_linear_run_writes_a_verified_skops_pipeline(linear_run) -> None:
    report = linear_run.report
    assert report["matcher"] == "linear" and report["matcher_choice"]["requested"] == "linear"
    assert linear_run.classifier_path.name == "classifier.skops"
    manifest = verify(linear_run.classifier_path.parent, "classifier")
    assert manifest.files["classifier.skops"].sha256 == report["classifier"]["sha256"]
    from matcher.linear import C_VALUES

    assert report["search"]["best_params"]["C"] in C_VALUES
    assert set(report["search"]["validation"]) == {str(c) for c in C_VALUES}
    assert report["holdout"]["accuracy"] >= 0.9


async def test_a_linear_run_folder_serves_ranked_labels_with_references(
    linear_run, settings, embedded_backend, demo
) -> None:
    loaded = Classifier.load(linear_run.classifier_path.parent)
    assert loaded.info.type_name == "Pipeline(StandardScaler, LogisticRegression)"
    assert loaded.catalogue is not None  # the index beside it still gives the references
    core = make_core(
        settings.model_copy(update={"classifier": linear_run.classifier_path.parent}),
        embedded_backend,
    )
    core.load()
    queries = query_images(demo)
    answers = [await core.match(path.read_bytes(), 0) for _, path in queries]
    await core.batcher.close()
    right = sum(
        answer.matches[0].label == label
        for (label, _), answer in zip(queries, answers, strict=True)
    )
    assert right >= 0.9 * len(queries)
    assert all(answer.matches[0].reference_id for answer in answers)


def test_auto_picks_knn_for_small_catalogues_and_linear_for_large_ones() -> None:
    from train.pipeline import LINEAR_MIN_PHOTOS, choose_matcher

    assert choose_matcher("auto", LINEAR_MIN_PHOTOS - 1) == "knn"
    assert choose_matcher("auto", LINEAR_MIN_PHOTOS) == "linear"
    assert choose_matcher("svm", 10 * LINEAR_MIN_PHOTOS) == "svm"


def test_the_default_matcher_is_auto_and_recorded(index_run) -> None:
    assert TrainConfig(data=Path("d"), out=Path("o")).matcher == "auto"
    _, result = index_run
    assert result.report["matcher_choice"]["rule"].startswith("auto: knn below")


def test_the_linear_matcher_chooses_c_on_a_validation_split() -> None:
    from matcher import linear

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16))
    labels = rng.integers(0, 5, 900)
    x = centres[labels] + rng.normal(size=(900, 16))
    names = [f"item{label}" for label in labels]
    fit = linear.fit_linear(x, names, c_values=(0.1, 1.0))
    assert fit.samples == 900 and fit.validation_samples == 135
    assert np.mean(fit.predict(x) == np.asarray(names)) >= 0.8
    assert max(fit.validation.values()) >= 0.8
