"""Geometric verification at training: the catalogue's keypoints and the rescue thresholds.

`train` stores the keypoints of every catalogue photo (`matcher.geometry.KeypointStore`,
`keypoints.npz`), and calibrates, for each views mode, the similarity at which an answer that
geometry could not verify is still a match. The held-out photos and their field versions
(`train.field_photos`) are matched as the server matches a photo: the first labels by the
pooled features, each checked on its most similar training photos (`verify_labels`), a
verified label first. The rescue threshold is then the highest similarity that, together with
geometry, refuses at most `target` of the correct matches; items without texture (a smooth
gradient, a blurred clock face) are the ones it rescues. Outside photos, when there are any,
measure what the rule lets through.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from matcher.geometry import (
    CANDIDATE_LABELS,
    REFERENCE_KEYPOINTS,
    KeypointStore,
    LocalFeatures,
    answering,
    local_features,
    verify_labels,
)
from matcher.index import CatalogueIndex

#: Threads finding keypoints (OpenCV releases the GIL while it works).
JOBS = 2


def photo_keypoints(
    photos: Iterable[bytes],
    count: int,
    keypoints: int,
    progress: bool = False,
    what: str = "keypoints",
) -> list[LocalFeatures]:
    """The local features of `count` encoded photos, in order (threads, with a progress bar)."""
    with ThreadPoolExecutor(JOBS) as pool:
        found = pool.map(lambda data: local_features(data, keypoints), photos)
        return list(tqdm(found, total=count, desc=what, unit="photo", disable=not progress))


def catalogue_keypoints(
    paths: Sequence[Path], ids: Sequence[str], progress: bool = False
) -> KeypointStore:
    """The keypoints of every catalogue photo, by reference id."""
    found = photo_keypoints(
        (path.read_bytes() for path in paths),
        len(paths),
        REFERENCE_KEYPOINTS,
        progress,
        "catalogue keypoints",
    )
    return KeypointStore.of(zip(ids, found, strict=True))


@dataclass(frozen=True)
class Checked:
    """Photos matched as the server matches them, with geometry."""

    #: The label column each photo's answer names first (a verified label if any).
    first: np.ndarray
    #: Whether that answer was verified, and the most inliers seen on any label checked.
    verified: np.ndarray
    inliers: np.ndarray


def check_photos(
    local: Sequence[LocalFeatures],
    views: np.ndarray,
    order: np.ndarray,
    similarity: np.ndarray,
    seen: CatalogueIndex,
    store: KeypointStore,
    min_inliers: int,
    caches: Sequence[dict[str, int]],
) -> Checked:
    """Each photo's answer: its first `CANDIDATE_LABELS` of `order` [N, L] checked on their
    views in `seen` closest to the photo's `views` [N, V, D], a verified label answering as
    the server lets it (`answering`, on each label's `similarity` [N, L]); `caches` (one per
    photo) keep the inliers of a photo pair across the modes."""
    first = order[:, 0].copy()
    verified = np.zeros(len(order), bool)
    most = np.zeros(len(order), np.int64)
    for i, (features, columns) in enumerate(zip(views, order[:, :CANDIDATE_LABELS], strict=True)):
        found = verify_labels(local[i], features, columns.tolist(), seen, store, caches[i])
        most[i] = max(count for count, _ in found.values())
        answers = answering(found, similarity[i], min_inliers)
        if answers:
            first[i], verified[i] = answers[0], True
    return Checked(first, verified, most)


@dataclass(frozen=True)
class RescueCalibration:
    """A views mode's rescue threshold and what the whole rule was measured to do."""

    threshold: float
    #: Correct matches refused (neither verified nor similar enough).
    false_reject_rate: float
    #: Outside photos taken for an item (verified by chance, or similar enough); None
    #: without outside photos.
    false_accept_rate: float | None
    #: Correct matches geometry verified on its own.
    verified_share: float
    matched: int
    outside_photos: int
    outside_verified: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibrate_rescue(
    similarity: np.ndarray,
    verified: np.ndarray,
    outside_similarity: np.ndarray,
    outside_verified: np.ndarray,
    target: float,
) -> RescueCalibration:
    """The highest threshold that, with geometry, refuses at most `target` of the correct
    matches (`similarity`, `verified`: theirs); 1.0 (similarity alone never suffices) when
    geometry alone already keeps that many."""
    if len(similarity) == 0:
        raise ValueError("no correct held-out match to set the rescue threshold on")
    unverified = np.sort(similarity[~verified])
    allowed = math.floor(target * len(similarity))
    threshold = float(unverified[allowed]) if len(unverified) > allowed else 1.0
    accepted = verified | (similarity >= threshold)
    outside = outside_verified | (outside_similarity >= threshold)
    return RescueCalibration(
        threshold=threshold,
        false_reject_rate=float(np.mean(~accepted)),
        false_accept_rate=float(np.mean(outside)) if len(outside) else None,
        verified_share=float(np.mean(verified)),
        matched=len(similarity),
        outside_photos=len(outside),
        outside_verified=int(np.sum(outside_verified)),
    )
