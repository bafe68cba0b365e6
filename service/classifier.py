"""The trained classifier: a scikit-learn estimator with `predict_proba`, loaded from joblib.

A joblib file is a pickle and runs code when loaded, so the file's sha256 must match a value
the operator recorded (the training report beside it, or an explicit setting) before it is
opened at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.errors import ModelLoadError

log = logging.getLogger(__name__)

#: The training report `train` writes beside the classifier file.
REPORT_FILE = "report.json"


@dataclass(frozen=True)
class ClassifierInfo:
    """What is known about the loaded classifier."""

    sha256: str
    labels: list[str]
    feature_dim: int
    type_name: str
    params: dict[str, str]
    holdout_accuracy: float | None
    backbone: str | None


def file_sha256(path: Path) -> str:
    """Lowercase hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_report(classifier_path: Path) -> dict[str, Any] | None:
    """The training report beside the classifier file, if there is one."""
    report = classifier_path.parent / REPORT_FILE
    if not report.is_file():
        return None
    data: dict[str, Any] = json.loads(report.read_text())
    if data.get("classifier", {}).get("file") != classifier_path.name:
        return None  # a report for another file in the same folder
    return data


class Classifier:
    """Ranks labels from feature vectors."""

    def __init__(self, estimator: Any, info: ClassifierInfo) -> None:
        self._estimator = estimator
        self.info = info

    @classmethod
    def load(cls, path: Path, expected_sha256: str | None = None) -> Classifier:
        """Verify `path` against the recorded sha256, then load it.

        The expected digest is `expected_sha256` when given, else the one in the training
        report beside the file; with neither, the file is refused.
        """
        if not path.is_file():
            raise ModelLoadError(f"classifier file {path} does not exist; run `make train`")
        report = read_report(path)
        expected = expected_sha256 or (report or {}).get("classifier", {}).get("sha256")
        if not expected:
            raise ModelLoadError(
                f"no recorded sha256 for {path}: a joblib file runs code when loaded, so pass "
                "--classifier-sha256 with the digest of a file you trust"
            )
        actual = file_sha256(path)
        if actual != expected.lower():
            raise ModelLoadError(
                f"classifier {path} has sha256 {actual}, expected {expected}; refusing to load"
            )
        import joblib  # after verification: loading runs code from the file

        estimator = joblib.load(path)
        return cls(estimator, _describe(estimator, actual, report))

    @property
    def labels(self) -> list[str]:
        return self.info.labels

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """float [N, n_labels] probabilities, columns in `labels` order."""
        return np.asarray(self._estimator.predict_proba(features), dtype=np.float64)


def _describe(estimator: Any, sha256: str, report: dict[str, Any] | None) -> ClassifierInfo:
    if not hasattr(estimator, "predict_proba") or not hasattr(estimator, "classes_"):
        raise ModelLoadError(
            f"{type(estimator).__name__} is not a fitted classifier with predict_proba"
        )
    inner = getattr(estimator, "estimator", None)
    type_name = type(estimator).__name__
    if inner is not None:
        type_name = f"{type_name}({type(inner).__name__})"
    params_of = inner if inner is not None else estimator
    report = report or {}
    return ClassifierInfo(
        sha256=sha256,
        labels=[str(label) for label in estimator.classes_],
        feature_dim=int(getattr(estimator, "n_features_in_", 0)),
        type_name=type_name,
        params=_svm_params(params_of),
        holdout_accuracy=report.get("holdout", {}).get("accuracy"),
        backbone=report.get("backbone", {}).get("name"),
    )


def _svm_params(estimator: Any) -> dict[str, str]:
    """The hyper-parameters the grid search chooses (gamma only where the kernel uses it)."""
    params = estimator.get_params(deep=False) if hasattr(estimator, "get_params") else {}
    keys = ["kernel", "C"]
    if params.get("kernel") in ("rbf", "poly", "sigmoid"):
        keys.append("gamma")
    return {key: str(params[key]) for key in keys if key in params}
