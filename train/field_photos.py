"""Held-out catalogue photos made to look like field photos, for the no-match calibration.

A catalogue is photographed with care; field photos are not. A threshold set on held-out
catalogue photos alone keeps 98 % of *those*, and turns many field photos of catalogue items
into "no match": on `bench.quality`'s field photos a threshold set that way was 0.72 and
refused 37 % of the correct matches. So each held-out photo also goes into calibration the
ways field photos differ from it, each a seeded random edit of the photo itself:

- `turned`: rotated by any angle, on a plain surface;
- `cropped`: 40-60 % of its area;
- `small_on_clutter`: shrunk to a quarter to a half of the frame on clutter made of shuffled
  tiles of other held-out photos and random shapes (no texture from outside the catalogue, so
  that no benchmark's backgrounds leak into training);
- `blurred`: defocused and saved at JPEG quality 30.

The threshold then keeps 98 % of the correct matches among the held-out photos and these
(`matcher.calibration`), and the outside photos, when there are any, measure what it lets in.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

KINDS = ("turned", "cropped", "small_on_clutter", "blurred")
#: Field versions made of each held-out photo (kinds in turn, so all four come up).
PER_PHOTO = 2
_FRAME = 320


def field_kinds(photos: int) -> list[str]:
    """The kind of each field version `field_versions` makes of this many photos, in order."""
    return [KINDS[version % len(KINDS)] for version in range(photos * PER_PHOTO)]


def field_versions(paths: Sequence[Path], seed: int = 0) -> Iterator[bytes]:
    """JPEG bytes of `PER_PHOTO` field versions of each photo, photo by photo."""
    kinds = field_kinds(len(paths))
    for index, path in enumerate(paths):
        for copy in range(PER_PHOTO):
            kind = kinds[index * PER_PHOTO + copy]
            rng = np.random.default_rng([seed, zlib.crc32(path.name.encode()), copy])
            others = [paths[(index + step) % len(paths)] for step in (1, 2, 3)]
            yield field_photo(_open(path), kind, rng, others)


def field_photo(
    photo: Image.Image, kind: str, rng: np.random.Generator, others: Sequence[Path] = ()
) -> bytes:
    """One field version of `photo` (RGB) of `kind`, as JPEG bytes."""
    if kind == "cropped":
        return _jpeg(_crop(photo, rng.uniform(0.4, 0.6), rng), 85)
    if kind == "blurred":
        blurred = photo.filter(
            ImageFilter.GaussianBlur(rng.uniform(1.5, 3.0) * max(photo.size) / 400)
        )
        return _jpeg(blurred, 30)
    if kind == "turned":
        canvas = Image.new("RGB", photo.size, tuple(int(v) for v in rng.integers(40, 220, 3)))
        return _jpeg(_paste(canvas, photo, 0.9, rng.uniform(0, 360), rng), 85)
    if kind == "small_on_clutter":
        clutter = _clutter([_open(path) for path in others] or [photo], rng)
        return _jpeg(_paste(clutter, photo, rng.uniform(0.25, 0.5), rng.uniform(0, 360), rng), 85)
    raise ValueError(f"unknown field photo kind {kind!r}")


def _open(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.draft("RGB", (2 * _FRAME, 2 * _FRAME))
        photo = ImageOps.exif_transpose(image).convert("RGB")
    photo.thumbnail((2 * _FRAME, 2 * _FRAME))
    return photo


def _crop(photo: Image.Image, share: float, rng: np.random.Generator) -> Image.Image:
    width, height = photo.size
    w, h = max(8, round(width * np.sqrt(share))), max(8, round(height * np.sqrt(share)))
    left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    return photo.crop((left, top, left + w, top + h))


def _paste(
    canvas: Image.Image, photo: Image.Image, fill: float, angle: float, rng: np.random.Generator
) -> Image.Image:
    scale = fill * min(canvas.size) / max(photo.size)
    size = (max(8, round(photo.width * scale)), max(8, round(photo.height * scale)))
    item = photo.resize(size, Image.Resampling.BILINEAR).convert("RGBA")
    item = item.rotate(angle, Image.Resampling.BILINEAR, expand=True)
    left = int(rng.integers(0, max(1, canvas.width - item.width + 1)))
    top = int(rng.integers(0, max(1, canvas.height - item.height + 1)))
    canvas.paste(item, (left, top), item)
    return canvas


def _clutter(sources: Sequence[Image.Image], rng: np.random.Generator) -> Image.Image:
    """A frame of shuffled tiles of `sources`, with random shapes over it."""
    tiles, side = 8, _FRAME // 8
    canvas = Image.new("RGB", (_FRAME, _FRAME))
    for slot in range(tiles * tiles):
        source = sources[int(rng.integers(len(sources)))].resize((_FRAME, _FRAME))
        x, y = (int(v) * side for v in rng.integers(0, tiles, 2))
        tile = source.crop((x, y, x + side, y + side)).rotate(90 * int(rng.integers(4)))
        canvas.paste(tile, ((slot % tiles) * side, (slot // tiles) * side))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(3, 8))):
        box = sorted(rng.integers(0, _FRAME, 2)), sorted(rng.integers(0, _FRAME, 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.ellipse((box[0][0], box[1][0], box[0][1], box[1][1]), fill=colour)
    return canvas


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
