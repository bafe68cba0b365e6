"""The served classifier's `predict_proba` as a few numpy operations.

scikit-learn's CalibratedClassifierCV(SVC).predict_proba spends most of its time on input
checks (18 `check_array` calls per call) and on a Python loop over the one-vs-one class pairs:
about 2-4 ms for one image, a quarter of the backbone's own time. The arithmetic is a matrix
product and a few element-wise steps, so for the models `train` writes (sigmoid calibration over
a linear-kernel SVC or a LinearSVC) it is redone here with the same formulas, in float64 as
scikit-learn does. Anything else returns None and keeps scikit-learn's own method. The
results are checked against scikit-learn's in tests/test_fast_proba.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.special import expit

Probabilities = Callable[[np.ndarray], np.ndarray]


def compile_probabilities(estimator: Any) -> Probabilities | None:
    """A numpy function equal to `estimator.predict_proba`, or None when not supported."""
    from sklearn.calibration import CalibratedClassifierCV

    if not isinstance(estimator, CalibratedClassifierCV):
        return None
    if len(estimator.calibrated_classifiers_) != 1:  # ensemble=True averages several
        return None
    calibrated = estimator.calibrated_classifiers_[0]
    if calibrated.method != "sigmoid":
        return None
    if not np.array_equal(calibrated.estimator.classes_, estimator.classes_):
        return None
    decision = _decision_function(calibrated.estimator)
    if decision is None:
        return None
    slopes = np.array([c.a_ for c in calibrated.calibrators], dtype=np.float64)
    offsets = np.array([c.b_ for c in calibrated.calibrators], dtype=np.float64)
    n_classes = len(estimator.classes_)

    def probabilities(features: np.ndarray) -> np.ndarray:
        scores = decision(np.asarray(features, dtype=np.float64))
        if n_classes == 2:
            positive = expit(-(slopes[0] * scores[:, 0] + offsets[0]))
            proba = np.stack([1.0 - positive, positive], axis=1)
        else:
            proba = expit(-(slopes * scores + offsets))
            total = proba.sum(axis=1, keepdims=True)
            proba = np.divide(
                proba, total, out=np.full_like(proba, 1 / n_classes), where=total != 0
            )
        proba[(proba > 1.0) & (proba <= 1.0 + 1e-5)] = 1.0
        return proba

    return probabilities


def _decision_function(model: Any) -> Callable[[np.ndarray], np.ndarray] | None:
    """float64 [N, n_scores] decision values as scikit-learn computes them, or None."""
    from sklearn.svm import SVC, LinearSVC

    if isinstance(model, LinearSVC):
        coef, intercept = np.asarray(model.coef_, np.float64), np.asarray(model.intercept_)
        return lambda x: x @ coef.T + intercept
    if not isinstance(model, SVC) or model.kernel != "linear":
        return None
    if model.decision_function_shape != "ovr" or model.break_ties:
        return None
    coef, intercept = np.asarray(model.coef_, np.float64), np.asarray(model.intercept_)
    n_classes = len(model.classes_)
    if n_classes == 2:
        # Binary: libsvm's sign is flipped relative to classes_[1], as in SVC._decision_function.
        return lambda x: x @ coef.T + intercept
    first, second = np.triu_indices(n_classes, k=1)  # the one-vs-one pairs, libsvm's order
    to_first = np.zeros((len(first), n_classes))
    to_first[np.arange(len(first)), first] = 1.0
    to_second = np.zeros((len(first), n_classes))
    to_second[np.arange(len(first)), second] = 1.0

    def one_vs_rest(x: np.ndarray) -> np.ndarray:
        # sklearn.utils.multiclass._ovr_decision_function, without its loop over pairs: a
        # pair votes for its first class when its value is >= 0, and confidences add up.
        ovo = x @ coef.T + intercept
        votes = (ovo >= 0) @ to_first + (ovo < 0) @ to_second
        confidence = ovo @ (to_first - to_second)
        result: np.ndarray = votes + confidence / (3 * (np.abs(confidence) + 1))
        return result

    return one_vs_rest
