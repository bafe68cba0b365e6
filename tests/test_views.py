"""Views of one query photo (`matcher.views`) and their trip through the batcher together."""

from __future__ import annotations

import asyncio
import io
import threading

import numpy as np
import pytest
from PIL import Image

from matcher.batcher import BatchingOptions, DynamicBatcher
from matcher.errors import InvalidImageError, InvalidRequestError
from matcher.views import PLANS, TURNED, VIEW_MODES, merge_similarity, render, render_views


def photo(width: int, height: int, fmt: str = "JPEG") -> bytes:
    """A photo whose quadrants differ, so that crops and turns can be told apart."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[: height // 2, : width // 2] = (255, 0, 0)
    pixels[: height // 2, width // 2 :] = (0, 255, 0)
    pixels[height // 2 :, : width // 2] = (0, 0, 255)
    pixels[height // 2 :, width // 2 :] = (255, 255, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def decoded(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.convert("RGB")


def test_the_whole_view_is_the_request_bytes_unchanged() -> None:
    data = photo(640, 480)
    assert render_views(data, "whole", 224) == [data]
    for mode in VIEW_MODES:
        assert render_views(data, mode, 224)[0] is data


def test_crops_cover_a_grid_and_turns_are_quarter_turns() -> None:
    data = photo(400, 300, "PNG")
    views = render_views(data, "crops_rotations", 224)
    assert len(views) == len(PLANS["crops_rotations"]) == 13
    images = [decoded(view) for view in views[1:]]
    assert all(Image.open(io.BytesIO(view)).format == "BMP" for view in views[1:])
    # A 0.4 crop of a 400 x 300 photo, at the top left: red only.
    top_left = images[0]
    assert top_left.size == (160, 120)
    assert top_left.getpixel((80, 60)) == (255, 0, 0)
    # The bottom right crop is white at its far corner.
    assert images[8].getpixel((images[8].width - 1, images[8].height - 1)) == (255, 255, 255)
    turned_90, turned_180, turned_270 = images[9:]
    assert turned_90.size == turned_270.size == (300, 400) and turned_180.size == (400, 300)
    # Counter-clockwise quarter turn: the top-right (green) quadrant moves to the top left.
    assert turned_90.getpixel((10, 10)) == (0, 255, 0)
    assert turned_180.getpixel((10, 10)) == (255, 255, 255)


def test_views_of_a_large_photo_are_no_larger_than_the_backbone_needs() -> None:
    data = photo(4000, 3000)
    views = render_views(data, "crops", 224)
    sizes = [decoded(view).size for view in views[1:]]
    # Twice the input side at most, however large the photo: memory and encode time bounded.
    assert max(max(size) for size in sizes) <= 2 * 224
    assert min(min(size) for size in sizes) >= 224


def test_turned_references_are_the_three_quarter_turns() -> None:
    data = photo(320, 240)
    views = render(data, TURNED, 224)
    assert [decoded(view).size for view in views] == [(240, 320), (320, 240), (240, 320)]


def test_an_unknown_mode_is_an_invalid_request() -> None:
    with pytest.raises(InvalidRequestError, match="unknown views 'all'; choose one of whole"):
        render_views(photo(64, 64), "all", 224)


def test_undecodable_pixels_are_an_invalid_image() -> None:
    data = photo(200, 200)
    truncated = data[: len(data) // 3]
    with pytest.raises(InvalidImageError, match="could not be decoded"):
        render_views(truncated, "crops", 224)


def test_each_label_keeps_its_best_view() -> None:
    per_view = np.array([[0.1, 0.9, 0.3], [0.5, 0.2, 0.4], [0.2, 0.1, 0.8]])
    best, view = merge_similarity(per_view)
    assert best.tolist() == [0.5, 0.9, 0.8]
    assert view.tolist() == [1, 0, 2]


async def test_the_views_of_one_request_share_one_model_call() -> None:
    calls: list[list[bytes]] = []
    busy, release = threading.Event(), threading.Event()

    def run(images):
        calls.append(list(images))
        busy.set()
        release.wait(10)
        return [len(image) for image in images]

    batcher = DynamicBatcher(run, BatchingOptions(max_batch_size=8))
    blocker = asyncio.create_task(batcher.features(b"x"))  # keeps the model busy
    await asyncio.to_thread(busy.wait, 10)
    first = asyncio.create_task(batcher.features_of_views([b"a" * 1, b"a" * 2, b"a" * 3]))
    second = asyncio.create_task(batcher.features_of_views([b"b"] * 6))
    third = asyncio.create_task(batcher.features_of_views([b"c"] * 5))
    await asyncio.sleep(0)  # one turn of the loop: each task queues its views, then waits
    assert batcher.queued == 3
    release.set()
    assert await first == [1, 2, 3]
    assert await second == [1] * 6
    assert await third == [1] * 5
    await blocker
    await batcher.close()
    # The blocker alone; then the first request (the second's 6 views would not fit beside
    # its 3 in a call of 8: they wait for the next call, whole); then each of the others.
    assert [len(call) for call in calls] == [1, 3, 6, 5]
    assert calls[1] == [b"a", b"aa", b"aaa"]


async def test_one_bad_view_fails_its_request_alone() -> None:
    def run(images):
        if any(image == b"bad" for image in images):
            raise InvalidImageError("view could not be decoded")
        return [len(image) for image in images]

    batcher = DynamicBatcher(run, BatchingOptions(max_batch_size=16))
    good = asyncio.create_task(batcher.features_of_views([b"ok", b"fine"]))
    bad = asyncio.create_task(batcher.features_of_views([b"bad", b"good"]))
    assert await good == [2, 4]
    with pytest.raises(InvalidImageError, match="could not be decoded"):
        await bad
    await batcher.close()
