"""Add or remove a catalogue item without retraining: `python -m train add|remove`.

Only for runs whose matcher ranks by the index alone (`--matcher knn` or `prototype`): the new
item's photos go through the same backbone and preprocessing, their features join the index
(centred on the original training's centre, so the views already there keep their
similarities), their thumbnails join `references/`, and the report and, last, the manifest are
rewritten, in a copy of the run published as a new run (`train.runs.edited_run`): the folder
served is never changed in place. A server watching it swaps the new catalogue in by hot
reload. The no-match thresholds stay the ones calibrated at training; the new photos'
keypoints join `keypoints.npz`, so the new item is verified by geometry like the others.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from integrity.manifest import file_sha256, write_manifest
from matcher.backends.base import FeatureExtractor
from matcher.classifier import INDEX_MATCHERS, Classifier, read_run_report
from matcher.dataset import DatasetError, images_in, label_of
from matcher.extraction import FeatureCache, extract_features
from matcher.geometry import KeypointStore
from matcher.index import CatalogueIndex
from matcher.layout import INDEX_FILE, KEYPOINTS_FILE, REFERENCES_DIR, REPORT_FILE, photo_of
from train.photo_views import turned_features
from train.references import write_thumbnail
from train.runs import edited_run
from train.verification import catalogue_keypoints


@dataclass(frozen=True)
class Edit:
    """What an add or a remove did."""

    label: str
    #: Photos added or removed (each with its turned views, when the run indexes those).
    photos: int
    #: Photos in the catalogue afterwards.
    total_photos: int
    rejected: dict[str, str]


def add_item(
    run: Path, folder: Path, backend: FeatureExtractor, cache_dir: Path | None = None
) -> Edit:
    """Add the photos in `folder` as the item named after it (or more views of that item)."""
    report, index, keypoints = _open(run)
    label = label_of(folder)  # as training names it (NFC), so `café` stays one item
    paths = images_in(folder) if folder.is_dir() else []
    if not paths:
        raise DatasetError(f"{folder} holds no images to add (.jpg, .png, .heic, ...)")
    if not backend.ready:
        backend.load()
    _check_backbone(report, backend)
    info = backend.info
    cache = FeatureCache(cache_dir, info.cache_key, info.feature_dim) if cache_dir else None
    found = extract_features(paths, backend, cache, progress=False)
    kept = [paths[i] for i in found.kept]
    if not kept:
        raise DatasetError(f"no photo in {folder} could be read: {found.rejected}")
    ids = [f"{label}/{path.name}" for path in kept]
    features, labels = found.features, [label] * len(kept)
    views = ids
    if report.get("index", {}).get("turned_views"):  # as the training indexed its photos
        turned, turned_ids = turned_features(kept, ids, backend, cache)
        features = np.concatenate([features, turned])
        labels, views = [label] * len(views + turned_ids), [*ids, *turned_ids]
    try:
        grown = index.with_views(features, labels, views)
    except ValueError as exc:
        raise DatasetError(f"{exc}: rename the photos, or remove {label!r} first") from exc
    if keypoints is not None:  # as the training stored them, for geometric verification
        keypoints = keypoints.merged(catalogue_keypoints(kept, ids))
    with edited_run(run) as edited:  # a new run, published whole
        for path, reference in zip(kept, ids, strict=True):
            write_thumbnail(edited, path, reference)
        _commit(edited, report, grown, keypoints, f"added {len(kept)} photos of {label}")
    rejected = {str(path): why for path, why in found.rejected.items()}
    return Edit(label, len(kept), _photos(grown), rejected)


def remove_item(run: Path, label: str) -> Edit:
    """Remove every view of `label` from the catalogue."""
    report, index, keypoints = _open(run)
    try:
        smaller = index.without_label(label)
    except ValueError as exc:
        raise DatasetError(f"{exc} in {run}") from exc
    if len(smaller.labels) < 2:
        raise DatasetError(f"removing {label!r} would leave fewer than 2 items in {run}")
    removed = _photos(index) - _photos(smaller)
    if keypoints is not None:
        kept = {photo_of(view) for view in smaller.ids}
        keypoints = keypoints.without(lambda photo: photo in kept)
    with edited_run(run) as edited:  # a new run, published whole
        shutil.rmtree(edited / REFERENCES_DIR / label, ignore_errors=True)
        _commit(edited, report, smaller, keypoints, f"removed {removed} photos of {label}")
    return Edit(label, removed, _photos(smaller), {})


def _photos(index: CatalogueIndex) -> int:
    """The catalogue photos in an index (not counting their turned views)."""
    return sum(photo_of(view) == view for view in index.ids)


def _open(run: Path) -> tuple[dict[str, Any], CatalogueIndex, KeypointStore | None]:
    report = read_run_report(run)
    matcher = report.get("matcher", "svm")
    if matcher not in INDEX_MATCHERS:
        raise DatasetError(
            f"{run} was trained with --matcher {matcher}, whose classifier must be retrained "
            f"to learn another item; train with --matcher knn or prototype to add and remove"
        )
    # Loaded as the server loads it: verified against the manifest, the index checked.
    catalogue = Classifier.load(run).catalogue
    assert catalogue is not None  # an index matcher refuses to load without one
    verification = catalogue.verification
    return report, catalogue.index, verification.keypoints if verification else None


def _check_backbone(report: dict[str, Any], backend: FeatureExtractor) -> None:
    trained = report.get("backbone", {})
    served = backend.info
    if (trained.get("name"), trained.get("version")) != (served.name, served.version):
        raise DatasetError(
            f"the catalogue was built on {trained.get('name')} version {trained.get('version')}, "
            f"the backend serves {served.name} version {served.version}: features would not "
            "compare (pass the --model-dir the run was trained with)"
        )


def _commit(
    run: Path,
    report: dict[str, Any],
    index: CatalogueIndex,
    keypoints: KeypointStore | None,
    what: str,
) -> None:
    """Index and keypoints, then report, then (last) the manifest that vouches for them."""
    index.save(run / INDEX_FILE)
    if keypoints is not None:
        keypoints.save(run / KEYPOINTS_FILE)
        report["verification"]["photos"] = len(keypoints.ids)
        report["verification"]["keypoints"] = keypoints.size
    report["classifier"]["sha256"] = file_sha256(run / INDEX_FILE)
    report["index"]["views"] = index.size
    report["index"]["photos"] = sum(photo_of(view) == view for view in index.ids)
    photos = [
        label
        for label, view in zip(index.row_labels, index.ids, strict=True)
        if photo_of(view) == view
    ]
    report["data"]["counts"] = {label: photos.count(label) for label in index.labels}
    report.setdefault("edits", []).append(
        {"at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "what": what}
    )
    tmp = run / f".{REPORT_FILE}.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(run / REPORT_FILE)
    write_manifest(run, tool="train", kind="classifier")
