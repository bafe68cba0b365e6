"""Labelled folder -> features (through the serving backend) -> SVM grid search -> files."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from sklearn.model_selection import train_test_split

from service.backends.base import FeatureBackend
from service.classifier import REPORT_FILE, file_sha256
from train.dataset import DatasetError, discover
from train.features import FeatureCache, extract_features
from train.report import (
    build_report,
    format_confusion,
    holdout_metrics,
    search_summary,
    write_report,
)
from train.svm import best_params, grid_search

log = logging.getLogger(__name__)

CLASSIFIER_FILE = "classifier.joblib"
#: Every image's features, label, path and split, for the report's pictures.
FEATURES_FILE = "features.npz"


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


@dataclass(frozen=True)
class TrainResult:
    classifier_path: Path
    report_path: Path
    report: dict[str, Any]


def train(config: TrainConfig, backend: FeatureBackend) -> TrainResult:
    """Run the whole training and write `classifier.joblib` and `report.json` under `out`."""
    dataset = discover(config.data)
    if not backend.ready:
        backend.load()
    info = backend.info
    cache = FeatureCache(config.cache_dir, info.cache_key) if config.cache_dir else None
    extraction = extract_features(
        dataset.paths, backend, cache, config.batch_size, progress=config.progress
    )
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
    x_train, x_test = extraction.features[train_idx], extraction.features[test_idx]
    y_train = [labels[i] for i in train_idx]
    y_test = [labels[i] for i in test_idx]
    started = time.perf_counter()
    search = grid_search(x_train, y_train, config.folds, config.jobs, config.seed)
    seconds = time.perf_counter() - started
    names = sorted(set(labels))
    holdout = holdout_metrics(names, y_test, list(search.predict(x_test)))
    classifier_path = _save(search.best_estimator_, config.out / CLASSIFIER_FILE)
    sha256 = file_sha256(classifier_path)
    save_features(
        config.out / FEATURES_FILE,
        extraction.features,
        labels,
        [str(p.relative_to(config.data)) for p in kept_paths],
        test_idx,
    )
    baselines = None
    if config.baselines:
        from train.baselines import compare_methods

        baselines = compare_methods(
            kept_paths, labels, train_idx, test_idx, backend, search.best_estimator_, config
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
        },
        backbone=info,
        backend=backend.kind,
        search=search_summary(search, seconds),
        holdout=holdout,
        classifier_file=classifier_path,
        classifier_sha256=sha256,
        classifier_type="CalibratedClassifierCV(SVC)",
        model_dir=config.model_dir,
    )
    if baselines is not None:
        report["baselines"] = baselines
    report_path = config.out / REPORT_FILE
    write_report(report, report_path)
    _print_summary(report, holdout, best_params(search))
    return TrainResult(classifier_path, report_path, report)


def _check_enough(labels: list[str]) -> None:
    counts = {label: labels.count(label) for label in set(labels)}
    small = sorted(label for label, n in counts.items() if n < 3)
    if len(counts) < 2 or small:
        raise DatasetError(
            "every label needs at least 3 readable images (2 to train, 1 to hold out); "
            f"too few for: {', '.join(small) or 'all'}"
        )


def _save(estimator: object, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    joblib.dump(estimator, tmp)
    tmp.replace(path)  # a running server never sees a half-written file
    return path


def _print_summary(report: dict[str, Any], holdout: dict[str, Any], params: dict) -> None:
    search = report["search"]
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
        features=features.astype(np.float32),
        labels=np.asarray(labels),
        paths=np.asarray(paths),
        holdout=is_holdout,
    )


def features_for(paths: list[Path], backend: FeatureBackend) -> np.ndarray:
    """Features for a few files without caching (for scripts and tests)."""
    if not backend.ready:
        backend.load()
    return extract_features(paths, backend, None, progress=False).features
