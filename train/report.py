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


#: Pairs listed as confusable: those mixed up on the held-out photos, then the closest.
CONFUSABLE_PAIRS = 8


def confusable_items(
    labels: list[str],
    confusion: list[list[int]],
    prototypes: np.ndarray,
    field_accuracy: dict[str, float],
    counts: dict[str, int],
) -> dict[str, Any]:
    """Which items get mixed up, and which need more views.

    `pairs`: the pairs the matcher mixed up on the held-out photos and their field versions
    (`confusion`, rows truth), most mixed first, then the pairs whose mean views
    (`prototypes`, normalised [L, D]) are most alike: the next to be mixed up as the catalogue
    grows. `needs_views`: the items ranked worst on the field versions of their held-out photos,
    with their closest other item; more views of the conditions they failed in help most."""
    matrix = np.asarray(confusion)
    similarity = prototypes @ prototypes.T
    pairs = []
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            mixed = int(matrix[i, j] + matrix[j, i])
            pairs.append((mixed, float(similarity[i, j]), labels[i], labels[j]))
    pairs.sort(key=lambda pair: (-pair[0], -pair[1]))
    np.fill_diagonal(similarity, -np.inf)
    nearest = similarity.argmax(axis=1)
    weakest = sorted(labels, key=lambda label: (field_accuracy.get(label, 1.0), label))
    return {
        "pairs": [
            {"items": [a, b], "mixed": mixed, "prototype_similarity": round(sim, 4)}
            for mixed, sim, a, b in pairs[:CONFUSABLE_PAIRS]
        ],
        "needs_views": [
            {
                "item": label,
                "field_accuracy": round(field_accuracy[label], 4),
                "views": counts.get(label, 0),
                "closest_item": labels[int(nearest[labels.index(label)])],
            }
            for label in weakest
            if label in field_accuracy and field_accuracy[label] < 1.0
        ],
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
            # What ran the network for extraction ("" for TF Serving and HoG).
            "engine": backbone.engine,
            "precision": backbone.precision,
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
