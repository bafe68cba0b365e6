"""Demo catalogue built from real photos that ship inside installed packages.

The matcher is meant for field photos of physical items: rotated, partly cropped, badly lit,
lying on whatever surface was at hand. This module imitates that without asking the user for
any data: each catalogue item is one real photo from ``skimage.data`` or scikit-learn's
sample images, and every "view" of an item is that photo cropped, flipped, rotated by any
angle, recoloured and pasted onto a random background, then saved as JPEG (sometimes PNG).

Layout written under ``out``::

    out/demo.json                       parameters + file list, written last (= complete)
    out/train/<label>/<label>_0000.jpg  training views
    out/queries/<label>/<label>_0000.jpg  held-out views from a separate random stream
    out/train/_outside/_outside_0000.jpg  photos of things not in the catalogue, rendered the
    out/queries/_outside/_outside_0000.jpg  same way (other objects in each split), for the
                                          "no match" threshold and its test

Run ``python -m train.demo --out data/demo`` to build it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps
from tqdm import tqdm

__all__ = ["ITEMS", "DemoSummary", "build_demo_catalogue", "main"]

# Mostly colour photos that look nothing alike, plus one grayscale photo and one RGBA logo so
# the catalogue also exercises those inputs. Order is the public label order.
ITEMS: tuple[str, ...] = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "colorwheel",
    "logo",
    "retina",
    "camera",
    "china",
    "flower",
)
_SKLEARN_ITEMS = frozenset({"china", "flower"})
# Real photos that are not catalogue items: those under train/_outside/ calibrate the no-match
# threshold, the others, under queries/_outside/, test it on objects it never saw. The retina
# close-up (`microaneurysms`) is the hard case: the same kind of photo as the item `retina`.
# (Not `cat`: scikit-image's `data.cat()` is `data.chelsea()`, the catalogue's own cat.)
OUTSIDE_TRAIN: tuple[str, ...] = ("horse", "coins", "moon", "page")
OUTSIDE_QUERIES: tuple[str, ...] = ("microaneurysms", "clock", "text", "cell")
_OUTSIDE_FOLDER = "_outside"
# Grayscale texture photos used only as backgrounds, never as items.
_TEXTURES = ("brick", "grass", "gravel")

# Bump whenever the rendering changes so that catalogues built by older code are rebuilt.
_GENERATOR_VERSION = 3
_MANIFEST = "demo.json"
# Split name -> key of its random streams, so query views never replay training views.
_SPLITS = {"train": 1, "queries": 2}
_SOURCE_MAX_SIDE = 512  # sources are shrunk once; views are at most 480 px a side anyway
_VIEW_SIDE = (200, 480)
_PNG_PROBABILITY = 0.15


@dataclass(frozen=True)
class DemoSummary:
    """What :func:`build_demo_catalogue` produced.

    ``train_views`` and ``query_views`` are counts per label, as passed in.
    """

    out: Path
    labels: list[str]
    train_views: int
    query_views: int
    #: Views of each outside object, in each split's `_outside/` folder.
    outside_views: int = 0


# --------------------------------------------------------------------------- sources


@cache
def _load_item(label: str) -> Image.Image:
    """Return the catalogue photo for ``label`` as RGB, at most 512 px a side."""
    if label in _SKLEARN_ITEMS:
        from sklearn.datasets import load_sample_image

        array = load_sample_image(f"{label}.jpg")
    else:
        from skimage import data

        array = getattr(data, label)()
    image = Image.fromarray(np.asarray(array))
    if image.mode == "RGBA":
        # A logo is a print on white paper; the photo then shows the paper, not a cut-out.
        paper = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(paper, image)
    image = image.convert("RGB")
    image.thumbnail((_SOURCE_MAX_SIDE, _SOURCE_MAX_SIDE), Image.Resampling.LANCZOS)
    return image


@cache
def _load_texture(name: str) -> Image.Image:
    from skimage import data

    return Image.fromarray(np.asarray(getattr(data, name)())).convert("L")


def _view_rng(seed: int, split: str, label: str, index: int) -> np.random.Generator:
    """One independent stream per view.

    Keying by label name (not position) keeps an item's views stable when ``items`` changes,
    and keying by split guarantees queries never replay a training view.
    """
    label_key = zlib.crc32(label.encode())
    return np.random.default_rng([seed, _SPLITS[split], label_key, index])


# --------------------------------------------------------------------------- item edits


def _random_crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Keep 55-100 % of the area with a mildly changed aspect, so the item stays whole-ish."""
    width, height = image.size
    area = rng.uniform(0.55, 1.0)
    aspect = np.exp(rng.uniform(np.log(0.8), np.log(1.25)))
    crop_w = min(width, round(width * np.sqrt(area * aspect)))
    crop_h = min(height, round(height * np.sqrt(area / aspect)))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    return image.crop((left, top, left + crop_w, top + crop_h))


def _random_flip(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.3:
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    return image


def _hue_rotation(radians: float) -> np.ndarray:
    """3x3 matrix rotating colours about the grey axis: a hue shift that keeps grey grey."""
    cos, sin = np.cos(radians), np.sin(radians)
    cross = np.array([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]]) / np.sqrt(3.0)
    return cos * np.eye(3) + (1.0 - cos) / 3.0 * np.ones((3, 3)) + sin * cross


def _jitter_colour(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Lighting and camera differences; bounded so the item stays recognisable.

    Brightness, contrast, saturation and hue are all linear in RGB, so they are folded into
    one affine colour matrix and applied in a single C pass by ``Image.convert``.
    """
    brightness = rng.uniform(0.7, 1.3)
    contrast = rng.uniform(0.7, 1.3)
    saturation = rng.uniform(0.6, 1.4)
    hue = rng.uniform(-0.25, 0.25) if rng.random() < 0.5 else 0.0  # at most ~14 degrees
    to_grey = np.ones((3, 3)) / 3.0
    matrix = saturation * np.eye(3) + (1.0 - saturation) * to_grey
    matrix = brightness * contrast * matrix @ _hue_rotation(hue)
    # Contrast pivots on the mean grey level, so the offset is the same for every channel.
    offset = brightness * (1.0 - contrast) * float(np.asarray(image).mean())
    affine = np.hstack([matrix, np.full((3, 1), offset)])
    return image.convert("RGB", tuple(float(v) for v in affine.ravel()))


# --------------------------------------------------------------------------- backgrounds


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A surface colour: a random hue pulled part way towards grey, as tables and floors are."""
    colour = rng.integers(0, 256, size=3).astype(np.float64)
    grey = rng.uniform(30, 230)
    red, green, blue = np.clip(grey + (colour - grey) * rng.uniform(0.3, 1.0), 0, 255)
    return int(red), int(green), int(blue)


def _solid_background(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    return Image.new("RGB", size, _random_colour(rng))


def _gradient_background(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    width, height = size
    angle = rng.uniform(0, 2 * np.pi)
    xs = np.arange(width, dtype=np.float32)[None, :] * np.float32(np.cos(angle))
    ys = np.arange(height, dtype=np.float32)[:, None] * np.float32(np.sin(angle))
    ramp = xs + ys
    ramp = (ramp - ramp.min()) * np.float32(255.0 / max(float(np.ptp(ramp)), 1.0))
    # A grey ramp coloured through a lookup table: cheaper than blending RGB floats.
    grey = Image.fromarray(ramp.astype(np.uint8))
    return ImageOps.colorize(grey, black=_random_colour(rng), white=_random_colour(rng))


def _noise_background(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """Blotchy shading of one colour plus grain, like cloth, cardboard or a dirty bench."""
    cells = (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 1)
    blotches = rng.uniform(-1.0, 1.0, size=cells) * rng.uniform(15, 60)
    shade = np.clip(np.array(_random_colour(rng)) + blotches, 0, 255).astype(np.uint8)
    base = Image.fromarray(shade).resize(size, Image.Resampling.BICUBIC)
    return _add_grain(base, rng.uniform(4, 20), rng)


@cache
def _grain_bank() -> np.ndarray:
    """Fixed unit Gaussian noise, drawn once; views take random windows of it.

    Drawing fresh normals per view cost more than the rest of the frame; a window at a random
    offset of one big fixed field is just as random to the eye and fully deterministic.
    """
    side = _VIEW_SIDE[1] * 2
    noise = np.random.default_rng(12345).standard_normal((side, side, 3), dtype=np.float32)
    return noise


def _add_grain(image: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    bank = _grain_bank()
    top = int(rng.integers(0, bank.shape[0] - image.height + 1))
    left = int(rng.integers(0, bank.shape[1] - image.width + 1))
    window = bank[top : top + image.height, left : left + image.width]
    pixels = np.asarray(image, dtype=np.float32) + window * np.float32(sigma)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _texture_background(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """Tile a tinted texture photo (brick, grass, gravel) over the canvas."""
    texture = _load_texture(_TEXTURES[int(rng.integers(len(_TEXTURES)))])
    scale = rng.uniform(0.4, 1.0)
    tile_size = (max(32, round(texture.width * scale)), max(32, round(texture.height * scale)))
    tile = ImageOps.colorize(
        texture.resize(tile_size, Image.Resampling.BILINEAR),
        black=_random_colour(rng),
        white=_random_colour(rng),
    )
    canvas = Image.new("RGB", size)
    # A random phase so that the tile seams are not always at the top-left corner.
    x0, y0 = -int(rng.integers(tile.width)), -int(rng.integers(tile.height))
    for top in range(y0, size[1], tile.height):
        for left in range(x0, size[0], tile.width):
            canvas.paste(tile, (left, top))
    return canvas


_BACKGROUNDS: tuple[Callable[[tuple[int, int], np.random.Generator], Image.Image], ...] = (
    _solid_background,
    _gradient_background,
    _noise_background,
    _texture_background,
)


# --------------------------------------------------------------------------- composition


def _canvas_size(rng: np.random.Generator) -> tuple[int, int]:
    """200-480 px a side, aspect between 3:5 and 5:3 so nothing is absurdly thin."""
    low, high = _VIEW_SIDE
    width = int(rng.integers(low, high + 1))
    aspect = np.exp(rng.uniform(np.log(0.6), np.log(1 / 0.6)))
    height = int(np.clip(round(width * aspect), low, high))
    return width, height


def _place_rotated(
    canvas: Image.Image, item: Image.Image, rng: np.random.Generator
) -> tuple[Image.Image, float]:
    """Scale ``item`` for the canvas and pick a rotation angle (any angle).

    Usually the whole rotated item fits (the background shows around it); sometimes it is a
    close-up that overflows the frame, with only the corners showing background. Scaling
    happens here, before colour jitter and rotation, so later steps work on few pixels.
    """
    angle = rng.uniform(0.0, 360.0)
    theta = np.deg2rad(angle)
    cos, sin = abs(np.cos(theta)), abs(np.sin(theta))
    # Bounding box of the rotated item, computed up front so the item is resampled only once.
    box_w = item.width * cos + item.height * sin
    box_h = item.width * sin + item.height * cos
    fill = rng.uniform(1.0, 1.3) if rng.random() < 0.25 else rng.uniform(0.6, 1.0)
    scale = fill * min(canvas.width / box_w, canvas.height / box_h)
    new_size = (max(8, round(item.width * scale)), max(8, round(item.height * scale)))
    # Pillow's bilinear filter widens its support when shrinking, so it does not alias, and it
    # is twice as fast as Lanczos; the result is JPEG-compressed anyway.
    return item.resize(new_size, Image.Resampling.BILINEAR), angle


def _paste_rotated(
    canvas: Image.Image, item: Image.Image, angle: float, rng: np.random.Generator
) -> None:
    """Rotate ``item`` by ``angle`` and paste it onto ``canvas`` in place."""
    # Premultiplied alpha so the smoothed edges blend into the background, not into black.
    rotated = item.convert("RGBa").rotate(angle, Image.Resampling.BILINEAR, expand=True)
    rotated = rotated.convert("RGBA")
    left = _random_offset(canvas.width, rotated.width, rng)
    top = _random_offset(canvas.height, rotated.height, rng)
    if rng.random() < 0.5:
        _drop_shadow(canvas, rotated.getchannel("A"), (left, top), rng)
    canvas.paste(rotated, (left, top), rotated)


def _random_offset(canvas_side: int, item_side: int, rng: np.random.Generator) -> int:
    # Fits: anywhere inside. Overflows: anywhere that still covers the whole canvas side.
    low, high = sorted((0, canvas_side - item_side))
    return int(rng.integers(low, high + 1))


def _drop_shadow(
    canvas: Image.Image, mask: Image.Image, corner: tuple[int, int], rng: np.random.Generator
) -> None:
    """Soft shadow under the item, as when it lies on a surface under a lamp."""
    shift = rng.integers(-8, 9, size=2)
    shadow_mask = Image.new("L", canvas.size, 0)
    shadow_mask.paste(mask, (corner[0] + int(shift[0]), corner[1] + int(shift[1])))
    strength = rng.uniform(0.3, 0.6)
    shadow_mask = shadow_mask.filter(ImageFilter.BoxBlur(rng.uniform(2, 6)))
    shadow_mask = shadow_mask.point([round(level * strength) for level in range(256)])
    canvas.paste((0, 0, 0), (0, 0), shadow_mask)


def _camera_effects(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Whole-frame effects: white balance cast, sensor noise, slight defocus."""
    red, green, blue = (float(gain) for gain in rng.uniform(0.9, 1.1, size=3))
    image = image.convert("RGB", (red, 0, 0, 0, 0, green, 0, 0, 0, 0, blue, 0))
    if rng.random() < 0.4:
        image = _add_grain(image, rng.uniform(1.0, 6.0), rng)
    if rng.random() < 0.3:
        # A box blur looks the same as a Gaussian at these radii and costs a third.
        image = image.filter(ImageFilter.BoxBlur(rng.uniform(0.3, 1.0)))
    return image


def _encode(image: Image.Image, rng: np.random.Generator) -> tuple[bytes, str]:
    """Mostly JPEG at field-camera qualities, a few PNGs so clients see both formats."""
    buffer = io.BytesIO()
    if rng.random() < _PNG_PROBABILITY:
        # Light compression: PNG's default level costs more time than the whole render.
        image.save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue(), "png"
    image.save(buffer, format="JPEG", quality=int(rng.integers(70, 96)))
    return buffer.getvalue(), "jpg"


def _render_view(label: str, split: str, index: int, seed: int) -> tuple[bytes, str]:
    """Encoded bytes and file extension of one simulated field photo of ``label``."""
    rng = _view_rng(seed, split, label, index)
    item = _random_flip(_random_crop(_load_item(label), rng), rng)
    size = _canvas_size(rng)
    canvas = _BACKGROUNDS[int(rng.integers(len(_BACKGROUNDS)))](size, rng)
    item, angle = _place_rotated(canvas, item, rng)
    _paste_rotated(canvas, _jitter_colour(item, rng), angle, rng)
    return _encode(_camera_effects(canvas, rng), rng)


# --------------------------------------------------------------------------- catalogue


def _check_arguments(
    train_views: int, query_views: int, seed: int, items: Sequence[str] | None
) -> list[str]:
    """Validate the arguments; return the label list. Raises ValueError with a plain message."""
    if train_views < 1:
        raise ValueError(f"train_views must be at least 1, got {train_views}")
    if query_views < 0:
        raise ValueError(f"query_views must not be negative, got {query_views}")
    if seed < 0:
        raise ValueError(f"seed must not be negative, got {seed}")
    if isinstance(items, str):
        items = [items]  # a lone name, not a sequence of one-letter names
    labels = list(ITEMS if items is None else items)
    unknown = [label for label in labels if label not in ITEMS]
    if unknown:
        raise ValueError(f"unknown demo items {unknown}; choose from {', '.join(ITEMS)}")
    if not labels:
        raise ValueError("items must name at least one demo item")
    if len(set(labels)) != len(labels):
        raise ValueError(f"items must not repeat, got {labels}")
    return labels


def _parameters(
    labels: list[str], train_views: int, query_views: int, seed: int, outside_views: int
) -> dict:
    return {
        "generator_version": _GENERATOR_VERSION,
        "seed": seed,
        "train_views": train_views,
        "query_views": query_views,
        "outside_views": outside_views,
        "items": labels,
    }


def _jobs(
    labels: list[str], train_views: int, query_views: int, outside_views: int
) -> list[tuple[str, str, int, str, int]]:
    """(source item, split, view index, folder, file number) of every file to render."""
    jobs = [
        (label, split, index, label, index)
        for label in labels
        for split, count in (("train", train_views), ("queries", query_views))
        for index in range(count)
    ]
    for split, items in (("train", OUTSIDE_TRAIN), ("queries", OUTSIDE_QUERIES)):
        for number, (item, index) in enumerate(
            (item, index) for item in items for index in range(outside_views)
        ):
            jobs.append((item, split, index, _OUTSIDE_FOLDER, number))
    return jobs


def _is_complete(out: Path, parameters: dict) -> bool:
    """True when ``out`` holds exactly the files a build with these parameters wrote."""
    try:
        manifest = json.loads((out / _MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("parameters") == parameters and manifest.get("files") == _listing(out)


def _listing(out: Path) -> dict[str, int]:
    """Size of every file in the label folders, keyed like the manifest's file list."""
    sizes: dict[str, int] = {}
    for split in _SPLITS:
        for path in (out / split).glob("*/*"):
            sizes[path.relative_to(out).as_posix()] = path.stat().st_size
    return sizes


def _is_generated_folder(path: Path) -> bool:
    """True for a folder holding nothing but views named like ``<folder>_0000.jpg``."""
    if not path.is_dir() or path.is_symlink():
        return False
    pattern = re.compile(rf"{re.escape(path.name)}_\d{{4,}}\.(jpg|png)")
    return all(child.is_file() and pattern.fullmatch(child.name) for child in path.iterdir())


def _remove_stale(out: Path) -> None:
    """Delete the label folders of an earlier build.

    ``train/`` and ``queries/`` must hold nothing but generated label folders; anything else
    there (say, the Python package ``train/`` when ``--out`` is the repository root) makes the
    build fail before a single file is touched or written.
    """
    stale = [
        child for split in _SPLITS if (out / split).is_dir() for child in (out / split).iterdir()
    ]
    foreign = [child for child in stale if not _is_generated_folder(child)]
    if foreign:
        raise ValueError(
            f"refusing to build into {out}: {foreign[0]} was not made by train.demo "
            "(choose an empty or demo-only --out folder)"
        )
    (out / _MANIFEST).unlink(missing_ok=True)
    for folder in sorted(stale):
        shutil.rmtree(folder)


@contextmanager
def _renderer(
    labels: list[str], seed: int
) -> Iterator[Callable[[list[tuple[str, str, int]]], Iterator[tuple[bytes, str]]]]:
    """Yield a function that renders jobs in order, spread over a few threads.

    Threads rather than processes: Pillow and numpy release the GIL in the heavy calls, and
    threads are safe to start from any host (a gRPC server included), unlike ``fork``.
    """
    # Load the shared source photos once, before any thread reads them.
    for label in labels:
        _load_item(label)
    for texture in _TEXTURES:
        _load_texture(texture)
    _grain_bank()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = min(4, cores or 1)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="demo")

    def render_one(job: tuple[str, str, int]) -> tuple[bytes, str]:
        label, split, index = job
        return _render_view(label, split, index, seed)

    def render(jobs: list[tuple[str, str, int]]) -> Iterator[tuple[bytes, str]]:
        return pool.map(render_one, jobs)

    try:
        yield render
    finally:
        # On an error or Ctrl-C, drop the queued views instead of rendering them all first.
        pool.shutdown(wait=True, cancel_futures=True)


def build_demo_catalogue(
    out: Path,
    train_views: int = 40,
    query_views: int = 8,
    seed: int = 0,
    items: Sequence[str] | None = None,
    progress: bool = True,
    outside_views: int = 3,
) -> DemoSummary:
    """Write a demo catalogue of simulated field photos under ``out``.

    Each label in ``items`` (default: all of :data:`ITEMS`) gets ``train_views`` views under
    ``out/train/<label>/`` and ``query_views`` held-out views under ``out/queries/<label>/``.
    Output is byte-identical for the same arguments. When ``out`` already holds a complete
    catalogue built with the same arguments nothing is rewritten; otherwise old label folders
    are removed and everything is regenerated. ``outside_views`` views of each object outside
    the catalogue go to ``out/<split>/_outside/`` (:data:`OUTSIDE_TRAIN`, :data:`OUTSIDE_QUERIES`).

    Raises ValueError for bad counts, a negative seed, unknown or repeated items, or when a
    folder that would be replaced holds files this function did not make.
    """
    labels = _check_arguments(train_views, query_views, seed, items)
    if outside_views < 0:
        raise ValueError(f"outside_views must not be negative, got {outside_views}")
    out = Path(out)
    parameters = _parameters(labels, train_views, query_views, seed, outside_views)
    summary = DemoSummary(out, labels, train_views, query_views, outside_views)
    if _is_complete(out, parameters):
        return summary

    _remove_stale(out)
    jobs = _jobs(labels, train_views, query_views, outside_views)
    render_jobs = [(item, split, index) for item, split, index, _, _ in jobs]
    sources = [*labels, *OUTSIDE_TRAIN, *OUTSIDE_QUERIES] if outside_views else labels
    files: dict[str, int] = {}
    with (
        # The renderer first: loading the source photos then does not stall the bar's first step.
        _renderer(sources, seed) as render,
        tqdm(total=len(jobs), desc="demo catalogue", unit="img", disable=not progress) as bar,
    ):
        # Results arrive in job order, so the files and the manifest do not depend on timing.
        rendered = zip(jobs, render(render_jobs), strict=True)
        for (_, split, _, folder, number), (payload, extension) in rendered:
            (out / split / folder).mkdir(parents=True, exist_ok=True)
            path = out / split / folder / f"{folder}_{number:04d}.{extension}"
            path.write_bytes(payload)
            files[path.relative_to(out).as_posix()] = len(payload)
            bar.update()
    # Written last: its presence with matching parameters is what marks the build complete.
    manifest = {"parameters": parameters, "files": files}
    (out / _MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return summary


# --------------------------------------------------------------------------- CLI


class _OneLineParser(argparse.ArgumentParser):
    """Report argument errors as a single line instead of usage text plus message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _OneLineParser(
        prog="python -m train.demo",
        description="Build a demo catalogue of simulated field photos from bundled images.",
    )
    parser.add_argument("--out", type=Path, default=Path("data/demo"), help="output folder")
    parser.add_argument("--train-views", type=int, default=40, help="training views per item")
    parser.add_argument("--query-views", type=int, default=8, help="held-out views per item")
    parser.add_argument("--seed", type=int, default=0, help="random seed (non-negative)")
    parser.add_argument(
        "--outside-views",
        type=int,
        default=3,
        help="views of each out-of-catalogue object in train/_outside/ and queries/_outside/",
    )
    parser.add_argument(
        "--items",
        type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
        default=None,
        help=f"comma-separated subset of: {','.join(ITEMS)}",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point; prints one summary line, exits 2 on bad arguments."""
    args = _parse_args(argv)
    started = time.perf_counter()
    try:
        summary = build_demo_catalogue(
            args.out,
            train_views=args.train_views,
            query_views=args.query_views,
            seed=args.seed,
            items=args.items,
            progress=not args.quiet,
            outside_views=args.outside_views,
        )
    except (ValueError, OSError) as exc:
        print(f"python -m train.demo: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    elapsed = time.perf_counter() - started
    labels = len(summary.labels)
    print(
        f"demo catalogue: {labels} labels, {labels * summary.train_views} training views, "
        f"{labels * summary.query_views} query views in {summary.out} ({elapsed:.1f}s)"
    )


if __name__ == "__main__":
    main()
