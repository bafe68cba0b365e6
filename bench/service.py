"""The service under load, beside the model's own ceiling, measured in one run.

First the model alone (the embedded backend in this process, no gRPC): the time of one
single-image call and the best images/s over batch sizes. Then the real server as its own
process, driven by bench/load.py at each concurrency: requests/s and p50/p95/p99, as ratios
to those two figures.

    .venv/bin/python -m bench.service --model-dir models/backbones/efficientnet_lite0 \
        --classifier models/classifiers/efficientnet_lite0/classifier.skops \
        --image deploy/ghz/chelsea.jpg [--concurrency 1,4,16,64] [--total 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
from functools import partial
from pathlib import Path
from typing import Any

from bench.load import LoadConfig, run_load
from bench.pipeline import timed
from bench.startup import DEFAULT_CLASSIFIER, DEFAULT_MODEL_DIR, matcher_process

BATCH_SIZES = (1, 8, 16, 32)


def model_ceiling(backend: Any, images: list[bytes], repeats: int = 5) -> dict[str, float]:
    """One-image call time (median) and the best images/s of a loaded backend alone, on
    encoded bytes in memory (`images` cycled to fill each batch)."""
    single = [timed(partial(backend.features, [images[i % len(images)]])) for i in range(20)]
    rates = {}
    for size in BATCH_SIZES:
        batch = [images[i % len(images)] for i in range(size)]
        backend.features(batch)  # trace this shape once
        best = min(timed(partial(backend.features, batch)) for _ in range(repeats))
        rates[size] = size / best
    best_size = max(rates, key=rates.__getitem__)
    return {
        "single_call_ms": 1000 * statistics.median(single),
        "ceiling_img_s": rates[best_size],
        "ceiling_batch": best_size,
        **{f"batch_{size}_img_s": rate for size, rate in rates.items()},
    }


def load_level(target: str, image: bytes, concurrency: int, total: int) -> dict[str, float]:
    """A warm-up pass, then one measured pass of `total` Matches at `concurrency`."""
    config = LoadConfig(
        target=target,
        images=(image,),
        insecure=True,
        concurrency=concurrency,
        total=max(total, 4 * concurrency),
    )
    asyncio.run(run_load(config))  # warm-up pass at this concurrency, not reported
    report = asyncio.run(run_load(config))
    percentiles = dict(report.latency_distribution)
    return {
        "concurrency": concurrency,
        "rps": report.rps,
        "p50_ms": percentiles[50] / 1e6,
        "p95_ms": percentiles[95] / 1e6,
        "p99_ms": percentiles[99] / 1e6,
        "errors": report.count - len(report.ok_latencies_ns),
    }


def service_levels(
    flags: list[str], image: bytes, levels: list[int], total: int
) -> list[dict[str, float]]:
    """Start the server with `flags`, then load it at each concurrency."""
    with matcher_process(flags) as (_, target, _):
        return [load_level(target, image, concurrency, total) for concurrency in levels]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.service", description=__doc__)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument(
        "--classifier",
        type=Path,
        default=DEFAULT_CLASSIFIER,
    )
    parser.add_argument("--image", type=Path, default=Path("deploy/ghz/chelsea.jpg"))
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--total", type=int, default=300, help="requests per level (300)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    image = args.image.read_bytes()
    from matcher.backends.embedded import EmbeddedBackend

    backend = EmbeddedBackend(args.model_dir)
    backend.load()
    ceiling = model_ceiling(backend, [image])
    del backend
    gc.collect()
    levels = [int(c) for c in args.concurrency.split(",")]
    flags = ["--model-dir", str(args.model_dir), "--classifier", str(args.classifier)]
    rows = service_levels(flags, image, levels, args.total)
    print(
        f"model alone: one image {ceiling['single_call_ms']:.1f} ms; ceiling "
        f"{ceiling['ceiling_img_s']:.1f} img/s at batch {ceiling['ceiling_batch']}"
    )
    print(
        f"{'conc':>4} {'req/s':>7} {'/ceiling':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"
        f" {'p50/single':>10} {'errors':>6}"
    )
    for row in rows:
        print(
            f"{row['concurrency']:>4} {row['rps']:>7.1f} "
            f"{row['rps'] / ceiling['ceiling_img_s']:>8.2f} {row['p50_ms']:>8.1f} "
            f"{row['p95_ms']:>8.1f} {row['p99_ms']:>8.1f} "
            f"{row['p50_ms'] / ceiling['single_call_ms']:>10.2f} {row['errors']:>6}"
        )
    if args.json:
        args.json.write_text(json.dumps({"model": ceiling, "service": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
