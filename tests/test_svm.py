"""The SVM search: its plan by catalogue size, the choice by CV, the refit and calibration."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from sklearn.calibration import CalibratedClassifierCV
from sklearn.model_selection import ParameterGrid
from sklearn.svm import SVC

from matcher.svm import (
    SEARCH_SAMPLES,
    grid_search,
    param_grid,
    plan_search,
    stratified_subsample,
)
from train.__main__ import parse_args


def clustered(samples: int, labels: int, dim: int = 16, seed: int = 0):
    """Overlapping non-negative clusters, one per label, in equal measure."""
    rng = np.random.default_rng(seed)
    centres = rng.gamma(0.5, 1.0, size=(labels, dim))
    y = np.arange(samples) % labels
    x = centres[y] + 0.6 * rng.gamma(0.5, 1.0, size=(samples, dim))
    return x.astype(np.float32), [f"item_{i:02d}" for i in y]


def candidates() -> list[dict]:
    """Every parameter set of the grid, as SVC keyword arguments."""
    return list(ParameterGrid(param_grid()))


def test_a_small_catalogue_is_searched_whole_with_ten_folds() -> None:
    labels = [f"l{i % 12}" for i in range(800)]
    plan = plan_search(labels)
    assert (plan.strategy, plan.samples, plan.search_samples) == ("grid", 800, 800)
    assert (plan.folds, plan.calibration_folds) == (10, 5)


def test_a_large_catalogue_is_searched_on_a_subsample_with_fewer_folds() -> None:
    labels = [f"l{i % 12}" for i in range(16_000)]
    plan = plan_search(labels)
    assert plan.strategy == "subsample-grid"
    assert plan.samples == 16_000
    assert abs(plan.search_samples - SEARCH_SAMPLES) <= 12  # rounding per label
    assert (plan.folds, plan.calibration_folds) == (5, 3)
    # Asked for, the full search keeps every sample and the folds asked for.
    full = plan_search(labels, folds=10, strategy="full")
    assert (full.strategy, full.search_samples, full.folds) == ("grid", 16_000, 10)


def test_an_unknown_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown search strategy 'fast'"):
        plan_search(["a", "b"] * 10, strategy="fast")


def test_the_subsample_keeps_proportions_and_every_label() -> None:
    labels = ["big"] * 900 + ["mid"] * 300 + ["rare"] * 4
    chosen = stratified_subsample(labels, 300, floor=5, seed=0)
    counts = Counter(labels[i] for i in chosen)
    assert counts == {"big": 224, "mid": 75, "rare": 4}  # 300/1204 of each, all 4 rare ones
    assert len(set(chosen)) == len(chosen)
    assert list(chosen) == sorted(chosen)


def test_cv_chooses_from_the_grid_and_the_winner_is_refit_on_every_sample() -> None:
    x, y = clustered(240, 4)
    search = grid_search(x, y, folds=10, jobs=1, search_samples=80)
    assert search.plan.strategy == "subsample-grid"
    assert search.plan.search_samples == 80 and search.plan.folds == 10
    assert search.n_splits_ == 10
    assert len(search.cv_results_["params"]) == len(candidates()) == 20
    assert search.best_params_ in candidates()
    best = int(np.argmax(search.cv_results_["mean_test_score"]))
    assert search.cv_results_["params"][best] == search.best_params_
    assert search.best_score_ == pytest.approx(search.cv_results_["mean_test_score"][best])
    served = search.best_estimator_
    assert isinstance(served, CalibratedClassifierCV) and not served.ensemble
    (calibrated,) = served.calibrated_classifiers_
    svc = calibrated.estimator
    assert isinstance(svc, SVC)
    assert svc.get_params() | search.best_params_ == svc.get_params()
    assert svc.shape_fit_ == (240, 16)  # every sample, not the 80 searched


def test_probabilities_are_calibrated_over_every_label() -> None:
    x, y = clustered(150, 3)
    search = grid_search(x[:120], y[:120], folds=5, jobs=1)
    assert search.plan.strategy == "grid" and search.plan.calibration_folds == 5
    queries, truth = x[120:], y[120:]  # not trained on
    proba = search.predict_proba(queries)
    assert proba.shape == (30, 3)
    assert np.allclose(proba.sum(axis=1), 1.0)
    assert list(search.best_estimator_.classes_) == ["item_00", "item_01", "item_02"]
    assert np.mean(search.predict(queries) == np.asarray(truth)) >= 0.8


def test_the_uncalibrated_search_refits_the_bare_svc() -> None:
    x, y = clustered(120, 3)
    search = grid_search(x, y, folds=5, jobs=1, calibrated=False)
    assert isinstance(search.best_estimator_, SVC)
    assert search.plan.calibration_folds == 0


def test_the_cli_passes_the_search_strategy() -> None:
    assert parse_args(["data"]).search == "auto"
    assert parse_args(["data", "--search", "full"]).search == "full"


def test_the_report_records_how_the_search_ran(trained) -> None:
    search = trained.report["search"]
    train_samples = trained.report["data"]["train"]
    assert search["strategy"] == "grid"  # the demo is small: every sample searched
    assert search["samples"] == search["search_samples"] == train_samples
    assert search["folds"] == 5 and search["calibration_folds"] == 5
    assert len(search["candidates"]) == 20
    assert search["best_params"] in candidates()
