"""The pre-CNN baseline: HoG features, matched by nearest reference (SAD) or by the same SVM.

`HogBackend` fulfils the FeatureExtractor protocol without TensorFlow, so `matcher.extraction`
and `train.pipeline` run HoG exactly as they run a CNN backbone (same split, cache and grid search),
and the training report can compare the two on equal terms.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import skimage
from PIL import Image, UnidentifiedImageError
from skimage.feature import hog

from matcher.domain import BackboneInfo
from matcher.errors import InvalidImageError
from matcher.images import SUPPORTED_FORMATS

#: Elements of the |query - reference| temporary in `nearest_reference_sad` (64 MiB of float32).
SAD_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class HogParams:
    """The HoG descriptor of the original attempt, on a `size` x `size` grayscale frame."""

    size: int = 128
    orientations: int = 9
    pixels_per_cell: tuple[int, int] = (8, 8)
    cells_per_block: tuple[int, int] = (2, 2)

    def describe(self, image: np.ndarray) -> np.ndarray:
        """HoG of one 2-D grayscale image, as a flat float32 vector."""
        return hog(
            image,
            orientations=self.orientations,
            pixels_per_cell=self.pixels_per_cell,
            cells_per_block=self.cells_per_block,
            block_norm="L2-Hys",
            feature_vector=True,
        ).astype(np.float32)

    @property
    def feature_dim(self) -> int:
        """Length of the descriptor, from skimage itself rather than re-derived by hand."""
        return self.describe(np.zeros((self.size, self.size), np.float32)).size


class HogBackend:
    """A FeatureExtractor computing HoG on the CPU: nothing to load, always reachable."""

    kind = "hog"

    def __init__(self, params: HogParams = HogParams(), workers: int | None = None) -> None:
        self.params = params
        # Pillow's decode and resize release the GIL, so threads overlap them with HoG (~4 ms,
        # mostly holding it): on 2 cores ~1.5x for 1600x1200 JPEGs, no gain for small ones.
        self._workers = workers or _usable_cpus()
        # skimage's version is part of the fingerprint: cached features must not outlive a
        # change in how HoG is computed.
        version = skimage.__version__  # type: ignore[attr-defined]  # not in skimage's .pyi
        key = repr((sorted(asdict(params).items()), version, "pillow-bilinear-L"))
        self._info = BackboneInfo(
            name="hog",
            version=1,
            input_size=params.size,
            feature_dim=params.feature_dim,
            fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16],
            layer="hog",
        )

    def load(self) -> None:
        """Nothing to load."""

    @property
    def ready(self) -> bool:
        return True

    @property
    def info(self) -> BackboneInfo:
        return self._info

    def features(self, images: Sequence[bytes]) -> np.ndarray:
        """float32 [len(images), feature_dim]; InvalidImageError if any image cannot be decoded."""
        if len(images) <= 1 or self._workers == 1:
            rows = [self._one(data) for data in images]
        else:
            with ThreadPoolExecutor(min(self._workers, len(images))) as pool:
                rows = list(pool.map(self._one, images))
        if not rows:
            return np.zeros((0, self._info.feature_dim), np.float32)
        return np.stack(rows)

    def _one(self, data: bytes) -> np.ndarray:
        return self.params.describe(decode_gray(data, self.params.size))


def _usable_cpus() -> int:
    """CPUs this process may run on (respects taskset and container limits on Linux)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def decode_gray(data: bytes, size: int) -> np.ndarray:
    """The first frame of an encoded image, grayscale, resized whole to `size` x `size`.

    Truncated data is refused: Pillow raises on `load()` as long as
    `ImageFile.LOAD_TRUNCATED_IMAGES` keeps its default, False, which this module never changes.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            # The same formats as the CNN path's in-graph decoder, so both see the same data set.
            if image.format not in SUPPORTED_FORMATS:
                raise InvalidImageError(
                    f"unsupported image format {image.format}; "
                    "send JPEG, PNG, HEIC, WebP, GIF or BMP"
                )
            image.load()  # first frame only: Image.open starts on frame 0 of a GIF
            # BILINEAR in Pillow is antialiased when shrinking, like the CNN path's resize.
            gray = image.convert("L").resize((size, size), Image.Resampling.BILINEAR)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise InvalidImageError(f"image could not be decoded ({len(data)} bytes): {exc}") from exc
    return np.asarray(gray, np.float32) / 255.0


def nearest_reference_sad(
    reference: np.ndarray,
    reference_labels: Sequence[str],
    queries: np.ndarray,
    batch: int = 256,
) -> list[str]:
    """The label of the reference with the smallest sum of absolute differences, per query.

    Queries go `batch` rows at a time against as many references as fit in
    SAD_CHUNK_ELEMENTS, keeping a running minimum, so memory stays bounded whatever the sizes.
    Ties go to the earlier reference.
    """
    reference = np.asarray(reference, np.float32)
    queries = np.asarray(queries, np.float32)
    if reference.ndim != 2 or queries.ndim != 2 or reference.shape[1] != queries.shape[1]:
        raise ValueError(f"shapes do not match: {reference.shape} and {queries.shape}")
    if len(reference) == 0 or len(reference) != len(reference_labels):
        raise ValueError("need one label per reference, and at least one reference")
    batch = max(1, batch)
    step = max(1, SAD_CHUNK_ELEMENTS // (batch * max(1, reference.shape[1])))
    nearest = np.empty(len(queries), np.intp)
    for q0 in range(0, len(queries), batch):
        query = queries[q0 : q0 + batch, None, :]
        best = np.full(len(query), np.inf)
        index = np.zeros(len(query), np.intp)
        for r0 in range(0, len(reference), step):
            diff = query - reference[None, r0 : r0 + step]
            # In place, and summed in float32 (numpy sums pairwise, so it stays accurate):
            # together ~2x faster than a fresh float64-summed temporary.
            sad = np.abs(diff, out=diff).sum(axis=2)
            where = sad.argmin(axis=1)
            value = sad[np.arange(len(query)), where]
            better = value < best  # strict: an equal later reference does not win the tie
            best[better] = value[better]
            index[better] = r0 + where[better]
        nearest[q0 : q0 + len(query)] = index
    return [reference_labels[int(i)] for i in nearest]
