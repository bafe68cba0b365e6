"""The classifier search: an SVM grid over kernels, C and gamma, chosen by cross-validation and
served as calibrated probabilities, at a cost that grows gently with the number of samples.

scikit-learn 1.9 deprecates `SVC(probability=True)`; its replacement,
`CalibratedClassifierCV(SVC(...), ensemble=False)`, calibrates one SVM's scores into
probabilities. How the search is shaped, and why (figures in docs/benchmarks.md, "Training"):

* The grid is searched over the bare SVC, scored on accuracy, and only the winner is
  calibrated. Calibrating every candidate in every fold, as the first version did, costs one
  SVC fit per calibration fold plus one (6 instead of 1) per candidate and fold, for the same
  choice: the sigmoids map each class's scores to probabilities and rarely move the argmax.
* Up to `SEARCH_SAMPLES` training samples the grid is searched on all of them ("grid"). Above,
  it is searched on a stratified subsample of that size and the winner is refit, and
  calibrated, on every sample ("subsample-grid"). SVC training grows faster than the square of
  the samples (4.1x for 2x measured), so a full-size search at 20k samples takes hours, while
  what C and gamma depend on, the scale of the features and how much the labels overlap, a few
  thousand samples already show; the grid's steps are 10x apart.
* The folds fall as the searched set grows (`folds_for`): every sample is validated exactly
  once whatever the fold count, so with thousands of samples 5 folds rank the candidates on
  as many held-out predictions as 10 do, at half the fits on slightly smaller training parts.
  Small sets keep 10 folds, where each left-out sample counts.
* The calibration folds fall from 5 to 3 for large sets (`CALIBRATION_FOLDS_LARGE`): each
  sigmoid has two parameters, which thousands of out-of-fold scores pin down with 3 folds, and
  with a quadratic fit cost 3 folds plus the final fit cost 2.3 fits on all samples, 5 folds
  4.2 (this is most of the time at 20k samples).
* `SVC(cache_size=...)`: libsvm caches kernel rows of each one-vs-one problem; a catalogue of
  few labels makes problems of thousands of samples whose rows outgrow the 200 MB default (an
  8,000-sample pair needs 256 MB), and a recomputed row costs a pass over the pair's samples
  at 1280 multiply-adds each. Not measured here: 12-label problems never fill 200 MB.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.svm import SVC

log = logging.getLogger(__name__)

C_VALUES = (1, 10, 100, 1000)
GAMMA_VALUES = (1e-2, 1e-3, 1e-4, 1e-5)
#: Folds of the probability calibration of the chosen SVC.
CALIBRATION_FOLDS = 5
#: ... and of a large training set (more than `LARGE_SAMPLES`).
CALIBRATION_FOLDS_LARGE = 3
LARGE_SAMPLES = 5000
#: The most samples the grid is searched on when `strategy="auto"`; above, a subsample.
SEARCH_SAMPLES = 2500
#: libsvm's kernel cache per SVC fit, in MB (default 200).
CACHE_MB = 500
#: "auto": the grid on all samples up to SEARCH_SAMPLES, else on a subsample of that size;
#: "full": the grid on every sample with the folds asked for, whatever the size.
STRATEGIES = ("auto", "full")


@dataclass(frozen=True)
class SearchPlan:
    """How one search runs; recorded in the training report."""

    #: "grid" (every training sample searched) or "subsample-grid".
    strategy: str
    #: Training samples; the chosen SVC is refit and calibrated on all of them.
    samples: int
    #: Samples the cross-validated grid search ran on.
    search_samples: int
    folds: int
    #: Folds of the calibration of the winner (0: not calibrated).
    calibration_folds: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def param_grid() -> list[dict[str, list[Any]]]:
    """The SVC grid: linear C in {1, 10, 100, 1000}; RBF C x gamma in {1e-2, ..., 1e-5}."""
    return [
        {"kernel": ["linear"], "C": list(C_VALUES)},
        {"kernel": ["rbf"], "C": list(C_VALUES), "gamma": list(GAMMA_VALUES)},
    ]


def cv_folds(labels: Sequence[str], wanted: int) -> int:
    """`wanted` folds, or fewer when the smallest class has fewer samples (with a warning)."""
    smallest = min(Counter(labels).values())
    folds = max(2, min(wanted, smallest))
    if folds < wanted:
        warnings.warn(
            f"the smallest class has {smallest} training images: using {folds}-fold "
            f"cross-validation instead of {wanted}",
            stacklevel=2,
        )
    return folds


def folds_for(samples: int, most: int) -> int:
    """Folds for a search on `samples`: `most` up to 1,000 samples, else at most 5 (each
    sample is still validated once; see the module docstring)."""
    return most if samples <= 1000 else min(most, 5)


def calibration_folds(labels: Sequence[str], folds: int) -> int:
    """Calibration folds that fit in the training part of every CV fold."""
    smallest = min(Counter(labels).values())
    in_training_part = smallest - math.ceil(smallest / folds)
    return max(2, min(CALIBRATION_FOLDS, in_training_part))


def plan_search(
    labels: Sequence[str],
    folds: int = 10,
    strategy: str = "auto",
    search_samples: int = SEARCH_SAMPLES,
    calibrated: bool = True,
) -> SearchPlan:
    """Choose the searched set's size, the CV folds and the calibration folds for `labels`.

    `folds` is the most folds an "auto" search uses, and the folds a "full" search uses.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown search strategy {strategy!r}; expected one of {STRATEGIES}")
    samples = len(labels)
    subsample = strategy == "auto" and samples > search_samples
    wanted = folds
    if strategy == "auto":
        wanted = folds_for(min(samples, search_samples), folds)
    cv = cv_folds(labels, wanted)
    calibration = 0
    if calibrated:
        # The winner is calibrated on every sample, outside the CV: the smallest label only
        # has to fill the calibration folds.
        most = CALIBRATION_FOLDS_LARGE if samples > LARGE_SAMPLES else CALIBRATION_FOLDS
        calibration = max(2, min(most, min(Counter(labels).values())))
    return SearchPlan(
        strategy="subsample-grid" if subsample else "grid",
        samples=samples,
        search_samples=sum(_keep_per_label(labels, search_samples, cv).values())
        if subsample
        else samples,
        folds=cv,
        calibration_folds=calibration,
    )


def stratified_subsample(labels: Sequence[str], size: int, floor: int, seed: int) -> np.ndarray:
    """Sorted indices of about `size` samples in the labels' proportions, and at least `floor`
    of every label (or all of it), so that every label fills the CV folds."""
    rng = np.random.default_rng(seed)
    y = np.asarray(labels)
    chosen = [
        rng.choice(np.flatnonzero(y == label), keep, replace=False)
        for label, keep in _keep_per_label(labels, size, floor).items()
    ]
    return np.sort(np.concatenate(chosen))


def _keep_per_label(labels: Sequence[str], size: int, floor: int) -> dict[str, int]:
    share = size / len(labels)
    counts = Counter(labels)
    return {label: min(n, max(floor, round(share * n))) for label, n in sorted(counts.items())}


@dataclass
class SvmSearch:
    """A finished search: the cross-validation that chose the parameters, and the chosen SVC
    refit on every training sample.

    It reads like a fitted `GridSearchCV` (`best_params_`, `best_score_`, `cv_results_`,
    `n_splits_`, `best_estimator_`, `predict`), so report code reads either.
    """

    cv: GridSearchCV
    best_estimator_: Any
    plan: SearchPlan

    @property
    def best_params_(self) -> dict[str, Any]:
        return dict(self.cv.best_params_)

    @property
    def best_score_(self) -> float:
        return float(self.cv.best_score_)

    @property
    def cv_results_(self) -> dict[str, Any]:
        return dict(self.cv.cv_results_)

    @property
    def n_splits_(self) -> int:
        return int(self.cv.n_splits_)

    def predict(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(self.best_estimator_.predict(features))

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(self.best_estimator_.predict_proba(features))


def grid_search(
    features: np.ndarray,
    labels: Sequence[str],
    folds: int = 10,
    jobs: int = -1,
    seed: int = 0,
    calibrated: bool = True,
    strategy: str = "auto",
    search_samples: int = SEARCH_SAMPLES,
) -> SvmSearch:
    """Choose the SVC by stratified k-fold CV on all cores, then refit it on all samples.

    `calibrated=True` serves `CalibratedClassifierCV(SVC(best), ensemble=False)`: probabilities
    for the service. `calibrated=False` refits the bare SVC (labels only), for baselines that
    are only scored on accuracy. See `plan_search` for `folds`, `strategy`, `search_samples`.
    """
    y = np.asarray(labels)
    plan = plan_search(labels, folds, strategy, search_samples, calibrated)
    searched = np.arange(len(y))
    if plan.strategy == "subsample-grid":
        searched = stratified_subsample(labels, search_samples, plan.folds, seed)
    log.info(
        "SVM search: %s, %d-fold CV on %d of %d samples",
        plan.strategy,
        plan.folds,
        plan.search_samples,
        plan.samples,
    )
    cv = GridSearchCV(
        SVC(cache_size=CACHE_MB),
        param_grid(),
        cv=StratifiedKFold(n_splits=plan.folds, shuffle=True, random_state=seed),
        n_jobs=jobs,
        refit=False,  # the refit is on every sample, below, not on the searched subsample
    )
    cv.fit(features[searched], y[searched])
    best = SVC(cache_size=CACHE_MB, **cv.best_params_)
    if calibrated:
        best = CalibratedClassifierCV(best, ensemble=False, cv=plan.calibration_folds, n_jobs=jobs)
    best.fit(features, y)
    return SvmSearch(cv, best, plan)


def best_params(search: SvmSearch | GridSearchCV) -> dict[str, object]:
    """The winning SVC parameters."""
    return dict(search.best_params_)
