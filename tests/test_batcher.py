"""Dynamic batching: concurrent requests share model calls and each gets its own answer."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest

from matcher.batcher import BatchingOptions, DynamicBatcher
from matcher.errors import InvalidImageError, OverloadedError
from matcher.v1 import matcher_pb2
from tests import samples


class FakeModel:
    """Stands in for a backend: row i is [value of image i], after a fixed pause per call."""

    def __init__(self, pause_s: float = 0.05) -> None:
        self.pause_s = pause_s
        self.calls: list[int] = []
        self.release = threading.Event()
        self.release.set()
        #: Set when a call has started (and is held while `release` is clear).
        self.entered = threading.Event()

    def __call__(self, images: Sequence[bytes]) -> np.ndarray:
        self.entered.set()
        self.release.wait(30)
        self.calls.append(len(images))
        time.sleep(self.pause_s)
        if any(image == b"bad" for image in images):
            raise InvalidImageError("image could not be decoded: fake decoder says bad")
        return np.array([[float(image.decode())] for image in images], dtype=np.float32)


async def test_concurrent_requests_share_calls_and_get_their_own_rows() -> None:
    model = FakeModel()
    batcher = DynamicBatcher(model, BatchingOptions(max_batch_size=8))
    rows = await asyncio.gather(*(batcher.features(str(i).encode()) for i in range(20)))
    await batcher.close()
    assert [row[0] for row in rows] == [float(i) for i in range(20)]
    assert sum(model.calls) == 20
    assert len(model.calls) < 20 and max(model.calls) <= 8


async def test_a_lone_request_runs_at_once() -> None:
    model = FakeModel(pause_s=0)
    batcher = DynamicBatcher(model, BatchingOptions(timeout_s=0))
    started = time.monotonic()
    assert (await batcher.features(b"7"))[0] == 7.0
    await batcher.close()
    assert model.calls == [1]
    print(f"lone request answered in {1000 * (time.monotonic() - started):.1f} ms")


async def in_the_model(model: FakeModel) -> None:
    """Until the model has been called (the worker thread took a batch)."""
    assert await asyncio.to_thread(model.entered.wait, 30), "the model was never called"


async def until_queued(batcher: DynamicBatcher, count: int) -> None:
    """Until exactly `count` requests wait in the batcher's queue. Looked at once per turn of
    the event loop, not after a time: the queue changes only in tasks on this loop, so no turn
    is missed and none is waited for in vain; the 30 s only fail a test that would hang."""
    async with asyncio.timeout(30):
        while batcher.queued != count:
            await asyncio.sleep(0)  # one turn of the loop


async def test_a_timeout_lets_a_batch_fill() -> None:
    """Each request arrives only once the worker has taken the ones before it into the batch
    it is filling, so they share one call only because the window (30 s here, so that a busy
    machine cannot close it early) held that batch open; it ends as soon as the batch is full."""
    model = FakeModel(pause_s=0)
    batcher = DynamicBatcher(model, BatchingOptions(timeout_s=30, max_batch_size=4))
    requests = []
    for i in range(4):
        requests.append(asyncio.create_task(batcher.features(str(i).encode())))
        await asyncio.sleep(0)  # one turn of the loop: the new task joins the queue
        if i < 3:
            await until_queued(batcher, 0)  # the worker took it into the open batch
    await asyncio.gather(*requests)
    await batcher.close()
    assert model.calls == [4]


async def test_one_bad_image_does_not_fail_its_batch_mates() -> None:
    model = FakeModel(pause_s=0)
    model.release.clear()  # hold the first call so the others queue into one batch
    batcher = DynamicBatcher(model, BatchingOptions(max_batch_size=8))
    first = asyncio.create_task(batcher.features(b"0"))
    await in_the_model(model)
    rest = [asyncio.create_task(batcher.features(image)) for image in (b"1", b"bad", b"3")]
    await until_queued(batcher, 3)
    model.release.set()
    results = await asyncio.gather(first, *rest, return_exceptions=True)
    await batcher.close()
    assert results[0][0] == 0.0 and results[1][0] == 1.0 and results[3][0] == 3.0
    assert isinstance(results[2], InvalidImageError)
    assert model.calls[1] == 3  # tried together first, then halved down to the bad one
    assert model.calls[2:] == [1, 2, 1, 1]


async def test_a_full_queue_is_overloaded() -> None:
    model = FakeModel(pause_s=0)
    model.release.clear()
    batcher = DynamicBatcher(model, BatchingOptions(max_batch_size=1, max_queue=2))
    running = asyncio.create_task(batcher.features(b"0"))
    await in_the_model(model)  # the first is in the model; two more fill the queue
    queued = [asyncio.create_task(batcher.features(b"1")) for _ in range(2)]
    await until_queued(batcher, 2)
    with pytest.raises(OverloadedError, match="2 requests are already waiting"):
        await batcher.features(b"9")
    model.release.set()
    await asyncio.gather(running, *queued)
    await batcher.close()


async def test_a_caller_that_gave_up_is_skipped() -> None:
    model = FakeModel(pause_s=0)
    model.release.clear()
    batcher = DynamicBatcher(model, BatchingOptions(max_batch_size=8))
    first = asyncio.create_task(batcher.features(b"0"))
    await in_the_model(model)
    gone = asyncio.create_task(batcher.features(b"1"))
    kept = asyncio.create_task(batcher.features(b"2"))
    await until_queued(batcher, 2)
    gone.cancel()
    model.release.set()
    await asyncio.gather(first, kept)
    await batcher.close()
    assert model.calls == [1, 1]


async def test_the_server_batches_concurrent_matches(stub, server, embedded_backend) -> None:
    images = [samples.jpeg((100 + 10 * i, 120)) for i in range(16)]
    server.core.batcher.batch_sizes.clear()
    answers = await asyncio.gather(
        *(stub.Embed(matcher_pb2.ImageRequest(image=image), timeout=60) for image in images)
    )
    assert max(server.core.batcher.batch_sizes) > 1
    alone = embedded_backend.features(images)
    for answer, expected in zip(answers, alone, strict=True):
        np.testing.assert_allclose(answer.features, expected, atol=1e-5)
