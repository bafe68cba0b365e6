"""The training report: what was trained, on what, how well; printed and saved as JSON."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix
from sklearn.model_selection import GridSearchCV

from matcher.domain import BackboneInfo
from matcher.svm import best_params


def holdout_metrics(labels: list[str], truth: list[str], predicted: list[str]) -> dict[str, Any]:
    """Accuracy, confusion matrix (rows: truth, columns: predicted) and per-class metrics."""
    matrix = confusion_matrix(truth, predicted, labels=labels)
    per_class = classification_report(
        truth, predicted, labels=labels, output_dict=True, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(truth, predicted)),
        "labels": labels,
        "confusion_matrix": matrix.tolist(),
        "per_class": {label: per_class[label] for label in labels},
        "text": classification_report(truth, predicted, labels=labels, digits=3, zero_division=0),
    }


def search_summary(search: GridSearchCV, seconds: float) -> dict[str, Any]:
    """Best parameters and every candidate's CV accuracy (mean and spread)."""
    results = search.cv_results_
    candidates = [
        {
            "params": dict(params),
            "mean_accuracy": float(mean),
            "std_accuracy": float(std),
            "rank": int(rank),
        }
        for params, mean, std, rank in zip(
            results["params"],
            results["mean_test_score"],
            results["std_test_score"],
            results["rank_test_score"],
            strict=True,
        )
    ]
    return {
        "folds": int(search.n_splits_),
        "best_params": best_params(search),
        "best_cv_accuracy": float(search.best_score_),
        "candidates": candidates,
        "seconds": round(seconds, 2),
    }


def build_report(
    *,
    data: dict[str, Any],
    backbone: BackboneInfo,
    backend: str,
    search: dict[str, Any],
    holdout: dict[str, Any],
    classifier_file: Path,
    classifier_sha256: str,
    classifier_type: str,
    model_dir: Path | None = None,
) -> dict[str, Any]:
    """The JSON report `train` writes beside the classifier."""
    return {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "data": data,
        "backbone": {
            "name": backbone.name,
            "version": backbone.version,
            "input_size": backbone.input_size,
            "feature_dim": backbone.feature_dim,
            "backend": backend,
            "layer": backbone.layer,
            # Where the SavedModel is, for the report's pictures (None: no local model).
            "model_dir": str(model_dir) if model_dir else None,
        },
        "search": search,
        "holdout": {k: v for k, v in holdout.items() if k != "text"},
        "classifier": {
            "file": classifier_file.name,
            "sha256": classifier_sha256,
            "type": classifier_type,
            "scikit_learn": sklearn.__version__,
        },
    }


def write_report(report: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")


def format_confusion(labels: list[str], matrix: list[list[int]]) -> str:
    """The confusion matrix as text, rows = true label, columns = predicted, label order shown."""
    width = max(4, *(len(str(v)) for row in matrix for v in row)) + 1
    lines = ["label order: " + ", ".join(f"{i}={name}" for i, name in enumerate(labels))]
    lines.append("true\\pred " + "".join(f"{i:>{width}}" for i in range(len(labels))))
    for i, row in enumerate(matrix):
        lines.append(f"{i:>9} " + "".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
