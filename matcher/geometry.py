"""Geometric verification: does a photo show the very item of a reference view?

Pooled CNN features say what a photo *looks like*; two photos of different things of one kind
(two cats, two cups) look alike to them, and an item small on clutter looks like the clutter.
Local features say *which* thing: SIFT keypoints (OpenCV) of the photo are matched with those
of a reference view (nearest descriptor, Lowe's ratio test, each reference keypoint used
once), and a similarity transform (rotation, scale, shift: how a flat-ish item moves between
two photos) is fitted to the matches by RANSAC. The matches it explains, the *inliers*, are
the evidence: photos of the same item share tens of them at any angle, crop or background;
unrelated photos share a handful by chance (docs/benchmarks.md, "Quality": on
`bench.quality`'s photos at most 4 for all but 2 of 45 outside photos).

This is the classic spatial verification of instance retrieval (Philbin et al., CVPR 2007),
run only where it pays: the pooled features pick the candidates (the first `CANDIDATE_LABELS`
labels, each through its `CANDIDATE_VIEWS` most similar views), and the keypoints only check
them, each both ways round (`LocalFeatures.mirrored`: catalogues hold mirrored views, and
SIFT is not mirror-invariant). A label with at least `MIN_INLIERS` inliers is *verified*, and
answers when its similarity is also within `PROMOTION_MARGIN` of the best label's
(`answering`); short of that, a label geometry clearly leans to still ranks first (`leading`).

When the whole photo's keypoints verify nothing, the check looks closer (`Focus`) at each
label checked that was found in a crop view (`matcher.views`): the keypoints of that crop,
enlarged to `LOCAL_SIDE` a side, are matched on that label's photos too. An item a third of the
frame wide on clutter gets few of the whole photo's keypoints, at scales finer than SIFT keeps;
enlarged, it gets its own. A label is looked for only where its own features were found (one
label's crop is not tried on the others' photos): on `bench.quality` the looks took false
rejects from 5.5 to about 2 % and items small on clutter from 95 to 98 % top-1, and no wrong
label or outside photo reached more than 4 inliers, before or after. A photo's crops are cut
from one decode (`focused_features`).

Training stores the keypoints of every catalogue photo (`KeypointStore`, `keypoints.npz` in
the run folder: plain arrays, no pickle, listed in the manifest); the server computes the
query's from the photo the graph decodes (`matcher.images.for_graph`'s bytes), so both sides
see the same upright pixels. Photos are shrunk to at most `LOCAL_SIDE` pixels a side first:
it bounds the time (about 20 ms a photo on one core) and the keypoints' scales alike.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from matcher.errors import ModelLoadError
from matcher.images import ImageHeader, decode_upright
from matcher.index import CatalogueIndex
from matcher.layout import photo_of

#: Longest side photos are shrunk to before keypoints are found.
LOCAL_SIDE = 640
#: Keypoints kept of a catalogue photo (the strongest; 136 bytes each in the file) and of a
#: query photo, which may be mostly clutter and needs more to keep enough on the item.
REFERENCE_KEYPOINTS = 500
QUERY_KEYPOINTS = 1000
#: Photos whose keypoints a server finds at once: SIFT holds ~80 MB for a 640-pixel photo
#: (its pyramid starts at twice the size), so this bounds that memory (tests/test_memory.py).
KEYPOINT_WORKERS = 2
#: SIFT's contrast threshold (OpenCV's default is 0.04).
CONTRAST = 0.02
#: Lowe's ratio: a match counts when its nearest descriptor is clearly nearer than the next.
RATIO = 0.8
#: RANSAC's tolerance, in pixels of the shrunk photos.
REPROJECTION_PX = 4.0
#: A similarity transform scaling beyond these is no photo of the same item (and a fit that
#: shrinks everything to a point explains any matches: it is refused).
SCALES = (0.1, 10.0)
#: Inliers that verify a label: unrelated photos reach about 4 by chance.
MIN_INLIERS = 6
#: Labels checked per query (first by the pooled features), and views checked per label (its
#: most similar by the pooled features).
CANDIDATE_LABELS = 5
CANDIDATE_VIEWS = 4
#: A verified label answers (ranks first) only when its similarity comes within this of the
#: best label's: keypoints a photo shares with the *background* of a catalogue photo (one table,
#: one wall texture) verify a label that looks nothing like the photo. On the demo, whose views
#: share background textures, a logo photo had 14 inliers on a flower photo's background at
#: similarity 0.20, against 0.75 for the logo.
PROMOTION_MARGIN = 0.15
#: Below `MIN_INLIERS`, a label with at least this many inliers and strictly more than every
#: other label checked still ranks first (`leading`), without being verified: chance gives
#: 2-3 to every label, so 4 or 5 on one of two look-alikes (two halves of one star field,
#: blurred or small on clutter) is the tie-break the pooled features lack. The verdict does not
#: rest on it.
LEANING_INLIERS = 4


@dataclass(frozen=True)
class LocalFeatures:
    """A photo's keypoints: positions [K, 2] (float32 pixels) and SIFT descriptors [K, 128]
    (uint8, as OpenCV computes them)."""

    points: np.ndarray
    descriptors: np.ndarray

    @property
    def size(self) -> int:
        return len(self.points)

    def mirrored(self) -> LocalFeatures:
        """These keypoints as SIFT finds them on the photo mirrored left to right (to the
        descriptor's rounding): x negated (a similarity transform's shift absorbs the width)
        and each descriptor's cells and orientation bins reflected (`_MIRRORED`)."""
        flip = np.array([-1.0, 1.0], np.float32)
        return LocalFeatures(self.points * flip, self.descriptors[:, _MIRRORED])


#: SIFT's descriptor (OpenCV's order: 4 x 4 cells, rows then columns, x 8 orientation bins)
#: of a mirrored patch: the cell rows reversed, the orientations negated. Checked on
#: scikit-image's astronaut: SIFT of the mirrored photo gives these descriptors at the mirrored
#: points to a median 6 % of their length (tests/test_geometry.py).
_MIRRORED = np.arange(128).reshape(4, 4, 8)[::-1][:, :, -np.arange(8) % 8].ravel()


@dataclass(frozen=True)
class Focus:
    """The keypoints of one view of a query photo (`focused_features` of its box), named by
    the view so that inliers found with them are cached apart from the whole photo's."""

    view: str
    local: LocalFeatures


def _sift(count: int) -> Any:
    import cv2

    # OpenCV's defaults but half the contrast threshold (plain, blurred or small items keep
    # keypoints: a clock face 8 -> 43 on a catalogue photo, photos verified on bench.quality
    # 80 -> 84 %, chance inliers unchanged), with uint8 descriptors (a quarter of the bytes).
    return cv2.SIFT.create(count, 3, CONTRAST, 10.0, 1.6, cv2.CV_8U)


def local_features(data: bytes, count: int = QUERY_KEYPOINTS) -> LocalFeatures:
    """The keypoints of an encoded photo (what `for_graph` gives the graph), at most
    `LOCAL_SIDE` a side (blocking; InvalidImageError when it cannot be decoded)."""
    photo = decode_upright(data, LOCAL_SIDE)
    return features_of(photo, count)


def features_of(photo: Image.Image, count: int) -> LocalFeatures:
    """The keypoints of a decoded photo, shrunk to at most `LOCAL_SIDE` a side first."""
    grey = photo.convert("L")
    if max(grey.size) > LOCAL_SIDE:
        grey.thumbnail((LOCAL_SIDE, LOCAL_SIDE), Image.Resampling.BILINEAR)
    return _keypoints_of_grey(grey, count)


Box = tuple[float, float, float, float]


#: The fewest pixels a region keeps from the decode on its shorter side. Regions are brought to
#: `LOCAL_SIDE` on their longer side, so a 4:3 photo's region of 480 x 640 or more loses
#: nothing: a 12-megapixel phone photo decodes at half scale (a 0.4 crop is 806 x 605, shrunk
#: to 640 x 480 as from the whole decode, whose 1,613 x 1,210 the old rule asked for); only a
#: near-square photo's region can be enlarged, by at most 640 / 480.
FOCUS_REGION_SIDE = 480


def focus_decode_side(box: Box) -> int:
    """The side a photo's shorter side keeps when it is decoded for the keypoints of `box`
    (left, top, right, bottom, as shares of the photo): enough for the region to keep
    `FOCUS_REGION_SIDE` pixels."""
    share = min(box[2] - box[0], box[3] - box[1])
    return math.ceil(round(FOCUS_REGION_SIDE / share, 6))  # 0.7 - 0.3 is not quite 0.4


#: The most pixels a closer look decodes: a camera's 4:3 or 3:2 JPEG of any size decodes at a
#: reduced scale under it (at most 8.6 megapixels, just under 4,800 on the shorter side; 12 ->
#: 3, 24 -> 6, 48 -> 3), and a 16:9 one up to 2,370 on its shorter side or from 2,400 (a
#: 12-megapixel 16:9 frame: 9.1 whole); a huge PNG, which decodes whole, is not looked at closer
#: (its memory, beside the decodes every request makes, broke the server's bound in
#: tests/test_memory.py).
FOCUS_MAX_PIXELS = 10_000_000


def focus_decode_pixels(header: ImageHeader, box: Box) -> int | None:
    """The pixels a closer look at `box` of this photo decodes (`focused_features`), or None
    when that is beyond `FOCUS_MAX_PIXELS` and the photo is not looked at closer (the server
    and training ask the same question here)."""
    decoded = header.upright_pixels(focus_decode_side(box))
    return decoded if decoded <= FOCUS_MAX_PIXELS else None


def focus_held_pixels(decoded: int, boxes: Sequence[Box]) -> int:
    """The RGB pixels `focused_features` holds at once for a photo decoded at `decoded`
    pixels: the decode and its grey copy (a byte a pixel, Pillow's RGB takes four), then the
    regions' enlarged grey copies."""
    return decoded + math.ceil(decoded / 4) + len(boxes) * math.ceil(LOCAL_SIDE**2 / 4)


def focused_features(
    data: bytes, boxes: Sequence[Box], count: int = QUERY_KEYPOINTS
) -> list[LocalFeatures]:
    """The keypoints of regions of an encoded photo, each enlarged (or shrunk) to
    `LOCAL_SIDE` a side: an item that fills a region is then found at SIFT's scales as a
    catalogue photo of it is. One decode serves every region (decoded for the largest side
    any of them needs: a plan's crops are all one size, so a region's keypoints do not depend
    on which others share the decode), and the colour pixels are let go once the photo is
    grey (`focus_held_pixels`). Blocking; InvalidImageError when the photo cannot be
    decoded."""
    photo = decode_upright(data, max((focus_decode_side(box) for box in boxes), default=1))
    grey = photo.convert("L")
    del photo  # a large photo's colour decode is not held through the cuts and SIFT
    width, height = grey.size
    regions = []
    for left, top, right, bottom in boxes:
        x, y = round(left * width), round(top * height)
        # At least a pixel: a region of a photo a few pixels wide is empty, not an error.
        cut = grey.crop(
            (x, y, max(x + 1, round(right * width)), max(y + 1, round(bottom * height)))
        )
        scale = LOCAL_SIDE / max(cut.size)
        size = (max(1, round(cut.size[0] * scale)), max(1, round(cut.size[1] * scale)))
        regions.append(cut.resize(size, Image.Resampling.BICUBIC))
        del cut
    del grey
    return [_keypoints_of_grey(region, count) for region in regions]


def _keypoints_of_grey(grey: Image.Image, count: int) -> LocalFeatures:
    keypoints, descriptors = _sift(count).detectAndCompute(np.asarray(grey), None)
    if descriptors is None:
        return LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.uint8))
    points = np.array([k.pt for k in keypoints], dtype=np.float32).reshape(-1, 2)
    return LocalFeatures(points, np.asarray(descriptors, np.uint8))


def _root_sift(descriptors: np.ndarray) -> np.ndarray:
    """Hellinger-normalised descriptors (RootSIFT, Arandjelovic and Zisserman 2012): L2
    distances between them compare histograms better than raw SIFT's."""
    d = descriptors.astype(np.float32)
    d /= d.sum(axis=1, keepdims=True) + np.float32(1e-7)
    root: np.ndarray = np.sqrt(d)
    return root


def inliers(query: LocalFeatures, reference: LocalFeatures) -> int:
    """The matches between two photos that one similarity transform explains (0 when too few
    matches or no plausible transform): distinct query points, so repeated texture that maps
    many points onto one counts once."""
    import cv2

    if query.size < 2 or reference.size < 2:
        return 0
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(
        _root_sift(query.descriptors), _root_sift(reference.descriptors), k=2
    )
    best: dict[int, tuple[float, int]] = {}  # reference keypoint -> (distance, query keypoint)
    for pair in pairs:
        if len(pair) == 2 and pair[0].distance < RATIO * pair[1].distance:
            first = pair[0]
            kept = best.get(first.trainIdx)
            if kept is None or first.distance < kept[0]:
                best[first.trainIdx] = (first.distance, first.queryIdx)
    if len(best) < 3:
        return 0
    train = np.fromiter(best.keys(), dtype=np.int64)
    source = query.points[[q for _, q in best.values()]]
    target = reference.points[train]
    transform, mask = cv2.estimateAffinePartial2D(
        source,
        target,
        method=cv2.RANSAC,
        ransacReprojThreshold=REPROJECTION_PX,
        maxIters=2000,
        confidence=0.995,
        refineIters=10,
    )
    if transform is None or mask is None:
        return 0
    scale = float(np.sqrt(abs(np.linalg.det(transform[:, :2]))))
    if not SCALES[0] <= scale <= SCALES[1]:
        return 0
    kept_points = source[mask.ravel().astype(bool)]
    return len(np.unique(np.round(kept_points).astype(np.int32), axis=0))


def verify_labels(
    local: LocalFeatures,
    views: np.ndarray,
    columns: Iterable[int],
    index: CatalogueIndex,
    store: KeypointStore,
    cache: dict[str, int] | None = None,
    focus: Mapping[int, Focus] | None = None,
) -> dict[int, tuple[int, str]]:
    """For each label column: the most inliers `local` (the query's keypoints) has on one of
    the label's `CANDIDATE_VIEWS` catalogue photos most similar to any of `views` (the query's
    backbone features [V, D]), and that photo's id ("" when none has keypoints). With a
    `focus` for a column (the closer look at the view that label was found in), its photos'
    counts are the more of the whole photo's and the focused view's. `cache` keeps counts by
    photo id (and by focused view) across calls for the same query."""
    cache = {} if cache is None else cache
    mirror: LocalFeatures | None = None
    mirrored_focus: dict[str, LocalFeatures] = {}  # by view: labels found in one view share it
    found: dict[int, tuple[int, str]] = {}
    for column in columns:
        closer = None if focus is None else focus.get(column)
        photos: list[str] = []
        for row in index.views_by_similarity(views, column):
            photo = photo_of(index.ids[row])
            if photo not in photos and photo in store:
                photos.append(photo)
                if len(photos) == CANDIDATE_VIEWS:
                    break
        for photo in photos:
            if photo not in cache:
                # Catalogue photos are often taken mirrored (a flipped print, a view flipped to
                # add views), and SIFT is not mirror-invariant: the photo is tried both ways.
                if mirror is None:
                    mirror = local.mirrored()
                cache[photo] = max(inliers(local, store[photo]), inliers(mirror, store[photo]))
            if closer is not None and _focus_key(closer, photo) not in cache:
                if closer.view not in mirrored_focus:
                    mirrored_focus[closer.view] = closer.local.mirrored()
                cache[_focus_key(closer, photo)] = max(
                    inliers(closer.local, store[photo]),
                    inliers(mirrored_focus[closer.view], store[photo]),
                )
        counts = {
            photo: max(cache[photo], cache[_focus_key(closer, photo)] if closer else 0)
            for photo in photos
        }
        best = max(((counts[photo], photo) for photo in photos), default=(0, ""))
        found[column] = best if best[0] else (0, "")  # no inlier: on no photo in particular
    return found


def _focus_key(focus: Focus, photo: str) -> str:
    """Where a closer look's count on a catalogue photo is cached, apart from the whole
    photo's (which is cached under the photo's id)."""
    return f"{focus.view}|{photo}"


def answering(
    found: dict[int, tuple[int, str]], similarity: np.ndarray, min_inliers: int
) -> list[int]:
    """The verified label columns that may answer, most inliers first: at least `min_inliers`
    inliers and a similarity (`similarity` [L]) within `PROMOTION_MARGIN` of the best label's."""
    floor = float(np.max(similarity)) - PROMOTION_MARGIN
    kept = [
        column
        for column, (count, _) in found.items()
        if count >= min_inliers and similarity[column] >= floor
    ]
    return sorted(kept, key=lambda column: -found[column][0])


def leading(
    found: dict[int, tuple[int, str]], similarity: np.ndarray, min_inliers: int
) -> int | None:
    """The label column geometry puts first: the first of `answering`, or else the one with
    at least `LEANING_INLIERS` inliers and strictly more than any other label checked, within
    `PROMOTION_MARGIN` of the best similarity; None when geometry leans nowhere."""
    verified = answering(found, similarity, min_inliers)
    if verified:
        return verified[0]
    counts = sorted(((count, column) for column, (count, _) in found.items()), reverse=True)
    if not counts or counts[0][0] < LEANING_INLIERS:
        return None
    if len(counts) > 1 and counts[1][0] == counts[0][0]:
        return None
    column = counts[0][1]
    floor = float(np.max(similarity)) - PROMOTION_MARGIN
    return column if similarity[column] >= floor else None


class KeypointStore:
    """The keypoints of every catalogue photo, by reference id (its quarter turns share them:
    SIFT does not care which way up a photo is)."""

    def __init__(
        self, ids: Sequence[str], offsets: np.ndarray, points: np.ndarray, descriptors: np.ndarray
    ) -> None:
        offsets = np.asarray(offsets, np.int64)
        if (
            len(offsets) != len(ids) + 1
            or offsets[0] != 0
            or np.any(np.diff(offsets) < 0)
            or offsets[-1] != len(points)
            or points.shape[1:] != (2,)
            or descriptors.shape != (len(points), 128)
        ):
            raise ValueError("keypoint arrays do not fit together")
        self.ids = [str(i) for i in ids]
        self._row = {reference: row for row, reference in enumerate(self.ids)}
        self._offsets = offsets
        self._points = np.asarray(points, np.float32)
        self._descriptors = np.asarray(descriptors, np.uint8)

    @classmethod
    def of(cls, features: Iterable[tuple[str, LocalFeatures]]) -> KeypointStore:
        ids: list[str] = []
        points: list[np.ndarray] = []
        descriptors: list[np.ndarray] = []
        for reference, found in features:
            ids.append(reference)
            points.append(found.points)
            descriptors.append(found.descriptors)
        offsets = np.cumsum([0, *(len(p) for p in points)])
        return cls(
            ids,
            offsets,
            np.concatenate(points) if points else np.zeros((0, 2), np.float32),
            np.concatenate(descriptors) if descriptors else np.zeros((0, 128), np.uint8),
        )

    def __contains__(self, reference_id: str) -> bool:
        return reference_id in self._row

    def __getitem__(self, reference_id: str) -> LocalFeatures:
        row = self._row[reference_id]
        start, end = self._offsets[row], self._offsets[row + 1]
        return LocalFeatures(self._points[start:end], self._descriptors[start:end])

    @property
    def size(self) -> int:
        """Keypoints over all photos."""
        return len(self._points)

    def merged(self, other: KeypointStore) -> KeypointStore:
        """This store and `other`'s photos (an id in both keeps `other`'s keypoints)."""
        mine = [(i, self[i]) for i in self.ids if i not in other]
        return KeypointStore.of([*mine, *((i, other[i]) for i in other.ids)])

    def without(self, keep: Callable[[str], bool]) -> KeypointStore:
        """The photos whose id `keep` accepts."""
        return KeypointStore.of((i, self[i]) for i in self.ids if keep(i))

    def save(self, path: Path) -> None:
        """A plain `.npz` (written under another name, then renamed)."""
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(
            tmp,
            ids=np.asarray(self.ids, dtype=str),
            offsets=self._offsets,
            points=self._points,
            descriptors=self._descriptors,
        )
        tmp.replace(path)

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> KeypointStore:
        """Read a keypoint file's bytes (already verified by the caller); never unpickles."""
        import zipfile

        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
                return cls(
                    list(arrays["ids"]), arrays["offsets"], arrays["points"], arrays["descriptors"]
                )
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise ModelLoadError(f"keypoints {where} are not readable: {exc}") from exc
