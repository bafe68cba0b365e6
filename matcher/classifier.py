"""The trained classifier: a scikit-learn estimator with `predict_proba`, from skops or joblib.

Nothing is opened before it is verified. With `--classifier-sha256` the file must have that
digest (trust anchored outside the folder); otherwise the `manifest.json` that `train` writes
beside it must verify and list it (see `integrity.manifest`). The bytes verified are the bytes
loaded. Then the suffix picks the format:

- `.skops`: skops rebuilds the estimator without running code from the file, and only from
  types it trusts (plain data, numpy arrays, scikit-learn estimators) plus `SKOPS_ALLOWED_TYPES`;
  a file holding any other type is refused unopened.
- `.joblib` (or `.pkl`, `.pickle`): a pickle, which runs code when loaded; verification is all
  that stands between the file and this process.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from integrity.manifest import (
    MANIFEST_FILE,
    IntegrityError,
    Manifest,
    ManifestMissingError,
    file_sha256,
    how_to_create,
    verify,
)
from matcher.catalogue import Catalogue, load_catalogue
from matcher.errors import ModelLoadError
from matcher.fast_proba import compile_probabilities
from matcher.index import Neighbours
from matcher.layout import INDEX_FILE, REPORT_FILE

log = logging.getLogger(__name__)

SKOPS_SUFFIX = ".skops"
JOBLIB_SUFFIXES = (".joblib", ".pkl", ".pickle")
#: Types a classifier file may hold beyond what skops trusts by default: the internals of
#: CalibratedClassifierCV(SVC) (an older SVC(probability=True) needs none). Extend this list,
#: never `trusted=True`, when a new estimator needs more.
SKOPS_ALLOWED_TYPES = (
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
)

__all__ = ["Classifier", "ClassifierInfo", "file_sha256", "read_report"]


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
    #: The backbone's input side the classifier was trained with (report.json), for the
    #: TF Serving backend, whose signature (encoded strings in) does not tell it.
    input_size: int | None = None


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

    def __init__(
        self,
        estimator: Any,
        info: ClassifierInfo,
        catalogue: Catalogue | None = None,
        matcher: str = "svm",
    ) -> None:
        self._estimator = estimator
        self.info = info
        #: "svm" or "linear" (the estimator ranks; `matcher` says "svm" for any estimator), or
        #: "knn" / "prototype" (the index ranks; no estimator).
        self.matcher = matcher
        if matcher in INDEX_MATCHERS and catalogue is None:
            raise ModelLoadError(f"the {matcher} matcher needs the run folder's index")
        #: The index, thumbnails and no-match threshold of the run folder (None: no index).
        self.catalogue = catalogue
        if catalogue is not None and catalogue.index.labels != info.labels:
            raise ModelLoadError(
                f"the index beside the classifier holds labels {catalogue.index.labels[:5]}..., "
                f"the classifier {info.labels[:5]}...: they come from different trainings"
            )
        if catalogue is not None and catalogue.index.dim != info.feature_dim:
            raise ModelLoadError(
                f"the index beside the classifier holds {catalogue.index.dim} features per view, "
                f"the classifier expects {info.feature_dim}"
            )
        # scikit-learn's own predict_proba costs milliseconds of input checks per call.
        self._fast = compile_probabilities(estimator) if estimator is not None else None

    @classmethod
    def load(cls, path: Path, expected_sha256: str | None = None) -> Classifier:
        """Verify `path`, then load it with the reader its suffix names.

        With `expected_sha256` the file must have that digest; without it, the manifest in
        the file's folder must verify and list the file. Anything else is refused unopened.
        `path` may also be a run folder: its report names the matcher, and for `svm` the file.
        A symbolic link (what `train` publishes a run as) is resolved once, first, so that
        every file read comes from the run it named at that moment, even if it is switched
        to another run meanwhile.
        """
        path = path.resolve()
        if path.is_dir():
            return cls._load_run(path, expected_sha256)
        if not path.is_file():
            raise ModelLoadError(f"classifier file {path} does not exist; run `make train`")
        reader = _reader_for(path)
        # Read once: the bytes whose digest is checked are the bytes loaded.
        data = path.read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        catalogue = None
        if expected_sha256:
            if actual != expected_sha256.lower():
                raise ModelLoadError(
                    f"classifier {path} has sha256 {actual}, but --classifier-sha256 is "
                    f"{expected_sha256}; refusing to load"
                )
            # The digest vouches for the classifier file alone: no index is read beside it.
            report = read_report(path)
        else:
            manifest = _verify_with_manifest(path, actual)
            # report.json feeds GetModelInfo and the checks: read it when it is covered.
            report = read_report(path) if REPORT_FILE in manifest.files else None
            catalogue = load_catalogue(path.parent, manifest, report)
        estimator = reader(path, data)
        return cls(estimator, _describe(estimator, actual, report), catalogue)

    @classmethod
    def _load_run(cls, folder: Path, expected_sha256: str | None) -> Classifier:
        """A run folder: the svm's or linear's file, or the index alone for `knn` and
        `prototype`."""
        report = read_run_report(folder)
        matcher = str(report.get("matcher", "svm"))
        if matcher in FILE_MATCHERS:
            return cls.load(folder / str(report["classifier"]["file"]), expected_sha256)
        if matcher not in INDEX_MATCHERS:
            raise ModelLoadError(f"{folder / REPORT_FILE} names an unknown matcher {matcher!r}")
        if expected_sha256:
            raise ModelLoadError(
                f"the {matcher} matcher of {folder} is its index and thumbnails: trust them "
                "through the folder's manifest, not --classifier-sha256"
            )
        try:
            manifest = verify(folder, "classifier")
        except IntegrityError as exc:
            raise ModelLoadError(f"{exc}; refusing to load the catalogue") from exc
        catalogue = load_catalogue(folder, manifest, report)
        if catalogue is None:
            raise ModelLoadError(f"{folder} has no {INDEX_FILE} listed in its manifest")
        info = ClassifierInfo(
            sha256=manifest.files[INDEX_FILE].sha256,
            labels=list(catalogue.index.labels),
            feature_dim=catalogue.index.dim,
            type_name=INDEX_MATCHERS[matcher],
            params={"temperature": str(TEMPERATURE)},
            holdout_accuracy=report.get("holdout", {}).get("accuracy"),
            backbone=report.get("backbone", {}).get("name"),
            input_size=report.get("backbone", {}).get("input_size"),
        )
        return cls(None, info, catalogue, matcher)

    @property
    def labels(self) -> list[str]:
        return self.info.labels

    def rank(self, features: np.ndarray) -> tuple[np.ndarray, Neighbours | None]:
        """Probabilities [N, n_labels] and, with an index, each label's nearest view."""
        scores, neighbours = self.scores(features)
        if self.matcher in INDEX_MATCHERS:
            return softmax(scores / TEMPERATURE), neighbours
        return scores, neighbours

    def scores(self, features: np.ndarray) -> tuple[np.ndarray, Neighbours | None]:
        """Each label's score [N, n_labels] (higher is better) and, with an index, its nearest
        view: the similarity of the nearest view (knn) or of the prototype (prototype), or the
        SVM's probability.

        `merge_views` turns the scores of a photo's views into its probabilities."""
        neighbours = self.catalogue.index.search(features) if self.catalogue else None
        if self.matcher == "knn" and neighbours is not None:
            return neighbours.similarity, neighbours
        if self.matcher == "prototype" and self.catalogue is not None:
            return self.catalogue.index.prototype_similarity(features), neighbours
        return self.probabilities(features), neighbours

    def merge_views(self, scores: np.ndarray, nearest: np.ndarray | None) -> np.ndarray:
        """One photo's probabilities [L] from its views' scores [V, L] (`merge_views`)."""
        return merge_views(self.matcher, scores, nearest)

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """float [N, n_labels] probabilities in [0, 1], columns in `labels` order.

        Both paths end as scikit-learn's predict_proba does, rounding noise just above 1 down
        to 1 (`fast_proba` repeats that step), so callers need not clip.
        """
        if self._fast is not None:
            return self._fast(features)
        return np.asarray(self._estimator.predict_proba(features), dtype=np.float64)


#: The matchers whose model is a classifier file named by the report (the estimator ranks).
FILE_MATCHERS = ("svm", "linear")
#: The matchers that rank by the index alone, and the type GetModelInfo reports for each.
INDEX_MATCHERS = {"knn": "NearestView", "prototype": "NearestPrototype"}
#: Similarities become probabilities by a softmax at this temperature: a label 0.1 more
#: similar than another is e^2 (7.4x) more probable.
TEMPERATURE = 0.05


def merge_views(matcher: str, scores: np.ndarray, nearest: np.ndarray | None) -> np.ndarray:
    """One photo's probabilities [L] from its views' scores [V, L] (`Classifier.scores`).

    For knn and prototype each label keeps its best view, and a softmax at `TEMPERATURE`
    makes probabilities of the merged similarities. The SVM's probabilities do not merge
    that way: on a crop of clutter it is as sure of some label as on the item (on
    `bench.quality`, a maximum over views cut its top-1 from 71 % to 57 %). It answers
    with the view that came closest to any reference view (`nearest`, [V, L]
    similarities), the one that shows the catalogue most clearly; without an index, with
    the mean over the views."""
    scores = np.asarray(scores, np.float64)
    if matcher in INDEX_MATCHERS:
        merged: np.ndarray = softmax(scores.max(axis=0, keepdims=True) / TEMPERATURE)[0]
        return merged
    if nearest is not None:
        clearest: np.ndarray = scores[int(np.argmax(np.max(nearest, axis=1)))]
        return clearest
    mean: np.ndarray = scores.mean(axis=0)
    return mean


def softmax(scores: np.ndarray) -> np.ndarray:
    """Rows of `scores` as probabilities (float64, each row sums to 1)."""
    shifted = np.asarray(scores, np.float64) - np.max(scores, axis=1, keepdims=True)
    exp = np.exp(shifted)
    result: np.ndarray = exp / exp.sum(axis=1, keepdims=True)
    return result


def read_run_report(folder: Path) -> dict[str, Any]:
    """A run folder's report.json (ModelLoadError when there is none)."""
    path = folder / REPORT_FILE
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder} is not a training run folder: {path}: {exc}") from exc
    return data


def _verify_with_manifest(path: Path, actual: str) -> Manifest:
    """Check the folder against its manifest, which must list the classifier with `actual`."""
    folder = path.parent
    try:
        manifest = verify(folder, "classifier")
    except ManifestMissingError as exc:
        raise ModelLoadError(
            f"no {MANIFEST_FILE} beside {path}, so nothing vouches for the file: "
            f"{how_to_create(folder)}, or pass --classifier-sha256 with the digest of a file "
            "you trust"
        ) from exc
    except IntegrityError as exc:
        raise ModelLoadError(f"{exc}; refusing to load the classifier") from exc
    entry = manifest.files.get(path.name)
    if entry is None:
        raise ModelLoadError(
            f"{path.name} is not listed in {folder / MANIFEST_FILE}; refusing to load it "
            "(train again, or pass --classifier-sha256)"
        )
    if actual != entry.sha256:  # replaced between the check and the read
        raise ModelLoadError(
            f"classifier {path} has sha256 {actual} but {MANIFEST_FILE} records "
            f"{entry.sha256}; refusing to load"
        )
    return manifest


def _reader_for(path: Path) -> Callable[[Path, bytes], Any]:
    suffix = path.suffix.lower()
    if suffix == SKOPS_SUFFIX:
        return _load_skops
    if suffix in JOBLIB_SUFFIXES:
        return _load_joblib
    raise ModelLoadError(
        f"classifier {path}: unknown format {suffix or '(no suffix)'}; expected "
        f"{SKOPS_SUFFIX} or {', '.join(JOBLIB_SUFFIXES)}"
    )


def _load_skops(path: Path, data: bytes) -> Any:
    import skops.io
    from skops.io.exceptions import UnsupportedTypeException, UntrustedTypesFoundException

    unreadable = (zipfile.BadZipFile, ValueError, KeyError, TypeError, UnsupportedTypeException)
    try:
        # Reads the file's schema only; nothing is constructed yet.
        untrusted = skops.io.get_untrusted_types(data=data)
    except unreadable as exc:
        raise ModelLoadError(f"classifier {path} is not a readable skops file: {exc}") from exc
    refused = sorted(set(untrusted) - set(SKOPS_ALLOWED_TYPES))
    if refused:
        raise ModelLoadError(
            f"classifier {path} holds types a classifier does not need, refused unopened: "
            f"{', '.join(refused)}"
        )
    try:
        return skops.io.loads(data, trusted=list(SKOPS_ALLOWED_TYPES))
    except UntrustedTypesFoundException as exc:
        raise ModelLoadError(f"classifier {path} holds untrusted types: {exc}") from exc
    except unreadable as exc:
        raise ModelLoadError(f"classifier {path} is not a readable skops file: {exc}") from exc


def _load_joblib(path: Path, data: bytes) -> Any:
    import joblib  # after verification: loading a pickle runs code from it

    return joblib.load(io.BytesIO(data))


def _describe(estimator: Any, sha256: str, report: dict[str, Any] | None) -> ClassifierInfo:
    if not hasattr(estimator, "predict_proba") or not hasattr(estimator, "classes_"):
        raise ModelLoadError(
            f"{type(estimator).__name__} is not a fitted classifier with predict_proba"
        )
    inner = getattr(estimator, "estimator", None)
    type_name = type(estimator).__name__
    if inner is not None:
        type_name = f"{type_name}({type(inner).__name__})"
    steps = getattr(estimator, "steps", None)
    if steps:  # a Pipeline (the linear matcher): its steps, the last one's parameters
        type_name = f"{type_name}({', '.join(type(step).__name__ for _, step in steps)})"
        inner = steps[-1][1]
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
        input_size=report.get("backbone", {}).get("input_size"),
    )


def _svm_params(estimator: Any) -> dict[str, str]:
    """The hyper-parameters the grid search chooses (gamma only where the kernel uses it)."""
    params = estimator.get_params(deep=False) if hasattr(estimator, "get_params") else {}
    keys = ["kernel", "C", "penalty"]
    if params.get("kernel") in ("rbf", "poly", "sigmoid"):
        keys.append("gamma")
    return {key: str(params[key]) for key in keys if key in params}
