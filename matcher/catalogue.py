"""The catalogue a classifier was trained on, as served: the index, its thumbnails, the threshold.

Loaded from the run folder only when its manifest verified and lists the index: the index's
bytes are checked against the manifest before they are read, and each thumbnail against the
manifest every time it is served, so a file swapped after start-up is refused, not shown.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from integrity.manifest import Manifest
from matcher.domain import Reference
from matcher.errors import ModelLoadError, NotFoundError
from matcher.geometry import MIN_INLIERS, KeypointStore
from matcher.index import CatalogueIndex
from matcher.layout import INDEX_FILE, KEYPOINTS_FILE, REFERENCES_DIR, photo_of, thumbnail_path


@dataclass(frozen=True)
class Verification:
    """How a run's answers are checked by geometry (`matcher.geometry`), as train recorded it:
    a label with `min_inliers` inliers is verified; an unverified answer is still a match when
    its similarity reaches the views mode's `thresholds` (the "rescue" threshold, calibrated
    so that at most 2 % of correct held-out and field matches are refused)."""

    keypoints: KeypointStore
    min_inliers: int
    thresholds: dict[str, float]


@dataclass(frozen=True)
class Catalogue:
    """The index beside a classifier, its thumbnails and the calibrated no-match threshold."""

    index: CatalogueIndex
    folder: Path
    #: The thresholds train calibrated, by views mode (`matcher.views`); empty without any.
    thresholds: dict[str, float]
    #: sha256 of every thumbnail, by reference id, as the manifest records them.
    thumbnails: dict[str, str]
    #: The keypoints and thresholds of geometric verification; None for runs without them.
    verification: Verification | None = None

    @property
    def threshold(self) -> float | None:
        """The whole photo's threshold (report.json's no_match), or None."""
        return self.thresholds.get("whole")

    def reference(self, reference_id: str) -> Reference:
        """The thumbnail of one reference view; NotFoundError for an id the index lacks."""
        label = self.index.label_of(reference_id)
        expected = self.thumbnails.get(photo_of(reference_id))
        if label is None or expected is None:
            raise NotFoundError(f"no reference view {reference_id!r} in the loaded catalogue")
        path = thumbnail_path(self.folder, reference_id)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelLoadError(f"reference thumbnail {path} cannot be read: {exc}") from exc
        if hashlib.sha256(data).hexdigest() != expected:
            raise ModelLoadError(f"{path} differs from its manifest entry; refusing to serve it")
        return Reference(reference_id, label, data)


def load_catalogue(
    folder: Path, manifest: Manifest, report: dict[str, Any] | None
) -> Catalogue | None:
    """The catalogue of a verified run folder, or None when it has no index (older runs)."""
    entry = manifest.files.get(INDEX_FILE)
    if entry is None:
        return None
    data = (folder / INDEX_FILE).read_bytes()
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise ModelLoadError(f"{folder / INDEX_FILE} changed after it was verified; refusing it")
    index = CatalogueIndex.from_bytes(data, str(folder / INDEX_FILE))
    prefix = f"{REFERENCES_DIR}/"
    thumbnails = {
        name.removeprefix(prefix).removesuffix(".jpg"): file.sha256
        for name, file in manifest.files.items()
        if name.startswith(prefix)
    }
    return Catalogue(
        index,
        folder,
        calibrated_thresholds(report or {}),
        thumbnails,
        _load_verification(folder, manifest, report or {}),
    )


def _load_verification(
    folder: Path, manifest: Manifest, report: dict[str, Any]
) -> Verification | None:
    """The run's keypoints, verified against the manifest, and its verification thresholds;
    None for a run trained before geometric verification (or with it off)."""
    entry = manifest.files.get(KEYPOINTS_FILE)
    recorded = report.get("verification")
    if entry is None or not recorded:
        return None
    data = (folder / KEYPOINTS_FILE).read_bytes()
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise ModelLoadError(
            f"{folder / KEYPOINTS_FILE} changed after it was verified; refusing it"
        )
    keypoints = KeypointStore.from_bytes(data, str(folder / KEYPOINTS_FILE))
    thresholds = {
        mode: float(found["threshold"]) for mode, found in (recorded.get("views") or {}).items()
    }
    return Verification(keypoints, int(recorded.get("min_inliers", MIN_INLIERS)), thresholds)


def calibrated_thresholds(report: dict[str, Any]) -> dict[str, float]:
    """The no-match thresholds a training report records, by views mode: `no_match` is the
    whole photo's, `no_match_views` each mode's (runs before multi-view queries have none)."""
    thresholds = {
        mode: float(calibration["threshold"])
        for mode, calibration in (report.get("no_match_views") or {}).items()
    }
    whole = (report.get("no_match") or {}).get("threshold")
    if whole is not None:
        thresholds.setdefault("whole", float(whole))
    return thresholds
