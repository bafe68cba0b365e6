"""The decode budget (matcher.admission): requests admitted by their pixels, first come first
served, a bounded wait, and nothing leaked when a caller goes away."""

from __future__ import annotations

import asyncio
import functools
import io

import numpy as np
import pytest
from PIL import Image

from matcher.admission import PixelBudget
from matcher.core import request_pixels
from matcher.errors import OverloadedError
from matcher.geometry import LOCAL_SIDE
from matcher.images import ImageHeader, ImageLimits, decode_upright, for_graph, inspect_image
from matcher.views import PLANS, largest_needed, rewrite_side, view_pixels
from tests import hostile_corpus


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


@functools.cache
def _phone_jpeg(orientation: int) -> bytes:
    """A phone's 12 megapixels (4032 x 3024), stored upright or turned (EXIF orientation)."""
    from skimage import data

    exif = Image.Exif()
    exif[0x0112] = orientation
    photo = Image.fromarray(data.astronaut()).resize((4032, 3024))
    return hostile_corpus.encode(photo, "JPEG", quality=85, exif=exif.tobytes())


def _pixels(image: Image.Image) -> int:
    return image.width * image.height


def test_the_header_counts_the_pixels_each_decode_of_a_photo_really_holds() -> None:
    data = _phone_jpeg(1)
    header = inspect_image(data, ImageLimits())
    for longest in (None, LOCAL_SIDE, 1120, 1512, 1513, 3024):
        assert header.upright_pixels(longest) == _pixels(decode_upright(data, longest)), longest
    # 3024 // 2 keeps 1,512 a side; one more pixel asked for and the decode is whole.
    assert header.upright_pixels(1512) == 2016 * 1512
    assert header.upright_pixels(1513) == 4032 * 3024


def test_a_turned_phone_photo_is_rewritten_at_the_scale_its_views_need() -> None:
    data = _phone_jpeg(6)
    header = inspect_image(data, ImageLimits())
    keep = rewrite_side(224)
    # The finest view of any mode (a 0.4 crop, kept at twice the input a side) needs 1,120
    # pixels on the shorter side: half scale keeps 1,512.
    assert keep == max(largest_needed(plan, 224) for plan in PLANS.values()) == 1120
    rewritten = Image.open(io.BytesIO(for_graph(data, header, keep)))
    assert rewritten.format == "PNG" and rewritten.size == (1512, 2016)  # upright
    assert header.rewritten_pixels(keep) == _pixels(rewritten)
    # Not the 12 megapixels a whole rewrite held, which the graph's decode, the views' and
    # the keypoints' then each read whole.
    assert _pixels(rewritten) * 4 == header.width * header.height
    # Stored upright, nothing is rewritten: the graph reads the JPEG itself.
    upright = inspect_image(_phone_jpeg(1), ImageLimits())
    assert upright.rewritten_pixels(keep) == 0
    assert for_graph(_phone_jpeg(1), upright, keep) == _phone_jpeg(1)


def test_a_request_is_admitted_by_the_most_its_decodes_hold_at_once() -> None:
    turned = inspect_image(_phone_jpeg(6), ImageLimits())
    upright = inspect_image(_phone_jpeg(1), ImageLimits())
    png = 1512 * 2016  # the turned photo's upright PNG, which every later decode reads whole
    views = view_pixels("crops", 224)
    assert views == 9 * 448 * 448
    # Turned: the PNG held to the end, the views, and the graph's decode of the PNG and of the
    # views beside the keypoints' (each whole: a PNG has no reduced scale) and its grey copy.
    grey = png // 4
    assert request_pixels(turned, "crops", 224, keypoints=True) == png + views + (
        png + views + png + grey
    )
    # Upright: first the decode the crops are cut from (half scale: 1,512 keeps the 1,120 they
    # need), then, the views held, the graph's decode (quarter scale) and its views' beside the
    # keypoints' (quarter scale too: 756 keeps 640) and its grey copy: the larger, here.
    cut = _pixels(decode_upright(_phone_jpeg(1), largest_needed(PLANS["crops"], 224)))
    graph = upright.decode_pixels(224)
    local = _pixels(decode_upright(_phone_jpeg(1), LOCAL_SIDE))
    assert cut == 2016 * 1512 and graph == local == 1008 * 756
    later = graph + views + local + local // 4
    assert later > cut
    assert request_pixels(upright, "crops", 224, keypoints=True) == views + later
    assert request_pixels(upright, "crops", 224, keypoints=False) == views + cut
    # The whole photo alone: no views, no cut; the graph's decode beside the keypoints'.
    assert request_pixels(upright, "whole", 224, keypoints=True) == graph + local + local // 4
    assert request_pixels(upright, "whole", 224, keypoints=False) == graph


def test_a_progressive_jpeg_costs_its_coefficients_too() -> None:
    # libjpeg holds a progressive JPEG's DCT coefficients for the whole photo while it decodes,
    # at any reduced scale (50 megapixels at 1/8: 292 MB at 4:4:4, against 6 MB baseline).
    from skimage import data

    photo = Image.fromarray(data.astronaut()).resize((4032, 3024))
    baseline = inspect_image(hostile_corpus.encode(photo, "JPEG"), ImageLimits())
    progressive = inspect_image(
        hostile_corpus.encode(photo, "JPEG", progressive=True), ImageLimits()
    )
    assert progressive.progressive and not baseline.progressive
    whole = 4032 * 3024
    assert progressive.decode_pixels(224) == baseline.decode_pixels(224) + 2 * whole
    assert progressive.upright_pixels(LOCAL_SIDE) == baseline.upright_pixels(LOCAL_SIDE) + 2 * whole


def test_a_large_webp_is_rewritten_reduced_and_admitted_for_its_decode() -> None:
    from skimage import data

    photo = Image.fromarray(data.astronaut()).resize((4032, 3024))
    webp = hostile_corpus.encode(photo, "WEBP", quality=80)
    header = inspect_image(webp, ImageLimits())
    keep = rewrite_side(224)
    # No reduced scale to decode at: decoded whole, then reduced by half (the largest factor
    # that keeps 1,120 on the shorter side), so later decodes read 3 megapixels, not 12.
    rewritten = Image.open(io.BytesIO(for_graph(webp, header, keep)))
    assert rewritten.size == (2016, 1512) == photo.reduce(2).size
    assert header.rewritten_pixels(keep) == _pixels(rewritten)
    np.testing.assert_array_equal(np.asarray(rewritten), np.asarray(decode_upright(webp).reduce(2)))
    # Admitted for the most held at once: the rewrite's whole decode and its reduced copy.
    png = 2016 * 1512
    assert request_pixels(header, "crops", 224, keypoints=True) == 4032 * 3024 + png
