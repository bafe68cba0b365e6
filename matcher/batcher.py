"""Dynamic batching: concurrent single-image requests share one model call.

A model call on 16 images costs far less than 16 calls on one, so requests that arrive while
the model is busy wait in a queue and go together in the next call. The queue is drained
greedily: a request that finds the model idle runs at once (no added latency at low load), and
under load each call takes up to `max_batch_size` waiting images. `timeout_s` optionally
holds a call back to let a batch fill, as TF Serving's `batch_timeout_micros` does.

A request may bring several images (the views of one photo: `matcher.views`); they always go
in the same model call, and requests join a call only while their images fit in it (a request
with more than `max_batch_size` images runs alone).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from matcher import metrics
from matcher.errors import InvalidImageError, OverloadedError
from matcher.isolate import answer_each

log = logging.getLogger(__name__)

#: Blocking: one answer per image, in order (a feature row, or any per-image result).
BatchFn = Callable[[Sequence[bytes]], Sequence[Any]]


@dataclass(frozen=True)
class BatchingOptions:
    """Like TF Serving's batching parameters."""

    #: Most images in one model call.
    max_batch_size: int = 32
    #: How long a call may wait for more requests before it runs; 0 runs at once.
    timeout_s: float = 0.0
    #: Requests allowed to wait; beyond that, callers are told the server is overloaded.
    max_queue: int = 64


@dataclass(eq=False)  # compared by identity: a caller that gives up removes its own entry
class _Pending:
    images: Sequence[bytes]
    #: One answer per image, in order.
    future: asyncio.Future[list[Any]]


class DynamicBatcher:
    """Runs `run_batch` (blocking) in a worker thread on batches of queued images."""

    def __init__(self, run_batch: BatchFn, options: BatchingOptions) -> None:
        self._run_batch = run_batch
        self._options = options
        # A deque, not an asyncio.Queue: a caller that gives up (its deadline passed, it
        # cancelled) takes its entry out at once, so abandoned requests neither hold queue
        # places nor reach the model.
        self._queue: deque[_Pending] = deque()
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        #: Sizes of the latest batches (tests read it; the matcher_batch_size histogram keeps
        #: the whole history without growing).
        self.batch_sizes: deque[int] = deque(maxlen=1000)

    async def features(self, image: bytes) -> Any:
        """The answer for one image (what `run_batch` gives per image), computed in a batch."""
        return (await self.features_of_views([image]))[0]

    async def features_of_views(self, images: Sequence[bytes]) -> list[Any]:
        """The answers for the views of one request, all computed in the same model call.

        An invalid view fails the request (InvalidImageError), as an invalid image does."""
        if not images:
            raise ValueError("a request needs at least one image")
        self._ensure_worker()
        if len(self._queue) >= self._options.max_queue:
            raise OverloadedError(
                f"server overloaded: {self._options.max_queue} requests are already waiting "
                "for the model; retry later"
            )
        pending = _Pending(images, asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        self._arrived.set()
        try:
            return await pending.future
        except asyncio.CancelledError:
            if pending in self._queue:  # still waiting: nobody will send it now
                self._queue.remove(pending)
            raise

    @property
    def queued(self) -> int:
        """Requests waiting for a model call now (not counting the batch in flight)."""
        return len(self._queue)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            # A fresh context: the worker serves every caller, so it must not keep the request
            # id of the call that happened to start it.
            self._worker = asyncio.create_task(
                self._work(), name="dynamic-batcher", context=contextvars.Context()
            )

    async def _work(self) -> None:
        while True:
            batch = await self._next_batch()
            if batch:
                await self._run(batch)

    async def _next_batch(self) -> list[_Pending]:
        while not self._queue:
            await self._wait_for_arrival(None)
        batch = [self._queue.popleft()]
        size = len(batch[0].images)
        deadline = time.monotonic() + self._options.timeout_s
        while size < self._options.max_batch_size:
            if self._queue:
                if size + len(self._queue[0].images) > self._options.max_batch_size:
                    break  # the next request's views go together, in the next call
                size += len(self._queue[0].images)
                batch.append(self._queue.popleft())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not await self._wait_for_arrival(remaining):
                break
        # A caller whose deadline passed while the batch filled no longer needs an answer.
        return [p for p in batch if not p.future.done()]

    async def _wait_for_arrival(self, timeout_s: float | None) -> bool:
        """Wait until a request is queued; False when `timeout_s` passed first."""
        self._arrived.clear()
        if self._queue:
            return True
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def _run(self, batch: list[_Pending]) -> None:
        images = [image for pending in batch for image in pending.images]
        self.batch_sizes.append(len(images))
        metrics.BATCH_SIZE.observe(len(images))
        try:
            # One undecodable image fails the whole call; answer_each finds it by halving, and
            # its caller alone hears why.
            rows = await asyncio.to_thread(answer_each, self._run_batch, images)
        except Exception as exc:  # every waiter hears what went wrong
            _fail(batch, exc)
            return
        start = 0
        for pending in batch:  # answer_each checks the count
            answers = list(rows[start : start + len(pending.images)])
            start += len(pending.images)
            if pending.future.done():
                continue
            invalid = next((row for row in answers if isinstance(row, InvalidImageError)), None)
            if invalid is not None:
                pending.future.set_exception(invalid)
            else:
                pending.future.set_result(answers)


def _fail(batch: list[_Pending], exc: Exception) -> None:
    for pending in batch:
        if not pending.future.done():
            pending.future.set_exception(exc)
