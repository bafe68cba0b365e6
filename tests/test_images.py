"""Header checks refuse bad bytes before anything is decoded."""

from __future__ import annotations

import pytest

from matcher.errors import InvalidImageError
from matcher.images import ImageLimits, inspect_image
from tests import samples

LIMITS = ImageLimits(min_side=16, max_side=10_000)


@pytest.mark.parametrize("name", sorted(samples.good_images()))
def test_accepts_every_supported_format(name: str) -> None:
    header = inspect_image(samples.good_images()[name], LIMITS)
    assert (header.width, header.height) == (160, 120)
    assert header.format in {"JPEG", "PNG", "GIF", "BMP"}


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("empty", "empty"),
        ("random_bytes", "not a recognised image"),
        ("text_file", "not a recognised image"),
        ("one_pixel_png", "at least 16 pixels"),
        ("png_100000x100000", "size limit"),
        ("tiff_unsupported", "unsupported image format TIFF"),
    ],
)
def test_refuses_with_a_message_naming_the_problem(name: str, message: str) -> None:
    with pytest.raises(InvalidImageError, match=message):
        inspect_image(samples.bad_images()[name], LIMITS)


def test_size_limit_is_configurable() -> None:
    data = samples.png_claiming(3000, 20)
    inspect_image(data, LIMITS)
    with pytest.raises(InvalidImageError, match="3000x20 pixels; the limit is 2048"):
        inspect_image(data, ImageLimits(max_side=2048))


def test_truncated_jpeg_passes_the_header_check() -> None:
    # Its header is intact; the decoder in the graph refuses it (see test_server).
    header = inspect_image(samples.bad_images()["truncated_jpeg"], LIMITS)
    assert header.format == "JPEG"


def test_area_is_limited_as_well_as_each_side() -> None:
    data = samples.png_claiming(9000, 9000)
    with pytest.raises(InvalidImageError, match=r"\(81 megapixels\); the limit is 50 megapixels"):
        inspect_image(data, LIMITS)
    inspect_image(data, ImageLimits(max_pixels=100_000_000))
