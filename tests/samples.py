"""Image bytes for tests: real photos in every accepted format, and bad inputs."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def photo(size: tuple[int, int] = (160, 120)) -> Image.Image:
    """A real photo (scikit-image's astronaut), resized."""
    from skimage import data

    return Image.fromarray(data.astronaut()).resize(size)


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def jpeg(size: tuple[int, int] = (160, 120)) -> bytes:
    return encode(photo(size), "JPEG", quality=90)


def good_images() -> dict[str, bytes]:
    """One valid image per accepted format and colour layout."""
    rgb = photo()
    return {
        "jpeg": encode(rgb, "JPEG"),
        "png": encode(rgb, "PNG"),
        "gif": encode(rgb.convert("P"), "GIF"),
        "bmp": encode(rgb, "BMP"),
        "grayscale_png": encode(rgb.convert("L"), "PNG"),
        "rgba_png": encode(rgb.convert("RGBA"), "PNG"),
        "grayscale_jpeg": encode(rgb.convert("L"), "JPEG"),
    }


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels (a decompression bomb)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def bad_images() -> dict[str, bytes]:
    """Inputs the server must refuse with INVALID_ARGUMENT."""
    rng = np.random.default_rng(0)
    full = jpeg((320, 240))
    return {
        "empty": b"",
        "random_bytes": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "truncated_jpeg": full[: len(full) // 2],
        "text_file": b"name,price\nzip puller,0.42\n" * 20,
        "one_pixel_png": encode(Image.new("RGB", (1, 1), "red"), "PNG"),
        "png_100000x100000": png_claiming(100_000, 100_000),
        "tiff_unsupported": encode(photo(), "TIFF"),
    }
