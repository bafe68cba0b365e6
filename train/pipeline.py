"""Labelled folder -> features (through the serving backend) -> matcher -> files.

The run folder gets the catalogue index (`index.npz`: every photo and its quarter turns) with
its thumbnails, for `--matcher svm` or `linear` the classifier (`classifier.skops`, or
`classifier.joblib` with `format="joblib"`), `report.json` (with a no-match threshold per
views mode, calibrated on held-out photos and field versions of them), `features.npz` and,
last, `manifest.json` with every file's sha256: the service refuses a classifier the manifest
does not vouch for.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix
from sklearn.model_selection import train_test_split

from integrity.manifest import write_manifest
from matcher import duplicates
from matcher.backends.base import FeatureExtractor
from matcher.calibration import TARGET_FALSE_REJECT
from matcher.classifier import INDEX_MATCHERS, file_sha256
from matcher.dataset import Dataset, DatasetError, default_outside, discover, outside_images
from matcher.extraction import Extraction, FeatureCache, extract_features, kept_mask_path
from matcher.geometry import CANDIDATE_LABELS, CANDIDATE_VIEWS, MIN_INLIERS, KeypointStore
from matcher.index import CatalogueIndex, Neighbours
from matcher.layout import (
    CLASSIFIER_FILES,
    DEFAULT_FORMAT,
    FEATURES_FILE,
    INDEX_FILE,
    KEYPOINTS_FILE,
    REFERENCES_DIR,
    REPORT_FILE,
)
from matcher.linear import LinearSearch, fit_linear
from matcher.ray_extraction import RayOptions
from matcher.settings import BackendSettings
from matcher.svm import SvmSearch, grid_search
from matcher.views import PLANS, TURNED, VIEW_MODES
from train.photo_views import Scorer, ViewsCalibration, calibrate_views, turned_features
from train.references import write_thumbnails
from train.report import (
    build_report,
    confusable_items,
    format_confusion,
    holdout_metrics,
    search_summary,
    write_report,
)
from train.runs import new_run
from train.verification import catalogue_keypoints

log = logging.getLogger(__name__)

#: The matchers `train --matcher` offers ("auto" picks one by the catalogue's size).
MATCHERS = ("auto", "svm", "linear", *INDEX_MATCHERS)
#: `--matcher auto`: up to this many training photos the nearest view (knn), which ranks
#: field photos best on `bench.quality` and takes `add` and `remove`; from this many the
#: linear matcher, which on Fashion-MNIST beat knn by 3 points at 60,000 photos and trains on
#: all of them in about a minute (docs/benchmarks.md, "Large catalogues").
LINEAR_MIN_PHOTOS = 10_000


def choose_matcher(requested: str, photos: int) -> str:
    """The matcher to train: `requested`, with "auto" decided by the number of photos."""
    if requested != "auto":
        return requested
    return "linear" if photos >= LINEAR_MIN_PHOTOS else "knn"


#: Where extraction streams the features while it runs (hidden; unlinked once mapped).
STREAM_FILE = f".{FEATURES_FILE}.extracting.npy"


@dataclass(frozen=True)
class TrainConfig:
    """How to train (the CLI's flags)."""

    data: Path
    out: Path
    cache_dir: Path | None = Path("cache/features")
    batch_size: int = 32
    folds: int = 10
    holdout: float = 0.2
    seed: int = 0
    jobs: int = -1
    progress: bool = True
    #: Also evaluate the HoG baselines on the same split, for the report's comparison.
    baselines: bool = False
    #: The SavedModel base path the features came from (recorded for the report's pictures).
    model_dir: Path | None = None
    #: The classifier file format: a key of CLASSIFIER_FILES.
    format: str = DEFAULT_FORMAT
    #: The SVM search: "auto" (a subsample above matcher.svm.SEARCH_SAMPLES) or "full".
    search: str = "auto"
    #: Photos of things outside the catalogue, for the no-match threshold; None looks for
    #: DATA/_outside/ (and calibrates without outside photos when there is none).
    outside: Path | None = None
    #: Correct matches the no-match threshold may reject on the held-out split.
    target_false_reject: float = TARGET_FALSE_REJECT
    #: "knn" (the nearest view's label), "prototype" (the nearest label mean), "svm" (the
    #: original's grid-searched SVM), "linear" (a logistic regression on every photo, for
    #: large catalogues) or "auto" (`choose_matcher`: knn, or linear from LINEAR_MIN_PHOTOS).
    #: knn and prototype rank by the index alone, with no classifier file, and take items
    #: added and removed without retraining; on `bench.quality` they ranked field photos as
    #: well as each other and better than the SVM.
    matcher: str = "auto"
    #: Index each photo turned by quarter turns too (`train.photo_views`): rotated field
    #: photos match, at three more backbone passes per photo.
    turned_views: bool = True
    #: Store every photo's keypoints and check answers by geometry (`matcher.geometry`):
    #: a verified item ranks first, and "no match" is judged on the evidence of both.
    verification: bool = True
    #: Extract the catalogue's features on a Ray cluster (`matcher.ray_extraction`) instead
    #: of in this process; the actors build their backend from `backend_settings`.
    ray: RayOptions | None = None
    #: The settings the backend passed to `train` was made from (needed with `ray`).
    backend_settings: BackendSettings | None = None


@dataclass(frozen=True)
class TrainResult:
    classifier_path: Path
    report_path: Path
    report: dict[str, Any]


def train(config: TrainConfig, backend: FeatureExtractor) -> TrainResult:
    """Run the whole training and write the classifier, its report and manifest under `out`."""
    if config.format not in CLASSIFIER_FILES:
        raise ValueError(f"unknown classifier format {config.format!r}")
    if config.matcher not in MATCHERS:
        raise ValueError(f"unknown matcher {config.matcher!r}; choose one of {MATCHERS}")
    dataset = discover(config.data)
    # Before the backbone runs: a photo under two labels is an error found in seconds.
    copies = duplicates.copies(dataset.paths)
    duplicates.refuse_mixed_labels(dataset, copies)
    if not backend.ready:
        backend.load()
    # Written aside and published whole (`train.runs`): a server watching `out`, and `out`
    # itself, see nothing of this run until it is complete, and nothing of it if it fails.
    with new_run(config.out) as run:
        return _train(config, backend, dataset, copies, run)


def _train(
    config: TrainConfig,
    backend: FeatureExtractor,
    dataset: Dataset,
    copies: list[list[int]],
    run: Path,
) -> TrainResult:
    info = backend.info
    cache = (
        FeatureCache(config.cache_dir, info.cache_key, info.feature_dim)
        if config.cache_dir
        else None
    )
    extraction = _extract(dataset.paths, backend, cache, config, run)
    for path, why in extraction.rejected.items():
        log.warning("skipped %s: %s", path, why)
    labels = [dataset.labels[i] for i in extraction.kept]
    _check_enough(labels)
    kept_paths = [dataset.paths[i] for i in extraction.kept]
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)),
        test_size=config.holdout,
        stratify=labels,
        random_state=config.seed,
    )
    leaked = duplicates.across_split(dataset, copies, extraction.kept, test_idx)
    for line in duplicates.describe(leaked):
        log.warning("%s", line)
    matcher = choose_matcher(config.matcher, len(train_idx))
    x_train, x_test = extraction.features[train_idx], extraction.features[test_idx]
    y_train = [labels[i] for i in train_idx]
    y_test = [labels[i] for i in test_idx]
    ids = [dataset.reference_id(i) for i in extraction.kept]
    turned = _turned(kept_paths, ids, labels, backend, cache, config)
    # The training views alone (and their turns): what held-out (and outside) photos are
    # measured against. The SVM learns the photos as they are; the index holds both.
    seen = CatalogueIndex.build(
        *_with_turned(x_train, y_train, [ids[i] for i in train_idx], turned, train_idx)
    )
    held_out = seen.search(x_test)
    started = time.perf_counter()
    search: SvmSearch | LinearSearch | None = None
    if matcher == "svm":
        search = grid_search(
            x_train, y_train, config.folds, config.jobs, config.seed, strategy=config.search
        )
        predicted = list(search.predict(x_test))
    elif matcher == "linear":
        search = fit_linear(x_train, y_train, config.seed)
        predicted = list(search.predict(x_test))
    else:
        predicted = index_predictions(matcher, seen, x_test, held_out)
    seconds = time.perf_counter() - started
    names = sorted(set(labels))
    holdout = holdout_metrics(names, y_test, predicted)
    outside_photos = _outside_photos(backend, cache, config)
    keypoints = (
        catalogue_keypoints(kept_paths, ids, config.progress) if config.verification else None
    )
    # Each views mode the server offers gets its threshold, on that mode's views.
    scorer = _scorer(matcher, seen, search.best_estimator_ if search else None)
    calibrating = calibration_sample(y_test, config.seed)
    training_ids = {ids[i] for i in train_idx}
    by_views = _calibrate(
        seen,
        [kept_paths[test_idx[i]] for i in calibrating],
        [y_test[i] for i in calibrating],
        outside_photos,
        scorer,
        matcher,
        backend,
        cache,
        config,
        # The held-out photos are checked on the training photos' keypoints only.
        keypoints.without(lambda photo: photo in training_ids) if keypoints else None,
    )
    no_match = by_views["whole"].calibration
    classifier_file = (
        _save_classifier(search.best_estimator_, run, config.format) if search else None
    )
    save_features(
        run / FEATURES_FILE,
        extraction.features,
        labels,
        [str(p.relative_to(config.data)) for p in kept_paths],
        test_idx,
    )
    # Every kept view is a reference: the held-out ones were only held out to measure.
    everything = np.arange(len(labels))
    index = CatalogueIndex.build(
        *_with_turned(extraction.features, labels, ids, turned, everything)
    )
    index.save(run / INDEX_FILE)
    if keypoints is not None:
        keypoints.save(run / KEYPOINTS_FILE)
    write_thumbnails(run, kept_paths, ids)
    # What GetModelInfo and every answer name: the classifier file, or the index it ranks by.
    sha256 = file_sha256(classifier_file or run / INDEX_FILE)
    baselines = None
    if config.baselines and isinstance(search, SvmSearch):
        # Imported only when asked for: HoG pulls in scikit-image.
        from train.baselines import BaselineOptions, compare_methods

        options = BaselineOptions(config.batch_size, config.folds, config.jobs, config.seed)
        baselines = compare_methods(
            kept_paths, labels, train_idx, test_idx, backend, search.best_estimator_, options
        )
    report = build_report(
        data={
            "root": str(config.data),
            "counts": dataset.counts(),
            "train": len(y_train),
            "holdout": len(y_test),
            "rejected": {str(p): why for p, why in extraction.rejected.items()},
            "features_computed": extraction.computed,
            "features_cached": len(extraction.kept) - extraction.computed,
            "features_file": FEATURES_FILE,
            # Where the catalogue's features were computed.
            "extraction": "ray" if config.ray else "local",
            # Ray: photos each node's actor answered, by node id.
            "extraction_nodes": extraction.nodes,
            # Copies of one photo under one label (`matcher.duplicates`): how many sets, and
            # those with a copy on each side of the split, which flatter the hold-out numbers.
            "duplicates": {"copies": len(copies), "across_split": leaked},
        },
        backbone=info,
        backend=backend.kind,
        # + how the search ran: strategy, samples searched, folds, calibration folds.
        search=_search_report(search, seconds),
        holdout=holdout,
        classifier_file=config.out / (CLASSIFIER_FILES[config.format] if search else INDEX_FILE),
        classifier_sha256=sha256,
        classifier_type=CLASSIFIER_TYPES.get(matcher) or INDEX_MATCHERS[matcher],
        model_dir=config.model_dir,
    )
    report["matcher"] = matcher
    report["matcher_choice"] = {
        "requested": config.matcher,
        "training_photos": len(y_train),
        "rule": f"auto: knn below {LINEAR_MIN_PHOTOS} photos, linear from there",
    }
    report["index"] = {
        "file": INDEX_FILE,
        "views": index.size,
        "photos": len(ids),
        "turned_views": bool(turned),
        "references": REFERENCES_DIR,
    }
    # How many held-out photos (of report.data.holdout) the thresholds were measured on.
    sampled = {"calibration_photos": len(calibrating)}
    report["no_match"] = no_match.as_dict() | sampled
    report["no_match_views"] = {
        mode: found.calibration.as_dict() | sampled for mode, found in by_views.items()
    }
    if keypoints is not None:
        report["verification"] = verification_report(keypoints, by_views, sampled)
    report["views"] = {
        mode: {
            "views_per_photo": len(PLANS[mode]),
            "holdout_accuracy": round(found.holdout_accuracy, 4),
            "field_accuracy": round(found.field_accuracy, 4),
        }
        for mode, found in by_views.items()
    }
    whole = by_views["whole"]
    report["confusable"] = confusable_items(
        names,
        # The held-out photos as they are and as field photos: where mix-ups show first.
        (
            np.asarray(holdout["confusion_matrix"])
            + confusion_matrix(whole.field_truth, whole.field_predicted, labels=names)
        ).tolist(),
        seen.prototypes(),
        whole.field_accuracy_by_label(),
        dataset.counts(),
    )
    if baselines is not None:
        report["baselines"] = baselines
    write_report(report, run / REPORT_FILE)
    # Last: it vouches for every file above (the HTML report/ drawn later is not covered).
    write_manifest(run, tool="train", kind="classifier")
    _print_summary(report, holdout, search.best_params_ if search else None)
    # The names a server is given: through `out`, which names this run once it is published.
    # For knn and prototype the run folder is what the server loads (--classifier FOLDER).
    classifier_path = config.out / classifier_file.name if classifier_file else config.out
    return TrainResult(classifier_path, config.out / REPORT_FILE, report)


#: What GetModelInfo and the report call each file matcher's model.
CLASSIFIER_TYPES = {
    "svm": "CalibratedClassifierCV(SVC)",
    "linear": "Pipeline(StandardScaler, LogisticRegression)",
}


def _search_report(search: SvmSearch | LinearSearch | None, seconds: float) -> dict[str, Any]:
    """How the matcher was chosen and fitted, for report.json's `search`."""
    if isinstance(search, SvmSearch):
        return search_summary(search, seconds) | search.plan.as_dict()
    if isinstance(search, LinearSearch):
        return {"best_params": search.best_params_, "seconds": round(seconds, 2)} | {
            key: value for key, value in search.as_dict().items() if key != "best_params_"
        }
    return {"seconds": round(seconds, 2)}


#: The most held-out photos the no-match thresholds are calibrated on. Each is cut into up to
#: 14 views, as is each of its field versions, and run through the backbone: on all 12,000
#: held-out photos of a 60,000-photo catalogue that would cost more than extraction itself,
#: while a threshold at a 2 % false-reject rate is pinned down by a few thousand matches.
CALIBRATION_PHOTOS = 1000


def calibration_sample(labels: list[str], seed: int) -> list[int]:
    """Positions of the held-out photos to calibrate on: all, or a stratified sample of
    CALIBRATION_PHOTOS (every label kept)."""
    if len(labels) <= CALIBRATION_PHOTOS:
        return list(range(len(labels)))
    keep, _ = train_test_split(
        np.arange(len(labels)),
        train_size=max(CALIBRATION_PHOTOS, len(set(labels))),
        stratify=labels,
        random_state=seed,
    )
    return sorted(int(i) for i in keep)


def index_predictions(
    matcher: str, seen: CatalogueIndex, x_test: np.ndarray, held_out: Neighbours
) -> list[str]:
    """The held-out labels an index matcher picks from the training views (`seen`);
    `held_out` is `seen.search(x_test)`."""
    if matcher == "knn":
        best = held_out.similarity.argmax(axis=1)
    else:
        best = seen.prototype_similarity(x_test).argmax(axis=1)
    return [seen.labels[i] for i in best]


def _outside_photos(
    backend: FeatureExtractor, cache: FeatureCache | None, config: TrainConfig
) -> list[Path]:
    """The readable photos of things outside the catalogue (DATA/_outside/ or --outside)."""
    outside_dir = config.outside or default_outside(config.data)
    if outside_dir is None:
        return []
    photos = outside_images(outside_dir)
    found = extract_features(photos, backend, cache, config.batch_size, progress=False)
    for path, why in found.rejected.items():
        log.warning("skipped outside photo %s: %s", path, why)
    return [photos[i] for i in found.kept]


def _calibrate(
    seen: CatalogueIndex,
    paths: list[Path],
    labels: list[str],
    outside: list[Path],
    scorer: Scorer,
    matcher: str,
    backend: FeatureExtractor,
    cache: FeatureCache | None,
    config: TrainConfig,
    keypoints: KeypointStore | None,
) -> dict[str, ViewsCalibration]:
    """The no-match threshold of each views mode (`train.photo_views.calibrate_views`)."""
    by_views = calibrate_views(
        VIEW_MODES,
        seen,
        (paths, labels),
        outside,
        scorer,
        matcher,
        backend,
        config.target_false_reject,
        cache,
        config.batch_size,
        config.progress,
        keypoints,
    )
    for mode, found in by_views.items():
        calibration = found.calibration
        rate = calibration.false_accept_rate
        log.info(
            "no-match threshold (%s) %.4f: rejects %.1f %% of %d correct held-out matches; %s",
            mode,
            calibration.threshold,
            100 * calibration.false_reject_rate,
            calibration.matched_holdout,
            f"accepts {100 * rate:.1f} % of {calibration.outside_photos} outside photos"
            if rate is not None
            else "no outside photos to measure false accepts (DATA/_outside/ or --outside)",
        )
        if found.rescue is not None:
            rescue = found.rescue
            log.info(
                "geometry (%s) verifies %.1f %% of correct held-out matches; rescue threshold "
                "%.4f: rejects %.1f %%%s",
                mode,
                100 * rescue.verified_share,
                rescue.threshold,
                100 * rescue.false_reject_rate,
                f", accepts {100 * rescue.false_accept_rate:.1f} % of outside photos"
                if rescue.false_accept_rate is not None
                else f", accepts {100 * rescue.impostor_accept_rate:.1f} % of "
                f"{rescue.impostor_photos} catalogue photos scored as outside ones"
                if rescue.impostor_accept_rate is not None
                else "",
            )
    return by_views


def verification_report(
    keypoints: KeypointStore, by_views: dict[str, ViewsCalibration], sampled: dict[str, int]
) -> dict[str, Any]:
    """report.json's `verification`: the rule the server applies and what it measured."""
    return {
        "file": KEYPOINTS_FILE,
        "method": "SIFT + ratio test + RANSAC similarity transform (OpenCV)",
        "min_inliers": MIN_INLIERS,
        "candidate_labels": CANDIDATE_LABELS,
        "candidate_views": CANDIDATE_VIEWS,
        "photos": len(keypoints.ids),
        "keypoints": keypoints.size,
        "views": {
            mode: found.rescue.as_dict() | sampled
            for mode, found in by_views.items()
            if found.rescue is not None
        },
    }


#: A run's turned reference views: their features [3 N, D] (photo by photo), labels and ids.
_Turned = tuple[np.ndarray, list[str], list[str]]


def _turned(
    paths: list[Path],
    ids: list[str],
    labels: list[str],
    backend: FeatureExtractor,
    cache: FeatureCache | None,
    config: TrainConfig,
) -> _Turned | None:
    if not config.turned_views:
        return None
    features, turned_ids = turned_features(
        paths, ids, backend, cache, config.batch_size, config.progress
    )
    return features, [label for label in labels for _ in TURNED], turned_ids


def _with_turned(
    features: np.ndarray,
    labels: list[str],
    ids: list[str],
    turned: _Turned | None,
    photos: np.ndarray,
) -> tuple[np.ndarray, list[str], list[str]]:
    """`features`, `labels` and `ids` of these `photos`, followed by their turned views."""
    if turned is None:
        return features, labels, ids
    rows = (np.asarray(photos)[:, None] * len(TURNED) + np.arange(len(TURNED))).ravel()
    turned_features_, turned_labels, turned_ids = turned
    return (
        np.concatenate([np.asarray(features, np.float32), turned_features_[rows]]),
        [*labels, *(turned_labels[r] for r in rows)],
        [*ids, *(turned_ids[r] for r in rows)],
    )


def _scorer(matcher: str, seen: CatalogueIndex, estimator: Any | None) -> Scorer:
    """What the matcher ranks the labels by, for views of held-out photos (`seen.labels`
    order: the SVM's classes are sorted as the index's labels are)."""
    if matcher == "knn":
        return lambda features: seen.search(features).similarity
    if matcher == "prototype":
        return seen.prototype_similarity
    assert estimator is not None  # svm and linear
    return lambda features: np.asarray(estimator.predict_proba(features))


def _extract(
    paths: list[Path],
    backend: FeatureExtractor,
    cache: FeatureCache | None,
    config: TrainConfig,
    run: Path,
) -> Extraction:
    """Features of `paths`, streamed to a file rather than held in memory while they grow.

    The file is unlinked as soon as it is mapped: the mapping keeps it readable for this run
    (the split, the search and features.npz read it), the disk space returns when the run
    ends, and an interrupted run leaves nothing behind in the folder.
    """
    stream = run / STREAM_FILE
    try:
        if config.ray is not None:
            from matcher.ray_extraction import extract_features_ray

            if config.backend_settings is None:
                raise ValueError("Ray extraction needs the backend's settings for its actors")
            info = backend.info
            return extract_features_ray(
                paths,
                config.backend_settings,
                info.cache_key,
                info.feature_dim,
                cache,
                config.ray,
                config.batch_size,
                progress=config.progress,
                out=stream,
            )
        return extract_features(
            paths, backend, cache, config.batch_size, progress=config.progress, out=stream
        )
    finally:
        stream.unlink(missing_ok=True)
        kept_mask_path(stream).unlink(missing_ok=True)


def _check_enough(labels: list[str]) -> None:
    counts = {label: labels.count(label) for label in set(labels)}
    small = sorted(label for label, n in counts.items() if n < 3)
    if len(counts) < 2 or small:
        raise DatasetError(
            "every label needs at least 3 readable images (2 to train, 1 to hold out); "
            f"too few for: {', '.join(small) or 'all'}"
        )


def _save_classifier(estimator: object, run: Path, file_format: str) -> Path:
    """Write the fitted classifier into the run folder (not served until it is published)."""
    path = run / CLASSIFIER_FILES[file_format]
    if file_format == "skops":
        import skops.io

        skops.io.dump(estimator, path)
    else:
        import joblib

        joblib.dump(estimator, path)
    return path


def _print_summary(
    report: dict[str, Any], holdout: dict[str, Any], params: dict[str, object] | None
) -> None:
    search = report["search"]
    if params is None:
        print(f"matcher: {report['matcher']} (held-out photos ranked by the training views)")
    elif report["matcher"] == "linear":
        print(
            f"linear matcher: {params} (validation accuracy by C: {search['validation']}, "
            f"{search['seconds']:.1f} s)"
        )
    else:
        print(
            f"best parameters: {params} (CV accuracy {search['best_cv_accuracy']:.3f}, "
            f"{search['folds']}-fold, {search['seconds']:.1f} s)"
        )
    print("confusion matrix on the held-out split:")
    print(format_confusion(holdout["labels"], holdout["confusion_matrix"]))
    print("classification report on the held-out split:")
    print(holdout["text"])
    print(
        f"hold-out accuracy: {holdout['accuracy']:.3f} "
        f"({report['data']['holdout']} images); classifier sha256 "
        f"{report['classifier']['sha256']}"
    )


def save_features(
    path: Path, features: np.ndarray, labels: list[str], paths: list[str], holdout: np.ndarray
) -> None:
    """Write the run's features with their labels, file paths and held-out flags."""
    is_holdout = np.zeros(len(labels), dtype=bool)
    is_holdout[holdout] = True
    np.savez_compressed(
        path,
        # No copy of a mapped float32 file: savez writes it in buffered chunks.
        features=np.asarray(features, dtype=np.float32),
        labels=np.asarray(labels),
        paths=np.asarray(paths),
        holdout=is_holdout,
    )
