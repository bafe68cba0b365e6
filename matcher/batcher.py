"""Dynamic batching: concurrent single-image requests share one model call.

A model call on 16 images costs far less than 16 calls on one, so requests that arrive while
the model is busy wait in a queue and go together in the next call. The queue is drained
greedily: a request that finds the model idle runs at once (no added latency at low load), and
under load each call takes up to `max_batch_size` waiting requests. `timeout_s` optionally
holds a call back to let a batch fill, as TF Serving's `batch_timeout_micros` does.
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

    max_batch_size: int = 32
    #: How long a call may wait for more requests before it runs; 0 runs at once.
    timeout_s: float = 0.0
    #: Requests allowed to wait; beyond that, callers are told the server is overloaded.
    max_queue: int = 64


@dataclass(eq=False)  # compared by identity: a caller that gives up removes its own entry
class _Pending:
    image: bytes
    future: asyncio.Future[Any]


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
        self._ensure_worker()
        if len(self._queue) >= self._options.max_queue:
            raise OverloadedError(
                f"server overloaded: {self._options.max_queue} requests are already waiting "
                "for the model; retry later"
            )
        pending = _Pending(image, asyncio.get_running_loop().create_future())
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
        deadline = time.monotonic() + self._options.timeout_s
        while len(batch) < self._options.max_batch_size:
            if self._queue:
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
        self.batch_sizes.append(len(batch))
        metrics.BATCH_SIZE.observe(len(batch))
        try:
            # One undecodable image fails the whole call; answer_each finds it by halving, and
            # its caller alone hears why.
            rows = await asyncio.to_thread(answer_each, self._run_batch, [p.image for p in batch])
        except Exception as exc:  # every waiter hears what went wrong
            _fail(batch, exc)
            return
        for pending, row in zip(batch, rows, strict=True):  # answer_each checks the count
            if pending.future.done():
                continue
            if isinstance(row, InvalidImageError):
                pending.future.set_exception(row)
            else:
                pending.future.set_result(row)


def _fail(batch: list[_Pending], exc: Exception) -> None:
    for pending in batch:
        if not pending.future.done():
            pending.future.set_exception(exc)
