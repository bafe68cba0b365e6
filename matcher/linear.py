"""The linear matcher for large catalogues: one linear model over standardised features.

The SVM search (`matcher.svm`) fits kernel SVMs whose cost grows faster than the square of the
samples; above a few thousand photos it only stays affordable by searching a subsample. A
linear model's cost grows about linearly (each pass is one [N, D] x [D, L] product), so it
trains on every photo of a catalogue of 60,000 in about a minute on 2 cores (figures in
docs/benchmarks.md, "Large catalogues"). What is fitted:

* `StandardScaler`: the backbone's pooled features are non-negative with scales that differ
  by orders of magnitude between channels; a linear model's regularisation assumes they do not.
* `LogisticRegression` (multinomial, L-BFGS): its probabilities come from the log-loss it
  minimises, so they are calibrated by construction, with no calibration folds (a
  `CalibratedClassifierCV(LinearSVC)` costs four fits more for the same ranking).
  Its regularisation `C` is chosen from `C_VALUES` by fits on at most `SEARCH_SAMPLES`
  training photos scored on a stratified validation split of the others (at most
  `VALIDATION_SAMPLES`), then the model is refit on every photo: the choice costs at most
  four fits of 20,000, whatever the catalogue's size.

The fitted pipeline is a plain scikit-learn estimator with `predict_proba`, saved and verified
as the SVM's is (`classifier.skops`).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

log = logging.getLogger(__name__)

#: Inverse regularisation strengths tried, 10x apart (Fashion-MNIST at 60,000 photos chose
#: 0.01 for the last layer's features; the demo catalogue 0.1).
C_VALUES = (0.001, 0.01, 0.1, 1.0)
#: The share of the training photos held out to choose C ...
VALIDATION_SHARE = 0.15
#: ... and at most this many of them.
VALIDATION_SAMPLES = 10_000
#: The most photos each candidate C is fitted on.
SEARCH_SAMPLES = 20_000
#: L-BFGS iterations per fit; the validation choice and the refit use the same budget.
MAX_ITER = 300


@dataclass(frozen=True)
class LinearSearch:
    """A finished linear fit: the C chosen on the validation split, and the refit pipeline."""

    best_estimator_: Pipeline
    best_params_: dict[str, Any]
    #: Validation accuracy of each C tried, as {"C": accuracy}.
    validation: dict[str, float]
    samples: int
    validation_samples: int
    seconds: float

    def predict(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(self.best_estimator_.predict(features))

    def as_dict(self) -> dict[str, Any]:
        summary = asdict(self)
        del summary["best_estimator_"]
        return summary


def linear_model(c: float, seed: int = 0) -> Pipeline:
    """The pipeline the linear matcher fits, with regularisation `c`."""
    return make_pipeline(
        StandardScaler(),
        LogisticRegression(C=c, max_iter=MAX_ITER, tol=1e-3, random_state=seed),
    )


def fit_linear(
    features: np.ndarray,
    labels: Sequence[str],
    seed: int = 0,
    c_values: Sequence[float] = C_VALUES,
) -> LinearSearch:
    """Choose C on a stratified validation split of the training photos, refit on all."""
    started = time.perf_counter()
    y = np.asarray(labels)
    x = np.asarray(features, dtype=np.float32)
    held = min(VALIDATION_SAMPLES, max(len(set(labels)), round(VALIDATION_SHARE * len(y))))
    scores: dict[str, float] = {}
    held_count = 0
    if len(c_values) > 1:
        fit_rows, check_rows = train_test_split(
            np.arange(len(y)), test_size=held, stratify=y, random_state=seed
        )
        if len(fit_rows) > SEARCH_SAMPLES:
            fit_rows, _ = train_test_split(
                fit_rows, train_size=SEARCH_SAMPLES, stratify=y[fit_rows], random_state=seed
            )
        held_count = len(check_rows)
        for c in c_values:
            model = _fit(linear_model(c, seed), x[fit_rows], y[fit_rows])
            scores[str(c)] = round(float(model.score(x[check_rows], y[check_rows])), 4)
            log.info("linear matcher: C=%s validation accuracy %.4f", c, scores[str(c)])
    best = float(max(scores, key=lambda key: scores[key])) if scores else float(c_values[0])
    model = _fit(linear_model(best, seed), x, y)
    return LinearSearch(
        model,
        {"C": best},
        scores,
        len(y),
        held_count,
        round(time.perf_counter() - started, 2),
    )


def _fit(model: Pipeline, x: np.ndarray, y: np.ndarray) -> Pipeline:
    with warnings.catch_warnings():
        # The iteration budget is a choice: a few more iterations move accuracy by < 0.1 %.
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    return model
