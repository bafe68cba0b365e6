"""What the rewrite before the graph costs for phone photos (`matcher.images.for_graph`).

A 12-megapixel frame (scikit-image's astronaut resized to 4032x3024) as a JPEG with EXIF
orientation 6 (a phone held upright), as HEIC and as WebP: each rewritten as an upright PNG,
best of `--repeats` passes. Prints a table and, with `--json`, writes the figures.

    .venv/bin/python -m bench.phone_photos [--repeats 3] [--json build/bench-phone-photos.json]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

from PIL import Image

from matcher.images import ImageLimits, for_graph, inspect_image, load_image_readers
from matcher.views import rewrite_side

SIZE = (4032, 3024)
#: EfficientNet-Lite0's, the default backbone's: a turned JPEG keeps what its views need.
INPUT_SIDE = 224


def photos() -> dict[str, bytes]:
    from skimage import data

    frame = Image.fromarray(data.astronaut()).resize(SIZE, Image.Resampling.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = 6
    encoded = {}
    for name, fmt, options in (
        ("JPEG q90, EXIF orientation 6", "JPEG", {"quality": 90, "exif": exif.tobytes()}),
        ("HEIC q90", "HEIF", {"quality": 90}),
        ("WebP q80", "WEBP", {"quality": 80}),
    ):
        buffer = io.BytesIO()
        frame.save(buffer, fmt, **options)
        encoded[name] = buffer.getvalue()
    return encoded


def best_seconds(data: bytes, repeats: int) -> tuple[float, int]:
    header = inspect_image(data, ImageLimits())
    best, size = float("inf"), 0
    for _ in range(repeats):
        started = time.perf_counter()
        size = len(for_graph(data, header, rewrite_side(INPUT_SIDE)))
        best = min(best, time.perf_counter() - started)
    return best, size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.phone_photos", description=__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="best of N passes (3)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    load_image_readers()
    figures = {}
    print(f"{'photo':32s} {'in':>8s} {'PNG out':>8s} {'time':>9s}")
    for name, data in photos().items():
        seconds, out = best_seconds(data, args.repeats)
        figures[name] = {"bytes_in": len(data), "bytes_out": out, "seconds": seconds}
        print(f"{name:32s} {len(data) / 1e6:6.1f}MB {out / 1e6:6.1f}MB {1000 * seconds:7.0f}ms")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"size": SIZE, **figures}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
