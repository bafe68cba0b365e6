"""Feature extraction speed through the embedded backend: one image per call vs batches.

The original code fed one image per model call; `train` feeds batches. Both are measured in
the same run on the same files, so the ratio means something on a shared, noisy machine.

    .venv/bin/python -m bench.extract --model-dir models/backbones/efficientnet_lite0 \
        --images data/demo/train --limit 256 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.extract", description=__doc__)
    parser.add_argument(
        "--model-dir", type=Path, default=Path("models/backbones/efficientnet_lite0")
    )
    parser.add_argument("--images", type=Path, default=Path("data/demo/train"))
    parser.add_argument("--limit", type=int, default=256, help="images to time (256)")
    parser.add_argument("--batch-size", type=int, default=32, help="batched mode (32)")
    parser.add_argument("--repeats", type=int, default=3, help="best of N passes (3)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def best_rate(run, count: int, repeats: int) -> float:
    """Images per second of the fastest of `repeats` passes."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return count / best


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from service.backends.embedded import EmbeddedBackend
    from train.dataset import discover

    paths = discover(args.images).paths[: args.limit]
    if not paths:
        print(f"bench: error: no images under {args.images}", file=sys.stderr)
        return 2
    images = [p.read_bytes() for p in paths]  # timed without disk reads in both modes
    backend = EmbeddedBackend(args.model_dir)
    backend.load()
    backend.features(images[: args.batch_size])  # warm up both paths once
    backend.features(images[:1])

    def one_by_one() -> None:
        for image in images:
            backend.features([image])

    def batched() -> None:
        for start in range(0, len(images), args.batch_size):
            backend.features(images[start : start + args.batch_size])

    single = best_rate(one_by_one, len(images), args.repeats)
    batch = best_rate(batched, len(images), args.repeats)
    figures = {
        "backbone": backend.info.name,
        "images": len(images),
        "cpus": os.cpu_count(),
        "one_image_per_call_img_s": round(single, 1),
        f"batch_{args.batch_size}_img_s": round(batch, 1),
        "batched_over_single": round(batch / single, 2),
    }
    print(f"{figures['backbone']}: {len(images)} encoded images, best of {args.repeats}")
    print(f"  one image per call : {single:7.1f} img/s")
    print(f"  batches of {args.batch_size:<8}: {batch:7.1f} img/s   ({batch / single:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
