"""Features for a list of image files, through a feature backend: a prefetching pipeline.

Three stages run at once, so the model is never left waiting on the disk:

1. Readers (a small thread pool) read each file, hash it, look it up in the cache and check its
   header, `prefetch * batch_size` files ahead of the model, in input order.
2. A prefetch thread groups what the readers found into batches and queues up to `prefetch`
   of them.
3. The calling thread runs the model on one batch at a time (TensorFlow releases the GIL, so
   stages 1 and 2 keep going meanwhile) and appends the kept rows, in input order, to a sink:
   a `.npy` opened as a memory map when `out` is given, else an array in memory.

Memory therefore depends on the batch size and the prefetch depth, not on the number of images:
a run over 50,000 files holds a few batches of encoded bytes, and its features live on disk.

Features are cached per model and per file content (sha256), so a rerun, a renamed file or a
second copy of a photo costs nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import threading
import uuid
from collections import deque
from collections.abc import Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Generic, TypeVar, cast

import numpy as np
from tqdm import tqdm

from matcher.backends.base import FeatureExtractor
from matcher.errors import InvalidImageError
from matcher.images import ImageLimits, for_graph, inspect_image
from matcher.isolate import answer_each
from matcher.views import rewrite_side

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Batches read ahead of the one the model is running on. Two keep the model fed when reading
#: a batch takes up to twice as long as running it, at the cost of two batches of bytes in RAM.
DEFAULT_PREFETCH = 2
#: Threads reading files. Reading, hashing and header checks mostly run outside the GIL, and
#: on a slow disk several reads in flight hide its latency.
DEFAULT_READERS = 2


class FeatureCache:
    """One .npy file per (model, image content) under `root/<model key>/ab/<sha256>.npy`."""

    def __init__(self, root: Path, model_key: str, dim: int | None = None) -> None:
        self.root = root
        self.model_key = model_key
        self.dir = root / model_key
        #: The feature size every entry must have (None: not checked).
        self.dim = dim

    def _path(self, digest: str) -> Path:
        return self.dir / digest[:2] / f"{digest}.npy"

    def get(self, digest: str) -> np.ndarray | None:
        """The cached features of the image with this sha256, or None."""
        path = self._path(digest)
        if not path.is_file():
            return None
        try:
            row = np.asarray(np.load(path))
        except (OSError, ValueError, EOFError) as exc:
            # Entries are written atomically, so this is damage from outside: recompute.
            log.warning("ignoring unreadable cache entry %s: %s", path, exc)
            return None
        if self.dim is not None and (
            row.shape != (self.dim,) or row.dtype != np.float32 or not np.isfinite(row).all()
        ):
            log.warning(
                "ignoring cache entry %s: %s %s, not %d finite float32 features",
                path, row.dtype, row.shape, self.dim,
            )  # fmt: skip
            return None
        return row

    def put(self, digest: str, features: np.ndarray) -> None:
        """Store the features of the image with this sha256."""
        path = self._path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A unique temporary name: two copies of one photo in a run may be written at once.
        tmp = path.with_name(f"{digest}.{uuid.uuid4().hex}.tmp.npy")
        np.save(tmp, np.asarray(features, dtype=np.float32))
        tmp.replace(path)  # atomic: an interrupted run never leaves a torn entry

    def put_many(self, digests: Sequence[str], rows: np.ndarray) -> None:
        """Store one row of `rows` per digest."""
        for digest, row in zip(digests, rows, strict=True):
            self.put(digest, row)


@dataclass(frozen=True)
class Extraction:
    """Features of the images that could be read, and the paths that could not.

    `features[j]` belongs to `paths[kept[j]]`; rows keep the input order. With `out`, the
    features are a read-only memory map of that file, so they need not fit in memory.
    """

    features: np.ndarray
    kept: list[int]
    rejected: dict[Path, str]
    computed: int
    #: The `.npy` holding `features` (None when they are in memory).
    out: Path | None = None
    #: Photos each Ray node computed or looked up, by node id (None: extracted locally).
    nodes: dict[str, int] | None = None


def kept_mask_path(out: Path) -> Path:
    """Where `extract_features(..., out=out)` writes its kept mask (bool [len(paths)])."""
    return out.with_name(f"{out.stem}.kept.npy")


def extract_features(
    paths: Sequence[Path],
    backend: FeatureExtractor,
    cache: FeatureCache | None,
    batch_size: int = 32,
    limits: ImageLimits | None = None,
    progress: bool = True,
    *,
    out: Path | None = None,
    prefetch: int = DEFAULT_PREFETCH,
    readers: int = DEFAULT_READERS,
) -> Extraction:
    """Features for `paths` in order; unreadable images are skipped and reported.

    The backend sees batches of up to `batch_size` encoded images while the next batches are
    read. With `out` (a `.npy` path), features are streamed to that file and returned as a
    memory map of it, and `kept_mask_path(out)` marks which paths have a row; the file appears
    only once the run is complete. The progress bar counts images per second.
    """
    if batch_size < 1 or prefetch < 1 or readers < 1:
        raise ValueError("batch_size, prefetch and readers must be at least 1")
    limits = limits or ImageLimits()
    sink = FeatureSink(out, len(paths), backend.info.feature_dim)
    run = _Run(paths, backend, cache, sink)
    try:
        with (
            ThreadPoolExecutor(readers, thread_name_prefix="features-read") as pool,
            tqdm(total=len(paths), unit="img", desc="features", disable=not progress) as bar,
        ):
            side = backend.info.input_size
            scanned = _scan(paths, cache, limits, side, pool, window=prefetch * batch_size)
            with _Prefetch(_batches(scanned, batch_size), prefetch) as batches:
                for batch in batches:
                    run.consume(batch, pool)
                    bar.update(len(batch))
            run.wait_for_cache_writes()
    except BaseException:
        sink.abort()
        raise
    features = sink.finish(run.kept)
    return Extraction(features, run.kept, run.rejected, run.computed, out)


@dataclass
class Scanned:
    """One file after reading (`scan_file`): exactly one of `data` (to compute), `row` (from
    the cache), `error` is set."""

    index: int
    digest: str = ""
    data: bytes | None = None
    row: np.ndarray | None = None
    error: str | None = None


def scan_file(
    index: int, path: Path, cache: FeatureCache | None, limits: ImageLimits, input_side: int
) -> Scanned:
    """Read, hash, look up in the cache and check one file (the readers' stage), for a network
    of `input_side` (what a rewritten photo keeps: `for_graph`)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return Scanned(index, error=f"could not be read: {exc.strerror or exc}")
    digest = hashlib.sha256(data).hexdigest()
    try:
        header = inspect_image(data, limits)
    except InvalidImageError as exc:
        return Scanned(index, digest, error=str(exc))
    keep = rewrite_side(input_side)
    if header.needs_rewrite:
        # Its features are those of the rewrite (a turned JPEG's at the scale `keep` picks):
        # cached apart from what another rule (a whole rewrite, before 2026-12-03) gave.
        digest = f"{digest}-upright{keep}"
    row = cache.get(digest) if cache else None
    if row is not None:
        return Scanned(index, digest, row=row)
    try:
        # The same bytes the server would send the graph (HEIC, WebP, turned photos rewritten).
        prepared = for_graph(data, header, keep)
    except InvalidImageError as exc:
        return Scanned(index, digest, error=str(exc))
    return Scanned(index, digest, data=prepared)


def _scan(
    paths: Sequence[Path],
    cache: FeatureCache | None,
    limits: ImageLimits,
    input_side: int,
    pool: ThreadPoolExecutor,
    window: int,
) -> Generator[Scanned, None, None]:
    """Every file scanned by the pool, in input order, at most `window` files ahead."""
    ahead: deque[Future[Scanned]] = deque()
    try:
        for index, path in enumerate(paths):
            ahead.append(pool.submit(scan_file, index, path, cache, limits, input_side))
            if len(ahead) >= window:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()
    finally:
        for future in ahead:  # stopped early: do not read what nobody will use
            future.cancel()


def _batches(scanned: Iterable[Scanned], batch_size: int) -> Generator[list[Scanned], None, None]:
    """Consecutive runs of scanned files holding `batch_size` to compute (fewer at the end).

    A run also closes after `batch_size` files that need no model call (cached or rejected),
    so a mostly cached folder still moves the progress bar and holds little in memory.
    """
    batch: list[Scanned] = []
    to_compute = 0
    for item in scanned:
        batch.append(item)
        to_compute += item.data is not None
        if to_compute == batch_size or len(batch) - to_compute == batch_size:
            yield batch
            batch, to_compute = [], 0
    if batch:
        yield batch


class _Failed:
    """An exception raised in the prefetch thread, to be raised again in the consumer."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


_DONE = object()


class _Prefetch(Generic[T]):
    """Runs a generator in a thread, up to `depth` items ahead of the consumer."""

    def __init__(self, source: Generator[T, None, None], depth: int) -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._fill, args=(source,), name="features-prefetch", daemon=True
        )

    def __enter__(self) -> Iterator[T]:
        self._thread.start()
        return self._drain()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:  # free a producer blocked on a full queue
                self._queue.get_nowait()
        self._thread.join()

    def _drain(self) -> Iterator[T]:
        while (item := self._queue.get()) is not _DONE:
            if isinstance(item, _Failed):
                raise item.error
            yield cast(T, item)

    def _fill(self, source: Generator[T, None, None]) -> None:
        # Closed here, in the thread that runs it: closing stops the readers' look-ahead.
        with contextlib.closing(source):
            try:
                for item in source:
                    if not self._put(item):
                        return
            except BaseException as exc:
                self._put(_Failed(exc))
                return
        self._put(_DONE)

    def _put(self, item: object) -> bool:
        """Queue `item` unless the consumer has gone; False when it has."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False


class FeatureSink:
    """Kept rows, appended in input order, in memory or to a `.npy` file (`append`, then
    `finish` with the kept indices, or `abort`).

    The file is written, not memory-mapped while it fills: written pages of a mapping count in
    the process's resident memory (244 MB more peak RSS at 50,000 images), file writes only
    in the kernel's page cache. The finished file is mapped read-only.
    """

    def __init__(self, out: Path | None, rows: int, dim: int) -> None:
        self._out = out
        self._total = rows
        self._dim = dim
        self.count = 0
        self._file: BinaryIO | None = None
        if out is None:
            self._partial = None
            self._array: np.ndarray = np.empty((rows, dim), np.float32)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            # Written under another name: a file at `out` is always a complete run.
            self._partial = out.with_name(f"{out.name}.partial")
            header = np.lib.format.open_memmap(
                self._partial, mode="w+", dtype=np.float32, shape=(rows, dim)
            )
            self._offset = header.offset
            del header  # only the header and the file's size were wanted
            self._file = self._partial.open("r+b")
            self._file.seek(self._offset)

    def append(self, block: np.ndarray) -> None:
        if self._file is None:
            self._array[self.count : self.count + len(block)] = block
        else:
            self._file.write(np.ascontiguousarray(block, dtype=np.float32).tobytes())
        self.count += len(block)

    def finish(self, kept: list[int]) -> np.ndarray:
        """The kept rows: a view in memory, or the finished file mapped read-only."""
        if self._file is None or self._out is None or self._partial is None:
            return self._array[: self.count]
        self._file.close()
        _truncate_npy(self._partial, self.count, self._dim, self._offset)
        mask = np.zeros(self._total, dtype=bool)
        mask[kept] = True
        np.save(kept_mask_path(self._out), mask)
        os.replace(self._partial, self._out)
        mapped: np.ndarray = np.load(self._out, mmap_mode="r")
        return mapped

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._partial is not None:
            self._partial.unlink(missing_ok=True)


def _truncate_npy(path: Path, rows: int, dim: int, offset: int) -> None:
    """Make a float32 [N, dim] `.npy` (version 1.0 header) hold only its first `rows` rows.

    The header is rewritten in place at its old length (fewer rows never need more digits), so
    the data stays where it is and the file is cut after the last kept row.
    """
    descr = np.lib.format.dtype_to_descr(np.dtype(np.float32))
    text = repr({"descr": descr, "fortran_order": False, "shape": (rows, dim)})
    prefix = 10  # magic (6), version (2), header length (2)
    with path.open("r+b") as file:
        if np.lib.format.read_magic(file) != (1, 0):
            raise ValueError(f"{path}: expected a version 1.0 .npy header")
        size = offset - prefix
        file.seek(prefix)
        file.write(text.ljust(size - 1).encode("latin1") + b"\n")
        file.truncate(offset + rows * dim * np.dtype(np.float32).itemsize)


def compute_batch(
    backend: FeatureExtractor, batch: Sequence[Scanned]
) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    """Features of the batch's files that need the model, by input index, and why the model
    refused the others (one undecodable image does not fail its batch)."""
    new = [item for item in batch if item.data is not None]
    computed: dict[int, np.ndarray] = {}
    failures: dict[int, str] = {}
    if not new:
        return computed, failures
    answers = answer_each(backend.features, [item.data or b"" for item in new])
    for item, answer in zip(new, answers, strict=True):
        if isinstance(answer, InvalidImageError):
            failures[item.index] = str(answer)
        else:
            computed[item.index] = answer
    return computed, failures


class _Run:
    """What the consumer (the calling thread) keeps: counts, rejections and the sink."""

    def __init__(
        self,
        paths: Sequence[Path],
        backend: FeatureExtractor,
        cache: FeatureCache | None,
        sink: FeatureSink,
    ) -> None:
        self.paths = paths
        self.backend = backend
        self.cache = cache
        self.sink = sink
        self.kept: list[int] = []
        self.rejected: dict[Path, str] = {}
        self.computed = 0
        self._writes: deque[Future[None]] = deque()

    def consume(self, batch: list[Scanned], pool: ThreadPoolExecutor) -> None:
        """Run the model on the batch's new images and append its kept rows to the sink."""
        computed, failures = compute_batch(self.backend, batch)
        ok = [item for item in batch if item.index in computed]
        rows = []
        for item in batch:
            row = item.row if item.row is not None else computed.get(item.index)
            if row is None:
                self.rejected[self.paths[item.index]] = item.error or failures[item.index]
                continue
            self.kept.append(item.index)
            rows.append(row)
        if rows:
            self.sink.append(np.stack(rows))
        self.computed += len(ok)
        if self.cache is not None and ok:
            # Written by a reader thread, off the model's path.
            digests = [item.digest for item in ok]
            features = np.stack([computed[item.index] for item in ok])
            self._writes.append(pool.submit(self.cache.put_many, digests, features))
        while self._writes and self._writes[0].done():
            self._writes.popleft().result()  # raise a failed write now

    def wait_for_cache_writes(self) -> None:
        while self._writes:
            self._writes.popleft().result()
