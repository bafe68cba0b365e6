"""Why CNN features: the original first attempt (HoG) on the same split, side by side.

Three methods answer the same held-out images: the trained CNN features + SVM, HoG + nearest
reference image by sum of absolute differences (the original first attempt), and HoG + the
same SVM grid search. Time per image is measured on a fresh pass over the held-out images
(features and classification, no cache), so the methods are compared as a query would be.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from matcher.backends.base import FeatureExtractor
from matcher.svm import grid_search
from train.hog import HogBackend, nearest_reference_sad


@dataclass(frozen=True)
class BaselineOptions:
    """How the baselines batch and search: the training run's own settings."""

    batch_size: int = 32
    folds: int = 10
    jobs: int = -1
    seed: int = 0


def _batched(backend: FeatureExtractor, images: Sequence[bytes], batch_size: int) -> np.ndarray:
    parts = [
        backend.features(images[i : i + batch_size]) for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(parts)


def _timed(answer: Callable[[], list[str]], count: int) -> tuple[list[str], float]:
    started = time.perf_counter()
    predicted = answer()
    return predicted, (time.perf_counter() - started) / count


def _row(method: str, truth: list[str], predicted: list[str], per_image_s: float) -> dict:
    accuracy = float(np.mean([t == p for t, p in zip(truth, predicted, strict=True)]))
    return {"method": method, "accuracy": accuracy, "seconds_per_image": per_image_s}


def compare_methods(
    paths: Sequence[Path],
    labels: Sequence[str],
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    backend: FeatureExtractor,
    classifier: Any,
    options: BaselineOptions,
) -> dict[str, dict[str, Any]]:
    """Accuracy and time per image of CNN + SVM, HoG + nearest SAD and HoG + SVM."""
    queries = [paths[i].read_bytes() for i in test_idx]
    truth = [labels[i] for i in test_idx]
    y_train = [labels[i] for i in train_idx]
    size = options.batch_size

    cnn, cnn_s = _timed(
        lambda: list(classifier.predict(_batched(backend, queries, size))), len(queries)
    )
    hog = HogBackend()
    hog.load()
    references = _batched(hog, [paths[i].read_bytes() for i in train_idx], size)
    sad, sad_s = _timed(
        lambda: nearest_reference_sad(references, y_train, _batched(hog, queries, size)),
        len(queries),
    )
    # Scored on labels only, so the bare SVC is searched (the same grid, no calibration).
    search = grid_search(
        references, y_train, options.folds, options.jobs, options.seed, calibrated=False
    )
    svm, svm_s = _timed(lambda: list(search.predict(_batched(hog, queries, size))), len(queries))
    name = backend.info.name
    return {
        "cnn_svm": _row(f"{name} features + SVM", truth, cnn, cnn_s),
        "hog_sad": _row("HoG + nearest reference (SAD)", truth, sad, sad_s),
        "hog_svm": _row("HoG + SVM (same grid)", truth, svm, svm_s),
    }
