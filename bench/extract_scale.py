"""Extraction memory against the number of images: the peak must not grow with it.

Each size runs in a fresh process (peak resident memory, VmHWM, is per process) that extracts
features of that many distinct JPEG files through `matcher.extraction.extract_features` with the
content-hash cache on and the features streamed to a memory-mapped `.npy`, as `train` does.
Prints, per size: images/s, peak RSS (VmHWM) and peak anonymous memory (RssAnon, sampled: the
process's own memory, without file pages the kernel may drop), the `.npy` size, and the peaks'
ratios to the smallest run's; writes JSON with --json.

    .venv/bin/python -m bench.extract_scale --model-dir models/backbones/efficientnet_lite0 \
        [--sizes 5000,50000] [--engine auto|openvino|tensorflow] [--scratch /tmp/extract-scale] \
        [--json out.json]

The photos are generated once under --scratch (64x64 noise over a colour ramp, each one
different, so the cache never answers for another); the network resizes them to its input
size, so a model call costs what it costs for any photo.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.startup import memory_mb


def make_photos(folder: Path, count: int) -> list[Path]:
    """`count` distinct small JPEG files (kept between runs)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = [folder / f"{i // 1000:03d}" / f"photo_{i:06d}.jpg" for i in range(count)]
    ramp = np.linspace(0, 200, 64, dtype=np.float32)[None, :, None]
    for i, path in enumerate(paths):
        if path.exists():
            continue
        path.parent.mkdir(exist_ok=True)
        pixels = ramp + rng.integers(0, 55, (64, 64, 3)) + (i % 7)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=85)
    return paths


def extract(
    model_dir: Path, photos: Path, count: int, out: Path, engine: str = "auto"
) -> dict[str, Any]:
    """In this process: extract `count` photos; images/s and the process's peak memory."""
    from matcher.backends.embedded import EmbeddedBackend
    from matcher.extraction import FeatureCache, extract_features

    backend = EmbeddedBackend(model_dir, engine=engine)
    backend.load()
    paths = sorted(photos.glob("*/*.jpg"))[:count]
    cache = FeatureCache(out.parent / "cache", backend.info.cache_key)
    sampler = AnonPeak()
    started = time.perf_counter()
    with sampler:
        extraction = extract_features(paths, backend, cache, out=out, progress=True)
    seconds = time.perf_counter() - started
    memory = memory_mb(os.getpid())
    return {
        "peak_anon_mb": round(sampler.peak_mb, 1),
        "images": len(extraction.kept),
        "seconds": round(seconds, 1),
        "images_per_s": round(len(extraction.kept) / seconds, 1),
        "peak_rss_mb": round(memory["VmHWM"], 1),
        "npy_mb": round(out.stat().st_size / 2**20, 1),
        "engine": backend.info.engine,
    }


class AnonPeak:
    """Samples the process's anonymous resident memory (RssAnon: not file pages) while open."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.peak_mb = 0.0
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while True:
            self.peak_mb = max(self.peak_mb, memory_mb(os.getpid())["RssAnon"])
            if self._stop.wait(self._interval_s):
                return


def run_size(model_dir: Path, scratch: Path, count: int, engine: str) -> dict[str, Any]:
    """One size in a fresh process."""
    run_dir = scratch / f"run-{count}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    result = run_dir / "result.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.extract_scale",
            "--model-dir",
            str(model_dir),
            "--scratch",
            str(scratch),
            "--child",
            str(count),
            "--engine",
            engine,
        ],
        check=True,
    )
    return json.loads(result.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.extract_scale", description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--sizes", default="5000,50000")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/extract-scale"))
    parser.add_argument("--engine", default="auto", help="embedded engine (auto)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    photos = args.scratch / "photos"
    if args.child:
        run_dir = args.scratch / f"run-{args.child}"
        figures = extract(args.model_dir, photos, args.child, run_dir / "features.npy", args.engine)
        (run_dir / "result.json").write_text(json.dumps(figures))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"generating {max(sizes)} photos under {photos} (kept for the next run)")
    make_photos(photos, max(sizes))
    rows = []
    for count in sizes:
        rows.append({"size": count, **run_size(args.model_dir, args.scratch, count, args.engine)})
    base = rows[0]
    print(
        f"{'images':>7} {'img/s':>7} {'seconds':>8} {'peak RSS MB':>12} {'vs first':>8} "
        f"{'peak anon MB':>12} {'vs first':>8} {'npy MB':>7}"
    )
    for row in rows:
        print(
            f"{row['images']:>7} {row['images_per_s']:>7.1f} {row['seconds']:>8.1f} "
            f"{row['peak_rss_mb']:>12.1f} {row['peak_rss_mb'] / base['peak_rss_mb']:>8.2f} "
            f"{row['peak_anon_mb']:>12.1f} {row['peak_anon_mb'] / base['peak_anon_mb']:>8.2f} "
            f"{row['npy_mb']:>7.1f}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
