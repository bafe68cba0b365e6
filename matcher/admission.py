"""A pixel budget for the images being decoded at once: decode memory bounded by construction.

A request's cost is known from its header before anything is decoded
(`matcher.core.request_pixels`): a 160 KB PNG can declare 50 megapixels, 150 MB of decoded
pixels. Counting requests cannot bound that; counting their pixels can. A request holds the
most its decodes hold at once from admission until its answer (the transcode of a phone photo,
the views cut from it, the graph's or Pillow's decode before the network, its keypoints'), so
the decodes in flight never hold more than the budget, or one request alone where it is larger
(times the bytes a pixel costs: docs/benchmarks.md, "Decode memory").

Requests are admitted first come, first served: one that does not fit waits, and the requests
after it wait behind it, so a large photo is not starved by a stream of small ones. At most
`max_waiting` wait; beyond that a request is refused with OverloadedError (RESOURCE_EXHAUSTED),
as the batcher's queue refuses requests beyond its bound.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator

from matcher import metrics
from matcher.errors import OverloadedError


class PixelBudget:
    """Admits requests while the pixels they decode fit in `capacity` (one event loop)."""

    def __init__(self, capacity: int, max_waiting: int) -> None:
        if capacity < 1 or max_waiting < 0:
            raise ValueError("a pixel budget needs capacity >= 1 and max_waiting >= 0")
        self.capacity = capacity
        self._max_waiting = max_waiting
        self.in_use = 0
        #: Waiting requests in arrival order: (pixels, the future their admission resolves).
        self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @contextlib.asynccontextmanager
    async def hold(self, pixels: int) -> AsyncIterator[None]:
        """Hold `pixels` of the budget for the duration of the block (waiting for them first).

        A request larger than the whole budget is held as the budget itself: it runs alone.
        (The settings keep the budget at least the largest image allowed; a request for one can
        still hold twice it, the graph's decode beside the keypoints' of a PNG, which has no
        reduced scale: decode memory is then bounded by that one request.)"""
        pixels = min(max(pixels, 1), self.capacity)
        await self._acquire(pixels)
        try:
            yield
        finally:
            self._release(pixels)

    async def _acquire(self, pixels: int) -> None:
        if not self._waiting and self.in_use + pixels <= self.capacity:
            self._take(pixels)
            return
        if len(self._waiting) >= self._max_waiting:
            metrics.DECODE_BUDGET_REFUSED.inc()
            raise OverloadedError(
                f"{len(self._waiting)} requests are already waiting for decode memory (the "
                f"pixel budget is {self.capacity / 1e6:.0f} megapixels in flight); retry shortly"
            )
        admitted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (pixels, admitted)
        self._waiting.append(entry)
        try:
            await admitted
        except asyncio.CancelledError:
            # The caller went away (deadline, cancellation): give back what it may have been
            # granted meanwhile, or leave the queue, and let the next ones in.
            if admitted.done() and not admitted.cancelled():
                self._release(pixels)
            else:
                with contextlib.suppress(ValueError):
                    self._waiting.remove(entry)
                self._admit_waiting()
            raise

    def _take(self, pixels: int) -> None:
        self.in_use += pixels
        metrics.DECODE_PIXELS_IN_FLIGHT.set(self.in_use)

    def _release(self, pixels: int) -> None:
        self.in_use -= pixels
        metrics.DECODE_PIXELS_IN_FLIGHT.set(self.in_use)
        self._admit_waiting()

    def _admit_waiting(self) -> None:
        """Admit waiting requests in order while the first of them fits."""
        while self._waiting and self.in_use + self._waiting[0][0] <= self.capacity:
            pixels, admitted = self._waiting.popleft()
            if admitted.done():  # cancelled while queued; its own handler cleans up
                continue
            self._take(pixels)
            admitted.set_result(None)
