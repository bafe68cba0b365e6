"""The decode budget (matcher.admission): requests admitted by their pixels, first come first
served, a bounded wait, and nothing leaked when a caller goes away."""

from __future__ import annotations

import asyncio

import pytest

from matcher.admission import PixelBudget
from matcher.errors import OverloadedError
from matcher.images import ImageHeader


async def _holder(budget: PixelBudget, pixels: int, entered: list[int], leave: asyncio.Event):
    async with budget.hold(pixels):
        entered.append(pixels)
        await leave.wait()


async def _until(condition) -> None:
    """Yield to the loop until `condition()` holds (every step here is one loop turn away)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


async def test_requests_wait_until_their_pixels_fit_and_enter_in_arrival_order() -> None:
    budget = PixelBudget(100, max_waiting=10)
    entered: list[int] = []
    leave = [asyncio.Event() for _ in range(4)]
    tasks = [
        asyncio.create_task(_holder(budget, pixels, entered, leave[i]))
        for i, pixels in enumerate((60, 50, 10, 40))
    ]
    await _until(lambda: budget.waiting == 3)
    # 50 does not fit beside 60, and the 10 behind it does not overtake it.
    assert entered == [60] and budget.in_use == 60
    leave[0].set()
    await _until(lambda: len(entered) == 4)
    assert entered == [60, 50, 10, 40] and budget.in_use == 100
    for event in leave[1:]:
        event.set()
    await asyncio.gather(*tasks)
    assert budget.in_use == 0 and budget.waiting == 0


async def test_beyond_the_waiting_bound_a_request_is_refused_as_overloaded() -> None:
    budget = PixelBudget(10, max_waiting=1)
    leave = asyncio.Event()
    entered: list[int] = []
    first = asyncio.create_task(_holder(budget, 10, entered, leave))
    second = asyncio.create_task(_holder(budget, 10, entered, leave))
    await _until(lambda: budget.waiting == 1)
    with pytest.raises(OverloadedError, match="waiting for decode memory"):
        async with budget.hold(5):
            pass
    leave.set()
    await asyncio.gather(first, second)
    assert entered == [10, 10] and budget.in_use == 0


async def test_a_caller_cancelled_while_waiting_leaves_nothing_held() -> None:
    budget = PixelBudget(10, max_waiting=5)
    leave = asyncio.Event()
    entered: list[int] = []
    first = asyncio.create_task(_holder(budget, 8, entered, leave))
    waiting = asyncio.create_task(_holder(budget, 8, entered, leave))
    behind = asyncio.create_task(_holder(budget, 2, entered, leave))
    await _until(lambda: budget.waiting == 2)
    waiting.cancel()  # the client's deadline passed
    # The small one behind it no longer waits for it: 8 + 2 fit.
    await _until(lambda: entered == [8, 2])
    leave.set()
    await asyncio.gather(first, behind)
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert budget.in_use == 0 and budget.waiting == 0


async def test_a_request_larger_than_the_budget_runs_alone() -> None:
    budget = PixelBudget(10, max_waiting=5)
    async with budget.hold(1_000):
        assert budget.in_use == 10


def test_a_jpeg_costs_its_pixels_after_the_dct_scale_and_a_gif_its_frames_too() -> None:
    # 4000 x 3000 for a 224 network decodes at 1/4 (3000 // 8 = 375 < 2 x 224): 1000 x 750.
    assert ImageHeader("JPEG", 4000, 3000).decode_pixels(224) == 1000 * 750
    assert ImageHeader("PNG", 4000, 3000).decode_pixels(224) == 12_000_000
    # giflib holds each frame at a byte a pixel: a third of an RGB pixel.
    gif = ImageHeader("GIF", 1000, 1000, frames_area=3_000_000)
    assert gif.decode_pixels(224) == 1_000_000 + 1_000_000
