"""Features for a list of image files, through a feature backend, in batches, cached.

Features are cached per model and per file content (sha256), so a rerun, a renamed file or a
second copy of a photo costs nothing.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from service.backends.base import FeatureBackend
from service.errors import InvalidImageError
from service.images import ImageLimits, inspect_image

log = logging.getLogger(__name__)


class FeatureCache:
    """One .npy file per (model, image content) under `root/<model key>/`."""

    def __init__(self, root: Path, model_key: str) -> None:
        self.dir = root / model_key

    def _path(self, digest: str) -> Path:
        return self.dir / digest[:2] / f"{digest}.npy"

    def get(self, digest: str) -> np.ndarray | None:
        path = self._path(digest)
        return np.load(path) if path.is_file() else None

    def put(self, digest: str, features: np.ndarray) -> None:
        path = self._path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, features.astype(np.float32))
        tmp.replace(path)  # atomic: an interrupted run never leaves a torn entry


@dataclass(frozen=True)
class Extraction:
    """Features of the images that could be read, and the paths that could not."""

    features: np.ndarray
    kept: list[int]
    rejected: dict[Path, str]
    computed: int


def extract_features(
    paths: Sequence[Path],
    backend: FeatureBackend,
    cache: FeatureCache | None,
    batch_size: int = 32,
    limits: ImageLimits | None = None,
    progress: bool = True,
) -> Extraction:
    """Features for `paths` in order; unreadable images are skipped and reported."""
    limits = limits or ImageLimits()
    found: dict[int, np.ndarray] = {}
    rejected: dict[Path, str] = {}
    pending: list[tuple[int, str, bytes]] = []
    computed = 0
    bar = tqdm(total=len(paths), unit="img", desc="features", disable=not progress)
    for index, path in enumerate(paths):
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        cached = cache.get(digest) if cache else None
        if cached is not None:
            found[index] = cached
            bar.update(1)
            continue
        try:
            inspect_image(data, limits)
        except InvalidImageError as exc:
            rejected[path] = str(exc)
            bar.update(1)
            continue
        pending.append((index, digest, data))
        if len(pending) == batch_size:
            computed += _run_batch(pending, backend, cache, found, rejected, paths, bar)
            pending = []
    if pending:
        computed += _run_batch(pending, backend, cache, found, rejected, paths, bar)
    bar.close()
    kept = sorted(found)
    dim = backend.info.feature_dim
    matrix = np.stack([found[i] for i in kept]) if kept else np.zeros((0, dim), np.float32)
    return Extraction(matrix.astype(np.float32), kept, rejected, computed)


def _run_batch(
    batch: list[tuple[int, str, bytes]],
    backend: FeatureBackend,
    cache: FeatureCache | None,
    found: dict[int, np.ndarray],
    rejected: dict[Path, str],
    paths: Sequence[Path],
    bar: tqdm,
) -> int:
    try:
        features = backend.features([data for _, _, data in batch])
    except InvalidImageError:
        if len(batch) == 1:
            index = batch[0][0]
            rejected[paths[index]] = "could not be decoded"
            bar.update(1)
            return 0
        # One bad file fails the whole batch: find it by running the images one at a time.
        return sum(
            _run_batch([item], backend, cache, found, rejected, paths, bar) for item in batch
        )
    for (index, digest, _), row in zip(batch, features, strict=True):
        found[index] = row
        if cache:
            cache.put(digest, row)
    bar.update(len(batch))
    return len(batch)
