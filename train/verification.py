"""Geometric verification at training: the catalogue's keypoints and the rescue thresholds.

`train` stores the keypoints of every catalogue photo (`matcher.geometry.KeypointStore`,
`keypoints.npz`), and calibrates, for each views mode, the similarity at which an answer that
geometry could not verify is still a match. The held-out photos and their field versions
(`train.field_photos`) are matched as the server matches a photo: the first labels by the
pooled features, each checked on its most similar training photos (`verify_labels`), a
verified label first. The rescue threshold is then the highest similarity that, together with
geometry, refuses at most `target` of the correct matches; items without texture (a smooth
gradient, a blurred clock face) are the ones it rescues. Outside photos, when there are any,
measure what the rule lets through, and lower the threshold when a lower one still refuses
all but `TARGET_FALSE_ACCEPT` of them (`calibrate_rescue`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from matcher.calibration import CURVE_POINTS
from matcher.geometry import (
    CANDIDATE_LABELS,
    REFERENCE_KEYPOINTS,
    Focus,
    KeypointStore,
    LocalFeatures,
    answering,
    focus_decode_pixels,
    focused_features,
    leading,
    local_features,
    verify_labels,
)
from matcher.images import ImageHeader, ImageLimits, inspect_image
from matcher.index import CatalogueIndex
from matcher.views import QueryView

#: Threads finding keypoints (OpenCV releases the GIL while it works).
JOBS = 2
#: Outside photos (DATA/_outside/) the rescue threshold may let through when it is lowered
#: for them (`calibrate_rescue`): below the 5 % that a "no match" worth the name allows, since
#: the outside photos a server meets are not the ones it was calibrated on.
TARGET_FALSE_ACCEPT = 0.025


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


class FocusedKeypoints:
    """The keypoints of crop views of photos (`matcher.geometry.Focus`), found when first
    asked for and kept across the views modes calibrated (their plans nest)."""

    def __init__(
        self, photos: Sequence[bytes], plan: Sequence[QueryView], progress: bool = False
    ) -> None:
        self._photos = photos
        self._plan = plan
        self._progress = progress
        self._found: dict[tuple[int, int], Focus] = {}
        self._headers: dict[int, ImageHeader] = {}

    def wants(self, photo: int, view: int) -> bool:
        """Whether geometry looks closer at this view (an index of the plan) of this photo, as
        the server would: a crop, of a photo that decodes for it within FOCUS_MAX_PIXELS."""
        if not self._plan[view].is_crop:
            return False
        if photo not in self._headers:
            self._headers[photo] = inspect_image(self._photos[photo], ImageLimits())
        return focus_decode_pixels(self._headers[photo], self._plan[view].box) is not None

    def find(self, wanted: Iterable[tuple[int, int]]) -> None:
        """Find the keypoints of these (photo, view) pairs (threads, with a progress bar):
        one decode a photo, as the server's closer looks at one photo share one."""
        by_photo: dict[int, list[int]] = {}
        for photo, view in dict.fromkeys(wanted):
            if (photo, view) not in self._found:
                by_photo.setdefault(photo, []).append(view)
        quiet = not self._progress or not by_photo
        with ThreadPoolExecutor(JOBS) as pool:
            found = pool.map(self._focus, by_photo.items())
            bar = tqdm(found, total=len(by_photo), desc="closer looks", unit="photo", disable=quiet)
            for (photo, views), looks in zip(by_photo.items(), bar, strict=True):
                self._found.update(
                    ((photo, view), look) for view, look in zip(views, looks, strict=True)
                )

    def _focus(self, job: tuple[int, list[int]]) -> list[Focus]:
        photo, views = job
        boxes = [self._plan[view].box for view in views]
        found = focused_features(self._photos[photo], boxes)
        return [
            Focus(self._plan[view].name, local) for view, local in zip(views, found, strict=True)
        ]

    def __getitem__(self, pair: tuple[int, int]) -> Focus:
        return self._found[pair]


def check_photos(
    local: Sequence[LocalFeatures],
    views: np.ndarray,
    order: np.ndarray,
    similarity: np.ndarray,
    seen: CatalogueIndex,
    store: KeypointStore,
    min_inliers: int,
    caches: Sequence[dict[str, int]],
    best_view: np.ndarray | None = None,
    focused: FocusedKeypoints | None = None,
) -> Checked:
    """Each photo's answer: its first `CANDIDATE_LABELS` of `order` [N, L] checked on their
    views in `seen` closest to the photo's `views` [N, V, D], a verified label answering as
    the server lets it (`answering`, on each label's `similarity` [N, L]); `caches` (one per
    photo) keep the inliers of a photo pair across the modes. With `best_view` (each label's
    view of the photo most similar to it [N, L]) and `focused`, a photo nothing verified is
    looked at closer, as the server does: each label checked, in the crop view it was found
    in."""
    first = order[:, 0].copy()
    verified = np.zeros(len(order), bool)
    most = np.zeros(len(order), np.int64)
    candidates = order[:, :CANDIDATE_LABELS]

    def check(i: int, focus: dict[int, Focus] | None = None) -> None:
        columns = candidates[i].tolist()
        found = verify_labels(local[i], views[i], columns, seen, store, caches[i], focus)
        most[i] = max(count for count, _ in found.values())
        first_column = leading(found, similarity[i], min_inliers)
        first[i] = order[i, 0] if first_column is None else first_column
        verified[i] = bool(answering(found, similarity[i], min_inliers))

    for i in range(len(order)):
        check(i)
    if best_view is not None and focused is not None:
        # Each label checked, at the crop view it was found in, where the server looks too.
        closer = {
            i: {
                column: view
                for column in candidates[i].tolist()
                if focused.wants(i, view := int(best_view[i, column]))
            }
            for i in np.flatnonzero(~verified).tolist()
        }
        focused.find((i, view) for i, looks in closer.items() for view in looks.values())
        for i, looks in closer.items():
            if looks:
                check(i, {column: focused[i, view] for column, view in looks.items()})
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
    #: Whether the outside photos set it (lower than the false-reject target alone would).
    set_by_outside: bool = False
    #: Catalogue photos scored against the items they are not (stand-ins for outside photos:
    #: `train.photo_views.impostor_similarity`), and the share of them it lets through.
    impostor_photos: int = 0
    impostor_accept_rate: float | None = None
    #: Whether, without outside photos, those stand-ins set it (lower than the target alone).
    set_by_impostors: bool = False
    #: The whole rule at other thresholds (`rescue_curve`): {"threshold", "false_reject",
    #: "false_accept", "impostor_accept"} points, thresholds ascending.
    curve: list[dict[str, float | None]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibrate_rescue(
    similarity: np.ndarray,
    verified: np.ndarray,
    outside_similarity: np.ndarray,
    outside_verified: np.ndarray,
    target: float,
    outside_target: float = TARGET_FALSE_ACCEPT,
    impostors: np.ndarray | None = None,
) -> RescueCalibration:
    """The rescue threshold for correct matches (`similarity`, `verified`: theirs) and outside
    photos (theirs): the highest that, with geometry, refuses at most `target` of the correct
    matches (1.0, similarity alone never suffices, when geometry alone keeps that many), or,
    when outside photos show that a lower one still refuses all but `outside_target` of them,
    that lower one. Without outside photos, `impostors` (catalogue photos' similarity to the
    items they are not: `train.photo_views.impostor_similarity`) stand in for them.

    The first rule alone grows stricter as geometry verifies more (the photos left to rescue
    are then the fewer, plainer ones), and field photos harder than the calibration's are
    refused the more: on `bench.quality` 9 % of correct field matches at 0.595, where the
    outside photos of the catalogue's own `_outside/` were all refused from 0.503. Without
    outside photos the first rule gave 0.663 there (6 % of correct field matches refused);
    the impostors gave 0.49, about where the outside photos put it."""
    if len(similarity) == 0:
        raise ValueError("no correct held-out match to set the rescue threshold on")
    unverified = np.sort(similarity[~verified])
    allowed = math.floor(target * len(similarity))
    threshold = float(unverified[allowed]) if len(unverified) > allowed else 1.0
    stand_ins = np.zeros(0) if impostors is None else np.asarray(impostors)
    # The outside photos, where there are any, may lower it; else the stand-ins (none of which
    # geometry verified: their own item's photos are the ones they were matched on).
    has_outside = len(outside_similarity) > 0
    lenient = (
        _refusing_outside(outside_similarity, outside_verified, outside_target)
        if has_outside
        else _refusing_outside(stand_ins, np.zeros(len(stand_ins), bool), outside_target)
    )
    lowered = lenient is not None and lenient < threshold
    if lenient is not None and lowered:
        threshold = lenient
    set_by_outside, set_by_impostors = lowered and has_outside, lowered and not has_outside
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
        set_by_outside=set_by_outside,
        impostor_photos=len(stand_ins),
        impostor_accept_rate=float(np.mean(stand_ins >= threshold)) if len(stand_ins) else None,
        set_by_impostors=set_by_impostors,
        curve=rescue_curve(similarity, verified, outside_similarity, outside_verified, stand_ins),
    )


def rescue_curve(
    similarity: np.ndarray,
    verified: np.ndarray,
    outside_similarity: np.ndarray,
    outside_verified: np.ndarray,
    stand_ins: np.ndarray,
) -> list[dict[str, float | None]]:
    """What the rule (verified, or similar enough) does at `CURVE_POINTS` rescue thresholds
    across the similarities it decides on: the correct matches it refuses, the outside photos
    it takes (None without any) and the catalogue's stand-ins it takes (None without)."""
    every = np.concatenate(
        [similarity[~verified], outside_similarity[~outside_verified], stand_ins]
    )
    if len(every) == 0:
        return []
    points = []
    for t in np.linspace(float(every.min()), float(every.max()), CURVE_POINTS):
        points.append(
            {
                "threshold": round(float(t), 5),
                "false_reject": float(np.mean(~verified & (similarity < t))),
                "false_accept": float(np.mean(outside_verified | (outside_similarity >= t)))
                if len(outside_similarity)
                else None,
                "impostor_accept": float(np.mean(stand_ins >= t)) if len(stand_ins) else None,
            }
        )
    return points


def _refusing_outside(similarity: np.ndarray, verified: np.ndarray, target: float) -> float | None:
    """The lowest threshold at which at most `target` of the outside photos are accepted
    (verified ones are, at any threshold); None without outside photos, or when geometry
    already accepts more than that."""
    allowed = math.floor(target * len(similarity)) - int(np.sum(verified))
    if len(similarity) == 0 or allowed < 0:
        return None
    rescued = np.sort(similarity[~verified])[::-1]  # highest first
    if len(rescued) <= allowed:
        return -1.0
    return float(np.nextafter(np.float32(rescued[allowed]), np.float32(np.inf)))
