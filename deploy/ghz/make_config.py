"""Writes deploy/ghz/match.json, the ghz config for load-testing Matcher/Match, and the photo it
sends as deploy/ghz/chelsea.jpg (so that `python -m bench.load` can send the same bytes).

The photo is a real one: scikit-image's "chelsea" (a cat), shrunk to 224 px on its long side,
the backbone's input size, and saved as JPEG quality 85, a typical phone upload recompressed.

    .venv/bin/python deploy/ghz/make_config.py [--out-dir deploy/ghz] [--host localhost:50051]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIDE = 224
QUALITY = 85


def photo_jpeg() -> bytes:
    """The chelsea photo as a small JPEG; the same bytes on every run with the pinned Pillow."""
    from PIL import Image
    from skimage import data

    image = Image.fromarray(data.chelsea())
    image.thumbnail((SIDE, SIDE), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=QUALITY)
    return out.getvalue()


def ghz_config(jpeg: bytes, host: str) -> dict:
    """ghz's config keys (runner/config.go). ghz resolves "proto" and "import-paths" against
    the working directory, not this file: run ghz from the repository root."""
    return {
        "proto": "protos/matcher/v1/matcher.proto",
        "import-paths": ["protos"],
        "call": "matcher.v1.Matcher.Match",
        "host": host,
        "insecure": True,
        "concurrency": 16,
        "connections": 1,
        "total": 2000,
        "timeout": "20s",
        # The protobuf JSON mapping, which ghz uses to build the request: bytes as base64.
        "data": {"image": base64.b64encode(jpeg).decode("ascii"), "top_k": 5},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=HERE)
    parser.add_argument("--host", default="localhost:50051")
    args = parser.parse_args(argv)
    jpeg = photo_jpeg()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "chelsea.jpg").write_bytes(jpeg)
    config = ghz_config(jpeg, args.host)
    (args.out_dir / "match.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {args.out_dir / 'match.json'} ({len(jpeg)} byte JPEG)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
