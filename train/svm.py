"""The classifier search of the original work: an SVM grid over kernels, C and gamma.

scikit-learn 1.9 deprecates `SVC(probability=True)`; its replacement,
`CalibratedClassifierCV(SVC(...), ensemble=False)`, calibrates the same SVM's scores into
probabilities, and the same grid is searched over the wrapped SVC.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from collections.abc import Sequence

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.svm import SVC

log = logging.getLogger(__name__)

C_VALUES = (1, 10, 100, 1000)
GAMMA_VALUES = (1e-2, 1e-3, 1e-4, 1e-5)
#: Folds of the probability calibration inside each candidate.
CALIBRATION_FOLDS = 5


def param_grid() -> list[dict[str, list]]:
    """Linear C in {1, 10, 100, 1000}; RBF C x gamma in {1e-2, 1e-3, 1e-4, 1e-5}."""
    return [
        {"estimator__kernel": ["linear"], "estimator__C": list(C_VALUES)},
        {
            "estimator__kernel": ["rbf"],
            "estimator__C": list(C_VALUES),
            "estimator__gamma": list(GAMMA_VALUES),
        },
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


def calibration_folds(labels: Sequence[str], folds: int) -> int:
    """Calibration folds that fit in the training part of every CV fold."""
    smallest = min(Counter(labels).values())
    in_training_part = smallest - math.ceil(smallest / folds)
    return max(2, min(CALIBRATION_FOLDS, in_training_part))


def grid_search(
    features: np.ndarray,
    labels: Sequence[str],
    folds: int = 10,
    jobs: int = -1,
    seed: int = 0,
    calibrated: bool = True,
) -> GridSearchCV:
    """Fit the grid search with stratified k-fold CV on all cores; refits the best on all data.

    `calibrated=False` searches the bare SVC (labels only, no probabilities): six times fewer
    fits, for baselines that are only scored on accuracy.
    """
    folds = cv_folds(labels, folds)
    estimator: SVC | CalibratedClassifierCV = SVC()
    grid = param_grid()
    if calibrated:
        estimator = CalibratedClassifierCV(
            estimator, ensemble=False, cv=calibration_folds(labels, folds)
        )
    else:
        grid = [{k.removeprefix("estimator__"): v for k, v in part.items()} for part in grid]
    search = GridSearchCV(
        estimator,
        grid,
        cv=StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed),
        n_jobs=jobs,
        refit=True,
    )
    search.fit(features, np.asarray(labels))
    return search


def best_params(search: GridSearchCV) -> dict[str, object]:
    """The winning SVC parameters without the `estimator__` prefix."""
    return {k.removeprefix("estimator__"): v for k, v in search.best_params_.items()}
