"""Views of training photos through the backbone: turned references, and per-mode thresholds.

Both cut photos with `matcher.views`, the code the server cuts query photos with:

- **Turned references** (`turned_features`): each catalogue photo turned by 90, 180 and 270
  degrees joins the index beside it (ids `<photo id>@90`, ...), so a field photo taken at any
  angle meets a reference at most 45 degrees from it. It costs training three more backbone
  passes per photo and the query nothing; `train --no-turned-views` leaves them out.
- **A no-match threshold for each views mode** (`calibrate_views`): looking at more views of a
  photo raises its best similarity, for catalogue photos and outside ones alike, so the whole
  photo's threshold would let more outside photos through when a request asks for crops. The
  held-out photos, their field versions (`train.field_photos`) and the outside photos are cut
  into that mode's views, each view is searched in the training views' index, each photo keeps
  its best view per label (as the core merges them), and `matcher.calibration.calibrate` picks
  the threshold.

Features of views are cached like those of files (`FeatureCache`, by the sha256 of the encoded
view, which the cut makes byte for byte the same each run).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from matcher.backends.base import FeatureExtractor
from matcher.calibration import NoMatchCalibration, calibrate
from matcher.classifier import merge_views
from matcher.extraction import FeatureCache
from matcher.geometry import MIN_INLIERS, QUERY_KEYPOINTS, KeypointStore
from matcher.images import ImageLimits, for_graph, inspect_image
from matcher.index import CatalogueIndex
from matcher.layout import TURN_MARK
from matcher.views import FALLBACK_INPUT_SIDE, PLANS, TURNED, QueryView, render, rewrite_side
from train.field_photos import PER_PHOTO, field_kinds, field_versions
from train.verification import (
    FocusedKeypoints,
    RescueCalibration,
    calibrate_rescue,
    check_photos,
    photo_keypoints,
)

log = logging.getLogger(__name__)

#: Two items are twins to the pooled features when the median photo of one is less than this
#: more similar to its own item than to the other (`twin_labels`). On `bench.quality` the two
#: halves of one star field are 0.004-0.03 apart and every other pair at least 0.33.
TWIN_MARGIN = 0.1

#: Scores [N, L] of feature rows for each label (higher is better), in `CatalogueIndex.labels`
#: order: what the run's matcher ranks by.
Scorer = Callable[[np.ndarray], np.ndarray]


def photo_views(
    photos: Iterable[bytes],
    count: int,
    plan: Sequence[QueryView],
    backend: FeatureExtractor,
    cache: FeatureCache | None = None,
    batch_size: int = 32,
    progress: bool = False,
    what: str = "views",
) -> np.ndarray:
    """float32 [count, len(plan), D]: the features of each photo's views, as the server
    computes them, for `count` encoded photos (readable ones: extraction read them first)."""
    # As the server cuts them (`MatcherCore._input_side`): TF Serving does not say its input.
    side = backend.info.input_size or FALLBACK_INPUT_SIDE
    dim = backend.info.feature_dim
    features = np.zeros((count * len(plan), dim), np.float32)
    pending: list[tuple[int, bytes, str]] = []  # row, view, sha256

    def flush() -> None:
        computed = backend.features([view for _, view, _ in pending])
        for (row, _, digest), vector in zip(pending, computed, strict=True):
            features[row] = vector
            if cache:
                cache.put(digest, vector)
        pending.clear()

    row = 0
    for data in tqdm(photos, total=count, desc=what, unit="photo", disable=not progress):
        upright = for_graph(data, inspect_image(data, ImageLimits()), rewrite_side(side))
        for view in render(upright, plan, side):
            digest = hashlib.sha256(view).hexdigest()
            found = cache.get(digest) if cache else None
            if found is not None:  # FeatureCache(dim=...) has checked its shape
                features[row] = found
            else:
                pending.append((row, view, digest))
                if len(pending) >= batch_size:
                    flush()
            row += 1
    if pending:
        flush()
    if row != len(features):
        raise ValueError(f"expected {count} photos, got {row // len(plan)}")
    return features.reshape(count, len(plan), dim)


def _read(paths: Sequence[Path]) -> Iterator[bytes]:
    return (path.read_bytes() for path in paths)


def turned_features(
    paths: Sequence[Path],
    ids: Sequence[str],
    backend: FeatureExtractor,
    cache: FeatureCache | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> tuple[np.ndarray, list[str]]:
    """Features [3 N, D] of each photo's quarter turns, and their ids, photo by photo."""
    features = photo_views(
        _read(paths), len(paths), TURNED, backend, cache, batch_size, progress, "turned views"
    )
    turned_ids = [f"{photo}{TURN_MARK}{90 * view.turn}" for photo in ids for view in TURNED]
    return features.reshape(-1, features.shape[-1]), turned_ids


@dataclass(frozen=True)
class ViewsCalibration:
    """A views mode's threshold and the held-out accuracy the matcher reached with it."""

    calibration: NoMatchCalibration
    #: Top-1 on the held-out photos as they are, and on their field versions.
    holdout_accuracy: float
    field_accuracy: float
    #: Each field version's true label and the label the matcher ranked first.
    field_truth: list[str]
    field_predicted: list[str]
    #: The rescue threshold of geometric verification (`train.verification`); None without.
    rescue: RescueCalibration | None = None

    def field_accuracy_by_label(self) -> dict[str, float]:
        truth, predicted = np.array(self.field_truth), np.array(self.field_predicted)
        return {
            str(label): float(np.mean(predicted[truth == label] == label))
            for label in set(self.field_truth)
        }


def calibrate_views(
    modes: Sequence[str],
    seen: CatalogueIndex,
    held_out: tuple[Sequence[Path], Sequence[str]],
    outside: Sequence[Path],
    score: Scorer,
    matcher: str,
    backend: FeatureExtractor,
    target: float,
    cache: FeatureCache | None = None,
    batch_size: int = 32,
    progress: bool = False,
    keypoints: KeypointStore | None = None,
    min_inliers: int = MIN_INLIERS,
) -> dict[str, ViewsCalibration]:
    """The threshold of each of `modes`: held-out photos as they are and as field photos
    (`train.field_photos`), searched in `seen`, the training views; outside photos measure it.
    With `keypoints` (the training photos'), each mode's answers are also checked by geometry
    as the server checks them, and its rescue threshold is calibrated on them.

    The modes' plans nest (each is the start of the next), so every photo is cut and run
    through the backbone once, for the widest plan, and each mode reads its first views."""
    widest = max((PLANS[mode] for mode in modes), key=len)
    if any(PLANS[mode] != widest[: len(PLANS[mode])] for mode in modes):
        raise ValueError(f"the plans of {list(modes)} do not nest")
    paths, labels = held_out
    args = (widest, backend, cache, batch_size, progress)
    as_taken = photo_views(_read(paths), len(paths), *args, "held-out views")
    field = photo_views(field_versions(paths), PER_PHOTO * len(paths), *args, "field versions")
    beyond = photo_views(_read(outside), len(outside), *args, "outside views")
    truth, names = np.array(labels), np.array(seen.labels)
    field_truth = np.repeat(truth, PER_PHOTO)
    # Photos that stand in for outside ones where there are none: every held-out photo and
    # field version but those on clutter, which is cut from other items' photos.
    impostor_rows = np.concatenate(
        [np.ones(len(truth), bool), np.array(field_kinds(len(paths))) != "small_on_clutter"]
    )
    local = None
    if keypoints is not None:  # the photos as the server would see them, in the same order
        photos = [*_read(paths), *field_versions(paths), *_read(outside)]
        local = photo_keypoints(photos, len(photos), QUERY_KEYPOINTS, progress, "photo keypoints")
        caches: list[dict[str, int]] = [{} for _ in photos]
        focused = FocusedKeypoints(photos, widest, progress)
    found = {}
    for mode in modes:
        views = len(PLANS[mode])
        every = np.concatenate([as_taken, field, beyond])[:, :views]
        nearest, order, by_label, best_view = _best(every, seen, score, matcher)
        inside = len(as_taken) + len(field)
        truths = np.concatenate([truth, field_truth])
        rescue = None
        first = order[:inside, 0]
        if local is not None and keypoints is not None:
            checked = check_photos(
                local,
                every,
                order,
                by_label,
                seen,
                keypoints,
                min_inliers,
                caches,
                best_view,
                focused,
            )
            first = checked.first[:inside]
            right = names[first] == truths
            rescue = calibrate_rescue(
                nearest[:inside][right],
                checked.verified[:inside][right],
                nearest[inside:],
                checked.inliers[inside:] >= min_inliers,
                target,
                impostors=impostor_similarity(by_label[:inside], truths, names, impostor_rows),
            )
        correct = names[order[:inside, 0]] == truths
        answered = names[first] == truths  # as served: a verified label first
        taken_correct, field_correct = answered[: len(truth)], answered[len(truth) :]
        found[mode] = ViewsCalibration(
            calibrate(nearest[:inside][correct], nearest[inside:], target),
            float(taken_correct.mean()),
            float(field_correct.mean()),
            field_truth.tolist(),
            names[first[len(truth) :]].tolist(),
            rescue,
        )
    return found


def impostor_similarity(
    by_label: np.ndarray, truths: np.ndarray, names: np.ndarray, rows: np.ndarray
) -> np.ndarray:
    """What catalogue photos score where their own item is not in the catalogue: stand-ins
    for outside photos when there are none (`calibrate_rescue`).

    Each photo of `rows` (of `by_label` [N, L], each label's similarity, `truths` [N] their
    labels) keeps its most similar label other than its own and its item's twins
    (`twin_labels`): a photo of one half of a star field is near the other half, which is
    the ranking's and geometry's business, not what an outside photo looks like. Photos
    whose every other label is a twin are left out."""
    column = {str(name): i for i, name in enumerate(names)}
    rows = rows & np.array([str(label) in column for label in truths], dtype=bool)
    own = np.array([column.get(str(label), 0) for label in truths], dtype=np.int64)
    others = np.array(by_label, dtype=np.float64)
    others[np.arange(len(own)), own] = -np.inf
    others[twin_labels(by_label, own, rows)[own]] = -np.inf
    best = others.max(axis=1)[rows]
    kept: np.ndarray = best[np.isfinite(best)]
    return kept


def twin_labels(by_label: np.ndarray, own: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """[L, L]: the pairs of labels whose photos the pooled features barely tell apart: the
    median photo of either is within `TWIN_MARGIN` as similar to the other as to its own."""
    labels = by_label.shape[1]
    own_similarity = by_label[np.arange(len(own)), own]
    margin = np.full((labels, labels), np.inf)
    for label in range(labels):
        photos = rows & (own == label)
        if photos.any():
            margin[label] = np.median(own_similarity[photos, None] - by_label[photos], axis=0)
    np.fill_diagonal(margin, np.inf)
    twins: np.ndarray = (margin < TWIN_MARGIN) | (margin.T < TWIN_MARGIN)
    return twins


def _best(
    photos: np.ndarray, seen: CatalogueIndex, score: Scorer, matcher: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each photo's nearest-view similarity over all its views, its label columns ranked
    [N, L], its views merged as the server merges a request's (`merge_views`), each label's
    similarity over its views [N, L], and the view it came from [N, L]."""
    labels = len(seen.labels)
    if len(photos) == 0:
        none = np.zeros((0, labels), dtype=np.int64)
        return np.zeros(0), none, np.zeros((0, labels)), none
    count, views, dim = photos.shape
    stacked = np.ascontiguousarray(photos).reshape(count * views, dim)
    similarity = seen.search(stacked).similarity.reshape(count, views, -1)
    scores = np.asarray(score(stacked)).reshape(count, views, -1)
    order = [
        np.argsort(-merge_views(matcher, s, n), kind="stable")
        for s, n in zip(scores, similarity, strict=True)
    ]
    return (
        similarity.max(axis=(1, 2)),
        np.array(order, dtype=np.int64),
        similarity.max(axis=1),
        similarity.argmax(axis=1),
    )
