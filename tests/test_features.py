"""The extraction pipeline: input order, rejections, the cache, batching, reading ahead of the
model, features streamed to a memory-mapped `.npy`, and memory that does not grow with the
number of images. A fake backend stands in for the model except in the end-to-end check."""

from __future__ import annotations

import hashlib
import queue
import threading
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from matcher import extraction
from matcher.domain import BackboneInfo
from matcher.errors import BackendUnavailableError, InvalidImageError
from matcher.extraction import FeatureCache, extract_features, kept_mask_path
from tests.samples import bad_images, encode, good_images

DIM = 1280
#: Bytes the fake backend refuses to "decode" although their header is fine.
UNDECODABLE = b"FAKE-UNDECODABLE"


def fake_vector(data: bytes) -> np.ndarray:
    """The fake backend's features for `data`: deterministic, different for different bytes."""
    seed = int.from_bytes(hashlib.sha256(data).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(DIM, dtype=np.float32)


class FakeBackend:
    """A fake feature backend: no model, a vector of dimension 1280 derived from the bytes."""

    kind = "fake"
    ready = True
    info = BackboneInfo("fake", 1, 16, DIM)

    def __init__(self) -> None:
        self.calls: list[int] = []

    def load(self) -> None:
        """Nothing to load."""

    def check(self) -> None:
        """Always reachable."""

    def features(self, images: Sequence[bytes]) -> np.ndarray:
        self.calls.append(len(images))
        if any(UNDECODABLE in image for image in images):
            raise InvalidImageError("image could not be decoded: fake decoder")
        return np.stack([fake_vector(image) for image in images])


def tiny_images(folder: Path, count: int, start: int = 0) -> list[Path]:
    """`count` distinct valid 16x16 PNG files (one image, a different trailer per file)."""
    folder.mkdir(parents=True, exist_ok=True)
    base = encode(Image.new("RGB", (16, 16), "teal"), "PNG")
    paths = []
    for number in range(start, start + count):
        path = folder / f"{number:06d}.png"
        path.write_bytes(base + b"#%d" % number)  # readers ignore bytes after IEND
        paths.append(path)
    return paths


def expected_rows(paths: Sequence[Path]) -> np.ndarray:
    return np.stack([fake_vector(p.read_bytes()) for p in paths])


def test_rows_keep_input_order_around_every_kind_of_rejection(tmp_path: Path) -> None:
    paths = tiny_images(tmp_path / "images", 11)
    header_bad, decode_bad, missing = (
        tmp_path / "notes.png",
        tmp_path / "bad.png",
        tmp_path / "gone",
    )
    header_bad.write_bytes(b"not an image at all")
    decode_bad.write_bytes(paths[0].read_bytes() + UNDECODABLE)
    paths[2:2] = [header_bad]
    paths[6:6] = [decode_bad]
    paths.append(missing)
    cache = FeatureCache(tmp_path / "cache", "fake")
    cached = paths[4]
    cache.put(hashlib.sha256(cached.read_bytes()).hexdigest(), np.full(DIM, 7, np.float32))
    out = tmp_path / "features.npy"

    result = extract_features(paths, FakeBackend(), cache, batch_size=4, progress=False, out=out)

    bad = {header_bad, decode_bad, missing}
    assert result.kept == [i for i, p in enumerate(paths) if p not in bad]
    assert list(result.rejected) == [header_bad, decode_bad, missing]
    assert "not a recognised image" in result.rejected[header_bad]
    assert "could not be decoded" in result.rejected[decode_bad]
    assert "could not be read" in result.rejected[missing]
    kept_paths = [paths[i] for i in result.kept]
    expected = expected_rows(kept_paths)
    expected[kept_paths.index(cached)] = 7  # the cached row, not a recomputed one
    np.testing.assert_array_equal(result.features, expected)
    assert result.computed == len(kept_paths) - 1
    # On disk: only the kept rows, in order, and a mask saying which paths they belong to.
    assert isinstance(result.features, np.memmap) and not result.features.flags.writeable
    np.testing.assert_array_equal(np.load(out), expected)
    assert list(np.flatnonzero(np.load(kept_mask_path(out)))) == result.kept
    assert result.out == out and not list(tmp_path.glob("*.partial"))


def test_the_model_gets_full_batches(tmp_path: Path) -> None:
    paths = tiny_images(tmp_path, 50)
    backend = FakeBackend()
    result = extract_features(paths, backend, None, batch_size=16, progress=False)
    assert backend.calls == [16, 16, 16, 2]
    np.testing.assert_array_equal(result.features, expected_rows(paths))
    assert result.kept == list(range(50)) and result.computed == 50 and result.out is None


def test_one_bad_file_costs_a_few_calls_not_one_per_image(tmp_path: Path) -> None:
    paths = tiny_images(tmp_path, 32)
    paths[21].write_bytes(paths[21].read_bytes() + UNDECODABLE)
    backend = FakeBackend()
    result = extract_features(paths, backend, None, batch_size=32, progress=False)
    assert list(result.rejected) == [paths[21]]
    assert len(backend.calls) <= 1 + 2 * 5  # the batch, then halves down to the bad file
    np.testing.assert_array_equal(result.features, expected_rows(paths[:21] + paths[22:]))


def test_a_second_run_computes_nothing_and_gives_the_same_features(tmp_path: Path) -> None:
    paths = tiny_images(tmp_path / "images", 40)
    cache = FeatureCache(tmp_path / "cache", "fake")
    first = extract_features(paths, FakeBackend(), cache, batch_size=8, progress=False)
    backend = FakeBackend()
    second = extract_features(
        paths, backend, cache, batch_size=8, progress=False, out=tmp_path / "f.npy"
    )
    assert (first.computed, second.computed, backend.calls) == (40, 0, [])
    np.testing.assert_array_equal(first.features, second.features)
    # Same keys as before the pipeline: <model key>/<first two hex digits>/<sha256>.npy.
    digest = hashlib.sha256(paths[0].read_bytes()).hexdigest()
    assert (tmp_path / "cache" / "fake" / digest[:2] / f"{digest}.npy").is_file()


def test_corrupt_and_wrong_shaped_cache_entries_are_recomputed_and_replaced(
    tmp_path: Path,
) -> None:
    paths = tiny_images(tmp_path / "images", 6)
    cache = FeatureCache(tmp_path / "cache", "fake", DIM)
    first = extract_features(paths, FakeBackend(), cache, batch_size=8, progress=False)
    entries = [cache._path(hashlib.sha256(p.read_bytes()).hexdigest()) for p in paths]
    entries[0].write_bytes(b"\x93NUMPY garbage, cut short")  # torn by something outside
    np.save(entries[1], np.ones(7, np.float32))  # another model's size under this key
    np.save(entries[2], np.full(DIM, np.nan, np.float32))  # not features at all
    np.save(entries[3], np.ones((2, DIM), np.float64))
    backend = FakeBackend()
    second = extract_features(paths, backend, cache, batch_size=8, progress=False)
    assert second.computed == 4 and sum(backend.calls) == 4
    np.testing.assert_array_equal(first.features, second.features)
    for entry, row in zip(entries, first.features, strict=True):  # rewritten right
        np.testing.assert_array_equal(np.load(entry), row)


def test_the_progress_bar_counts_images(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    extract_features(tiny_images(tmp_path, 40), FakeBackend(), None, batch_size=16)
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()[-1]
    assert bar.startswith("features: 100%") and "40/40" in bar and "img/s" in bar


class ReadAhead:
    """How far the pipeline has got, under one Condition: paths taken from the input (each is
    handed to a reader), cache lookups (one per file read), and whether the prefetch thread has
    found its queue full (from then on it takes no more paths until the model takes a batch)."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.taken = 0
        self.read = 0
        self.producer_blocked = False

    def take(self) -> None:
        with self.changed:
            self.taken += 1
            self.changed.notify_all()

    def look_up(self) -> None:
        with self.changed:
            self.read += 1
            self.changed.notify_all()

    def found_queue_full(self) -> None:
        with self.changed:
            self.producer_blocked = True
            self.changed.notify_all()

    def read_when_stalled(self, total: int) -> int:
        """Files read once reading ahead has stopped: the producer is blocked on its full
        queue (or every path was taken), and every file taken has been read. The 60 s only
        fail a test that would otherwise hang (a pipeline that never reads ahead)."""
        with self.changed:
            stalled = self.changed.wait_for(
                lambda: self.producer_blocked or self.taken == total, timeout=60
            )
            assert stalled, f"reading stopped at {self.taken} of {total} files, queue not full"
            assert self.changed.wait_for(lambda: self.read == self.taken, timeout=60)
            return self.read


class CountedPaths(list[Path]):
    """The input paths, counting each one the pipeline takes to read."""

    def __init__(self, paths: Sequence[Path], progress: ReadAhead) -> None:
        super().__init__(paths)
        self._progress = progress

    def __iter__(self) -> Iterator[Path]:
        for path in super().__iter__():
            self._progress.take()
            yield path


class CountingCache(FeatureCache):
    """A cache that counts lookups: one per file read, so it tells how far reading has got."""

    def __init__(self, root: Path, progress: ReadAhead) -> None:
        super().__init__(root, "fake")
        self._progress = progress

    def get(self, digest: str) -> np.ndarray | None:
        self._progress.look_up()
        return super().get(digest)


def signalling_queue(progress: ReadAhead) -> Callable[..., queue.Queue[object]]:
    """A factory for the prefetch thread's queue that tells `progress` when its producer finds
    it full (the producer then waits, and takes no more batches from the readers)."""

    class SignallingQueue(queue.Queue[object]):
        def put(self, item: object, block: bool = True, timeout: float | None = None) -> None:
            if self.full():
                progress.found_queue_full()
            super().put(item, block, timeout)

    return SignallingQueue


class WaitingBackend(FakeBackend):
    """Holds its first call until reading ahead has stopped, then notes how far it got."""

    def __init__(self, progress: ReadAhead, total: int) -> None:
        super().__init__()
        self.progress = progress
        self.total = total
        self.read_during_first_call = 0

    def features(self, images: Sequence[bytes]) -> np.ndarray:
        if not self.calls:
            self.read_during_first_call = self.progress.read_when_stalled(self.total)
        return super().features(images)


def test_files_are_read_while_the_model_runs_but_only_so_far_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    progress = ReadAhead()
    paths = CountedPaths(tiny_images(tmp_path / "images", 200), progress)
    cache = CountingCache(tmp_path / "cache", progress)
    # Only the prefetch thread's queue: it tells when reading ahead has to stop.
    monkeypatch.setattr(
        extraction,
        "queue",
        SimpleNamespace(Queue=signalling_queue(progress), Full=queue.Full, Empty=queue.Empty),
    )
    batch, prefetch = 4, 2
    backend = WaitingBackend(progress, total=len(paths))
    extract_features(paths, backend, cache, batch_size=batch, progress=False, prefetch=prefetch)
    # A serial loop would have read exactly one batch when the model is first called.
    assert backend.read_during_first_call >= 2 * batch
    # Bounded: the batch in the model, `prefetch` queued, one being filled, the readers' window.
    assert backend.read_during_first_call <= batch + prefetch * batch + batch + prefetch * batch


def test_a_backend_failure_stops_the_run_and_leaves_no_file(tmp_path: Path) -> None:
    class DownBackend(FakeBackend):
        def features(self, images: Sequence[bytes]) -> np.ndarray:
            raise BackendUnavailableError("model server went away")

    out = tmp_path / "out" / "features.npy"
    before = threading.active_count()
    with pytest.raises(BackendUnavailableError):
        extract_features(
            tiny_images(tmp_path / "images", 100), DownBackend(), None, 8, progress=False, out=out
        )
    assert not list(out.parent.iterdir())
    assert threading.active_count() == before  # readers and the prefetch thread are gone


def test_nothing_to_extract(tmp_path: Path) -> None:
    empty = extract_features([], FakeBackend(), None, progress=False, out=tmp_path / "e.npy")
    assert empty.features.shape == (0, DIM) and empty.kept == [] and empty.computed == 0
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    none_kept = extract_features([bad], FakeBackend(), None, progress=False, out=tmp_path / "n.npy")
    assert none_kept.features.shape == (0, DIM) and list(none_kept.rejected) == [bad]
    assert np.load(tmp_path / "n.npy").shape == (0, DIM)


def peak_traced_bytes(paths: Sequence[Path], out: Path | None) -> int:
    """Peak Python-allocated bytes (numpy arrays included; memory maps are not) of one run."""
    tracemalloc.reset_peak()
    start, _ = tracemalloc.get_traced_memory()
    result = extract_features(paths, FakeBackend(), None, batch_size=32, progress=False, out=out)
    _, peak = tracemalloc.get_traced_memory()
    assert len(result.kept) == len(paths)
    del result
    return peak - start


def test_memory_does_not_grow_with_the_number_of_images(tmp_path: Path) -> None:
    paths = tiny_images(tmp_path / "images", 2000)
    in_ram = 1800 * DIM * 4  # what 1,800 more rows would take if they were held in memory
    tracemalloc.start()
    try:
        peak_traced_bytes(paths[:32], tmp_path / "warm.npy")  # lazy imports and caches, once
        small = peak_traced_bytes(paths[:200], tmp_path / "small.npy")
        large = peak_traced_bytes(paths, tmp_path / "large.npy")
        # The control: the same measure does see features held in memory.
        held = peak_traced_bytes(paths, None)
    finally:
        tracemalloc.stop()
    assert held - small > in_ram
    # What remains is the `kept` list and bookkeeping, a few bytes per image.
    assert large - small < in_ram / 10, (small, large)
    np.testing.assert_array_equal(
        np.load(tmp_path / "large.npy", mmap_mode="r")[-1:], expected_rows(paths[-1:])
    )


def test_features_equal_the_backend_on_real_files(embedded_backend, tmp_path: Path) -> None:
    images = good_images()
    paths = []
    for name, body in sorted(images.items()):
        paths.append(tmp_path / "images" / name)
        paths[-1].parent.mkdir(exist_ok=True)
        paths[-1].write_bytes(body)
    truncated = tmp_path / "images" / "truncated.jpg"
    truncated.write_bytes(bad_images()["truncated_jpeg"])
    paths.insert(4, truncated)
    cache = FeatureCache(tmp_path / "cache", embedded_backend.info.cache_key)
    out = tmp_path / "features.npy"

    first = extract_features(paths, embedded_backend, cache, batch_size=3, progress=False, out=out)

    assert list(first.rejected) == [truncated]
    assert "could not be decoded" in first.rejected[truncated]
    assert first.kept == [i for i in range(len(paths)) if i != 4]
    reference = embedded_backend.features([images[name] for name in sorted(images)])
    np.testing.assert_allclose(first.features, reference, atol=1e-5, rtol=0)
    second = extract_features(paths, embedded_backend, cache, batch_size=3, progress=False)
    assert (first.computed, second.computed) == (len(images), 0)
    np.testing.assert_array_equal(second.features, first.features)
    assert list(second.rejected) == [truncated]


def test_training_reads_phone_photos_as_the_server_does(tmp_path: Path, embedded_backend) -> None:
    from matcher.images import ImageLimits, for_graph, inspect_image
    from matcher.views import rewrite_side
    from tests import hostile_corpus

    files = {
        "turned.jpg": hostile_corpus.exif_rotated_jpeg(),
        "phone.heic": hostile_corpus.heic(hostile_corpus.photo()),
        "web.webp": hostile_corpus.encode(hostile_corpus.photo(), "WEBP", quality=80),
    }
    paths = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    found = extract_features(paths, embedded_backend, None, progress=False)
    assert found.kept == [0, 1, 2] and not found.rejected
    # The bytes the server's core sends the graph (matcher.core: inspect, then for_graph).
    keep = rewrite_side(embedded_backend.info.input_size)
    served = [for_graph(data, inspect_image(data, ImageLimits()), keep) for data in files.values()]
    np.testing.assert_allclose(found.features, embedded_backend.features(served), atol=1e-5)
    # And the turned photo is read upright, not as stored.
    stored = embedded_backend.features([files["turned.jpg"]])
    assert np.abs(found.features[0] - stored[0]).max() > 1e-2


def test_a_rewritten_photos_features_are_cached_under_its_bytes_and_the_rewrite(
    tmp_path: Path, embedded_backend
) -> None:
    from matcher.views import rewrite_side
    from tests import hostile_corpus

    turned, plain = tmp_path / "turned.jpg", tmp_path / "plain.png"
    turned.write_bytes(hostile_corpus.exif_rotated_jpeg())
    plain.write_bytes(good_images()["png"])
    cache = FeatureCache(tmp_path / "cache", embedded_backend.info.cache_key)
    first = extract_features([turned, plain], embedded_backend, cache, progress=False)
    digest = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (turned, plain)}
    keep = rewrite_side(embedded_backend.info.input_size)
    # The turned photo's features are those of its rewrite (turned upright at the scale `keep`
    # picks): an entry a whole rewrite wrote under its bytes alone is not read for it.
    np.testing.assert_array_equal(cache.get(f"{digest[turned]}-upright{keep}"), first.features[0])
    assert cache.get(digest[turned]) is None
    np.testing.assert_array_equal(cache.get(digest[plain]), first.features[1])
    cache.put(digest[turned], np.zeros_like(first.features[0]))
    again = extract_features([turned, plain], embedded_backend, cache, progress=False)
    np.testing.assert_array_equal(again.features, first.features)
