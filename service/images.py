"""Checks on encoded images made from their headers, before anything is decoded.

Decoding happens in the SavedModel's graph; here we only read enough of the file to refuse what
must not reach it: non-images, unsupported formats, and dimensions that would make decoding
expensive (a small PNG can declare 100000 x 100000 pixels).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from service.errors import InvalidImageError

#: Formats the in-graph decoder (tf.io.decode_image) handles, as Pillow names them.
SUPPORTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP")


@dataclass(frozen=True)
class ImageLimits:
    """Accepted image dimensions, in pixels per side."""

    min_side: int = 16
    max_side: int = 10_000


@dataclass(frozen=True)
class ImageHeader:
    """What the header says about an image."""

    format: str
    width: int
    height: int


def inspect_image(data: bytes, limits: ImageLimits) -> ImageHeader:
    """Read the header of an encoded image and check it against `limits`.

    Raises InvalidImageError with a message naming the problem.
    """
    if not data:
        raise InvalidImageError("image is empty (0 bytes)")
    header = _read_header(data)
    if header.format not in SUPPORTED_FORMATS:
        raise InvalidImageError(
            f"unsupported image format {header.format}; send JPEG, PNG, GIF or BMP"
        )
    _check_size(header, limits)
    return header


def _read_header(data: bytes) -> ImageHeader:
    try:
        with warnings.catch_warnings():
            # Pillow warns (and above twice its limit, raises) on huge declared sizes; the
            # limits below are ours and stricter, so only its hard error matters here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return ImageHeader(image.format or "unknown", image.width, image.height)
    except Image.DecompressionBombError as exc:
        raise InvalidImageError(f"image dimensions are far above the size limit: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InvalidImageError(
            f"bytes are not a recognised image ({len(data)} bytes); send JPEG, PNG, GIF or BMP"
        ) from exc


def _check_size(header: ImageHeader, limits: ImageLimits) -> None:
    size = f"{header.width}x{header.height}"
    if max(header.width, header.height) > limits.max_side:
        raise InvalidImageError(
            f"image is {size} pixels; the limit is {limits.max_side} pixels a side"
        )
    if min(header.width, header.height) < limits.min_side:
        raise InvalidImageError(
            f"image is {size} pixels; it must be at least {limits.min_side} pixels a side"
        )
