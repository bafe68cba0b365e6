"""Peak resident memory of the matcher (and of the TF Serving test double) under worst-case images.

The largest image the server accepts in each format the graph decodes, as cheap to send as it
is costly to decode: a PNG of 50 megapixels (150 KB of flat colour), the JPEG whose decode is
largest after the reduced DCT scale (10000 x 895: a scale of 1), a GIF of 50 megapixels and
the largest 24-bit BMP within the receive limit; and two JPEGs stored turned (EXIF
orientation 6, as phones store photos), which `for_graph` rewrites as upright PNGs that every
later decode reads whole: the one whose rewrite is largest (10000 x 2239, a scale of 1) and a
square 50 megapixels (at a quarter scale); a progressive JPEG of 50 megapixels, whose
coefficients libjpeg holds whole at any scale, and a WebP of 50 megapixels, which decodes
whole to be rewritten. Each concurrency level sends that many Match
calls at once (the images in turn), with the server's default views, and reads the
processes' peak resident memory (VmHWM, reset before each level through /proc/PID/clear_refs).
Every answer must be OK or RESOURCE_EXHAUSTED (too many waiting for the decode budget or the
model queue: the documented answer to overload); anything else is counted as lost.

    .venv/bin/python -m bench.memory [--concurrency 1 8 32 128] [--backend embedded tfserving] \
        [--model-base-path models/backbones] [--classifier models/classifiers/efficientnet_lite0] \
        [--json build/bench-memory.json] [-- server flags...]

The embedded row is the matcher process alone (the network runs in it); the tfserving row is
the matcher (which decodes for its views) and, beside it, the double that runs the SavedModel,
as TF Serving would. `tests/test_memory.py` runs the 128 level against both and holds the
peaks to the bounds in the README ("Memory").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from bench.startup import (
    DEFAULT_CLASSIFIER,
    matcher_process,
    memory_mb,
    start_double,
    wait_for_double,
)
from matcher.core import request_pixels
from matcher.images import ImageHeader, ImageLimits, inspect_image
from matcher.settings import CoreSettings
from matcher.v1 import matcher_pb2, matcher_pb2_grpc
from matcher.views import DEFAULT_VIEWS, rewrite_side

#: Answers that are the documented response to overload; any other is a lost request.
EXPECTED = ("OK", "RESOURCE_EXHAUSTED")
_DEFAULTS = CoreSettings.model_fields
MAX_SIDE: int = _DEFAULTS["max_image_side"].default
MAX_PIXELS: int = _DEFAULTS["max_image_pixels"].default
#: The server's default --max-receive-bytes (service.config), which bounds a BMP's pixels.
MAX_RECEIVE_BYTES = 16 * 1024 * 1024
#: The input side of the default backbone (EfficientNet-Lite0), for the JPEG scale.
INPUT_SIDE = 224


def _flat(width: int, height: int) -> np.ndarray:
    """Pixels that compress to almost nothing and still are a picture: a few bands of colour."""
    pixels = np.zeros((height, width, 3), np.uint8)
    band = max(1, height // 8)
    for i in range(0, height, band):
        pixels[i : i + band] = (37 * i) % 256, (91 * i) % 256, 128
    return pixels


def _encode(pixels: np.ndarray, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **options)
    return buffer.getvalue()


def worst_jpeg_size(
    max_side: int, max_pixels: int, input_side: int, turned: bool = False
) -> tuple[int, int]:
    """The accepted JPEG size whose decode holds the most pixels (after its DCT scale): the
    graph's, or, `turned`, the upright PNG's that `for_graph` rewrites it to."""
    best = (0, (16, 16))
    keep = rewrite_side(input_side)
    for shorter in range(16, max_side + 1):
        longer = min(max_side, max_pixels // shorter)
        if longer < shorter:
            break
        header = ImageHeader("JPEG", longer, shorter, orientation=6 if turned else 1)
        cost = header.rewritten_pixels(keep) if turned else header.decode_pixels(input_side)
        best = max(best, (cost, (longer, shorter)))
    return best[1]


def _turned_jpeg(width: int, height: int) -> bytes:
    """A JPEG stored turned, as a phone stores a photo taken upright (EXIF orientation 6)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(_flat(width, height), "JPEG", quality=90, exif=exif.tobytes())


def worst_case_images(
    max_side: int = MAX_SIDE,
    max_pixels: int = MAX_PIXELS,
    receive_bytes: int = MAX_RECEIVE_BYTES,
    input_side: int = INPUT_SIDE,
) -> dict[str, bytes]:
    """The largest accepted image in each format the graph decodes, and the turned JPEGs
    `for_graph` rewrites whose rewrite decodes the most and that hold the most pixels
    (blocking, seconds)."""
    side = min(max_side, int(max_pixels**0.5))
    jpeg_w, jpeg_h = worst_jpeg_size(max_side, max_pixels, input_side)
    turned_w, turned_h = worst_jpeg_size(max_side, max_pixels, input_side, turned=True)
    # A 24-bit BMP stores 3 bytes a pixel, rows padded to 4 bytes, after a 54-byte header;
    # the gRPC message adds a few bytes around the image.
    bmp_side = int(((receive_bytes - 1024) / 3) ** 0.5) // 4 * 4
    gif = Image.fromarray(_flat(side, side)).convert("P", palette=Image.Palette.ADAPTIVE)
    buffer = io.BytesIO()
    gif.save(buffer, "GIF")
    return {
        "PNG": _encode(_flat(side, side), "PNG", compress_level=9),
        "JPEG": _encode(_flat(jpeg_w, jpeg_h), "JPEG", quality=90),
        "GIF": buffer.getvalue(),
        "BMP": _encode(_flat(bmp_side, bmp_side), "BMP"),
        "JPEG turned": _turned_jpeg(turned_w, turned_h),
        "JPEG turned, square": _turned_jpeg(side, side),
        # libjpeg holds a progressive JPEG's coefficients whole at any scale: 4:4:4, the most.
        "JPEG progressive": _encode(
            _flat(side, side), "JPEG", quality=90, progressive=True, subsampling=0
        ),
        "WebP": _encode(_flat(side, side), "WEBP", quality=80),
    }


def describe(images: dict[str, bytes], input_side: int = INPUT_SIDE) -> dict[str, str]:
    """Each image's size, bytes and what the decode budget admits it for (the default views,
    geometry on: `request_pixels`), for the printout."""
    described = {}
    for fmt, data in images.items():
        header = inspect_image(data, ImageLimits(max_side=MAX_SIDE, max_pixels=MAX_PIXELS))
        held = request_pixels(header, DEFAULT_VIEWS, input_side, keypoints=True)
        described[fmt] = (
            f"{header.width}x{header.height}, {len(data) / 1e3:.0f} KB, holds {held / 1e6:.1f} MP"
        )
    return described


@dataclass
class Level:
    """One concurrency level: answers by status, seconds, peak memory of each process, MiB."""

    concurrency: int
    answers: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    peak_mb: dict[str, float] = field(default_factory=dict)
    #: Resident memory of each process just before the level, MiB.
    before_mb: dict[str, float] = field(default_factory=dict)
    #: The first message of each status other than OK.
    details: dict[str, str] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        return sum(n for code, n in self.answers.items() if code not in EXPECTED)


def reset_peak(pid: int) -> None:
    """Start VmHWM afresh from the current resident memory (Linux: clear_refs 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


async def flood(
    target: str, images: Sequence[bytes], concurrency: int, details: dict[str, str]
) -> Counter[str]:
    """`concurrency` Match calls at once over one channel; their status codes counted (and
    the first message of each code into `details`)."""
    answers: Counter[str] = Counter()
    async with grpc.aio.insecure_channel(
        target, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
    ) as channel:
        stub = matcher_pb2_grpc.MatcherStub(channel)

        async def one(image: bytes) -> None:
            try:
                await stub.Match(matcher_pb2.ImageRequest(image=image, top_k=1), timeout=900)
                answers["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                answers[exc.code().name] += 1
                details.setdefault(exc.code().name, exc.details() or "")

        await asyncio.gather(*(one(images[i % len(images)]) for i in range(concurrency)))
    return answers


def measure_level(
    target: str, images: Sequence[bytes], concurrency: int, pids: dict[str, int]
) -> Level:
    level = Level(concurrency)
    for name, pid in pids.items():
        level.before_mb[name] = round(memory_mb(pid)["VmRSS"], 1)
        reset_peak(pid)
    started = time.monotonic()
    level.answers = dict(asyncio.run(flood(target, images, concurrency, level.details)))
    level.seconds = round(time.monotonic() - started, 1)
    for name, pid in pids.items():
        level.peak_mb[name] = round(memory_mb(pid)["VmHWM"], 1)
    return level


@contextlib.contextmanager
def served(
    backend: str, model_base_path: Path, model_name: str, classifier: Path, flags: Sequence[str]
) -> Iterator[tuple[str, dict[str, int]]]:
    """A matcher process on `backend` (with the double beside it for tfserving); yields its
    target and the pids whose memory counts."""
    common = ["--classifier", str(classifier), "--model-name", model_name, *flags]
    if backend == "embedded":
        with matcher_process([*common, "--model-dir", str(model_base_path / model_name)]) as (
            process,
            target,
            _,
        ):
            yield target, {"matcher": process.pid}
        return
    double, double_target = start_double(model_base_path)
    try:
        wait_for_double(double_target)
        with matcher_process(
            [*common, "--backend", "tfserving", "--tfserving-target", double_target]
        ) as (process, target, _):
            yield target, {"matcher": process.pid, "tfserving double": double.pid}
    finally:
        double.terminate()
        double.wait(30)


def run(
    backends: Sequence[str],
    levels: Sequence[int],
    model_base_path: Path,
    model_name: str,
    classifier: Path,
    flags: Sequence[str] = (),
    images: dict[str, bytes] | None = None,
) -> dict[str, list[Level]]:
    """Every level against every backend, each backend in a fresh server."""
    images = images or worst_case_images()
    results: dict[str, list[Level]] = {}
    for backend in backends:
        with served(backend, model_base_path, model_name, classifier, flags) as (target, pids):
            results[backend] = [
                measure_level(target, list(images.values()), n, pids) for n in levels
            ]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument(
        "--backend", nargs="+", choices=("embedded", "tfserving"), default=["embedded", "tfserving"]
    )
    parser.add_argument("--model-base-path", type=Path, default=Path("models/backbones"))
    parser.add_argument("--model-name", default="efficientnet_lite0")
    parser.add_argument("--classifier", type=Path, default=DEFAULT_CLASSIFIER)
    parser.add_argument("--json", type=Path)
    parser.add_argument("flags", nargs="*", help="more server flags, after --")
    args = parser.parse_args(argv)
    images = worst_case_images()
    for fmt, text in describe(images).items():
        print(f"{fmt:<5} {text}")
    results = run(
        args.backend,
        args.concurrency,
        args.model_base_path,
        args.model_name,
        args.classifier,
        args.flags,
        images,
    )
    print(f"{'backend':<10} {'calls':>6} {'seconds':>8} {'answers':<32} peak RSS (before)")
    for backend, levels in results.items():
        for level in levels:
            answers = ", ".join(f"{code} {n}" for code, n in sorted(level.answers.items()))
            peaks = ", ".join(
                f"{name} {level.peak_mb[name]:.0f} MB ({level.before_mb[name]:.0f})"
                for name in level.peak_mb
            )
            print(
                f"{backend:<10} {level.concurrency:>6} {level.seconds:>8.1f} {answers:<32} {peaks}"
            )
            for code, message in level.details.items():
                print(f"{'':<10} {code}: {message}")
    lost = sum(level.lost for levels in results.values() for level in levels)
    if args.json:
        payload = {
            "images": describe(images),
            "results": {b: [asdict(x) for x in levels] for b, levels in results.items()},
            "lost": lost,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
