"""Extraction speed from files on disk: the one-image loop, the pipeline, and the ceiling.

Measured side by side in one run, through the real embedded backend, on the same JPEG files:

* loop: the original code, one image per model call (read, header check, call, next).
* pipeline: `matcher.extraction.extract_features` from the files (readers, prefetch, batches, a
  fresh cache written and features streamed to a memory-mapped `.npy`), at the ceiling's best
  batch size.
* ceiling: the SavedModel's serving signature alone on encoded bytes already in memory, at
  the best of `--batch-sizes`. It still decodes and resizes in the graph, as any bytes-in
  pipeline must, so this is the most the pipeline can reach: no disk, no hashing, no cache.
* model only (unless --no-model-only): the same network rebuilt with Keras (random weights:
  speed does not depend on their values) on pixels decoded and resized once up front, at the
  best batch size, and the in-graph decode + resize alone. These say how the ceiling splits
  between decoding and the network; no pipeline that is given files can reach this rate.

The batch size is the fastest of one pass per `--batch-sizes` (or `--batch-size`). Then
`--repeats` rounds run one pass of each mode, the order rotated per round: rates are the best
pass, ratios the median of the ratios within a round (passes of one round share the load of a
shared machine), and CPU ms per image (all threads) tells the work a pass costs, which other
processes on the machine disturb far less than the wall clock.

    .venv/bin/python -m export --backbone inception_v3 --weights random --base-path /tmp/m
    .venv/bin/python -m bench.pipeline --model-dir /tmp/m/inception_v3 [--model-dir ...] \
        [--images data/demo/train] [--count 64] [--json out.json]

Without --images (and no data/demo/train), `--count` photos of `--size` pixels are generated
as JPEG files (quality 90) in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from matcher.backends.base import FeatureExtractor
from matcher.domain import BackboneInfo

DEMO_IMAGES = Path("data/demo/train")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.pipeline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        action="append",
        help="a SavedModel base path (repeat for several backbones); "
        "default models/backbones/efficientnet_lite0",
    )
    parser.add_argument("--images", type=Path, help=f"image folder (default {DEMO_IMAGES})")
    parser.add_argument("--count", type=int, default=64, help="images to time (64)")
    parser.add_argument("--size", default="1024x768", help="generated photo size, WxH (1024x768)")
    parser.add_argument(
        "--batch-sizes",
        default="1,2,4,8,16,32",
        help="batch sizes the ceiling tries (1,2,4,8,16,32)",
    )
    parser.add_argument(
        "--batch-size", type=int, help="batch size of the pipeline and ceiling (default: best)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds of passes (3)")
    parser.add_argument(
        "--no-model-only", action="store_true", help="skip the decode-excluded figures"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    args.model_dir = args.model_dir or [Path("models/backbones/efficientnet_lite0")]
    args.batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    args.size = tuple(int(side) for side in args.size.lower().split("x"))
    return args


def realistic_jpegs(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """`count` photo-like JPEGs: real photos, randomly cropped, flipped and grained."""
    from PIL import Image, ImageOps
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        photo = Image.fromarray(photos[index % len(photos)])
        width, height = photo.size
        left, top = int(rng.integers(0, width // 4)), int(rng.integers(0, height // 4))
        crop = photo.crop((left, top, left + width * 3 // 4, top + height * 3 // 4))
        crop = ImageOps.mirror(crop) if rng.random() < 0.5 else crop
        pixels = np.asarray(crop.resize(size), np.float32)
        pixels += rng.normal(0, 4, pixels.shape)  # sensor grain: sizes files like photos
        path = folder / f"photo_{index:05d}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def image_paths(args: argparse.Namespace, scratch: Path) -> list[Path]:
    folder = args.images or (DEMO_IMAGES if DEMO_IMAGES.is_dir() else None)
    if folder is None:
        return realistic_jpegs(scratch / "images", args.count, args.size)
    from matcher.dataset import discover

    return discover(folder).paths[: args.count]


def timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def in_batches(items: Sequence, size: int) -> list[Sequence]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def in_memory_pass(backend: Any, images: list[bytes], size: int) -> list[np.ndarray]:
    """The features of `images`, `size` at a time: the ceiling's pass."""
    return [backend.features(b) for b in in_batches(images, size)]


def sweep(backend: Any, images: list[bytes], sizes: list[int]) -> dict[int, float]:
    """Images per second of the signature on in-memory bytes, per batch size."""
    rates = {}
    for size in sizes:
        backend.features(images[:size])  # first call at a new shape allocates; not timed
        seconds = timed(partial(in_memory_pass, backend, images, size))
        rates[size] = len(images) / seconds
    return rates


def one_image_loop(backend: Any, paths: list[Path]) -> None:
    """The original code: read a file, check its header, run the model on it alone."""
    from matcher.images import ImageLimits, inspect_image

    limits = ImageLimits()
    for path in paths:
        data = path.read_bytes()
        inspect_image(data, limits)
        backend.features([data])


class TimedBackend:
    """A FeatureExtractor that adds up the wall time spent inside `features` (the model's share).

    Everything else is delegated to the wrapped backend.
    """

    def __init__(self, backend: FeatureExtractor) -> None:
        self._backend = backend
        self.kind = backend.kind
        self.seconds = 0.0

    def load(self) -> None:
        self._backend.load()

    @property
    def ready(self) -> bool:
        return self._backend.ready

    @property
    def info(self) -> BackboneInfo:
        return self._backend.info

    def features(self, images: Sequence[bytes]) -> np.ndarray:
        started = time.perf_counter()
        try:
            return self._backend.features(images)
        finally:
            self.seconds += time.perf_counter() - started


def pipeline(backend: FeatureExtractor, paths: list[Path], batch_size: int, scratch: Path) -> float:
    """`extract_features` as `train` runs it on a first run: everything computed and cached.

    Returns the share of the pass's wall time the model was running: near 1, the model is
    the limit and reading is hidden behind it.
    """
    from matcher.extraction import FeatureCache, extract_features

    timed_backend = TimedBackend(backend)
    with tempfile.TemporaryDirectory(dir=scratch) as work:
        cache = FeatureCache(Path(work) / "cache", backend.info.cache_key)
        started = time.perf_counter()
        result = extract_features(
            paths, timed_backend, cache, batch_size, progress=False, out=Path(work) / "features.npy"
        )
        seconds = time.perf_counter() - started
        if result.rejected or result.computed != len(paths):
            raise RuntimeError(f"pipeline rejected {list(result.rejected)}")
    return timed_backend.seconds / seconds


def model_only_runs(
    info: Any, images: list[bytes], batch_size: int
) -> dict[str, Callable[[], object]]:
    """Passes of the in-graph decode + resize alone, and of the network alone on pixels.

    The network is rebuilt with Keras from `matcher.backbones.builder` (random weights; the
    speed does not depend on them), since the SavedModel keeps only its bytes-in signatures.
    """
    import tensorflow as tf

    from matcher.backbones.builder import build_backbone
    from matcher.preprocess import decode_batch

    backbone = build_backbone(info.name, "random")
    if info.layer and backbone.layer != info.layer:
        backbone = build_backbone(info.name, "random", info.layer)
    size = info.input_size
    decode = tf.function(
        lambda encoded: decode_batch(encoded, size),
        input_signature=[tf.TensorSpec([None], tf.string)],
    )
    network = tf.function(
        lambda pixels: backbone.model(pixels, training=False),
        input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)],
    )
    batches = [tf.constant(list(b), tf.string) for b in in_batches(images, batch_size)]
    pixels = [backbone.normalize(decode(b)) for b in batches]  # decoded once, up front
    network(pixels[0])
    return {
        "decode_only": lambda: [decode(b).numpy() for b in batches],
        "model_only": lambda: [network(p).numpy() for p in pixels],
    }


@dataclass(frozen=True)
class Pass:
    """One timed pass over every image."""

    img_s: float
    #: CPU time of the whole process (every thread) per image: what a pass costs in work,
    #: which another process on the machine disturbs far less than the wall clock.
    cpu_ms: float


def measure(run: Callable[[], object], count: int) -> Pass:
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return Pass(count / wall, 1000 * cpu / count)


def interleaved(runs: Mapping[str, Callable[[], object]], count: int, repeats: int) -> list[dict]:
    """`repeats` rounds of one pass per run, the order rotated each round."""
    names = list(runs)
    rounds = []
    for round_ in range(repeats):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        rounds.append({name: measure(runs[name], count) for name in order})
    return rounds


def bench_model(
    model_dir: Path, paths: list[Path], args: argparse.Namespace, scratch: Path
) -> dict:
    """Every figure for one backbone."""
    from matcher.backends.embedded import EmbeddedBackend

    backend = EmbeddedBackend(model_dir)
    backend.load()
    images = [path.read_bytes() for path in paths]
    rates = sweep(backend, images, args.batch_sizes)
    best = args.batch_size or max(rates, key=rates.__getitem__)
    model_busy: list[float] = []
    runs: dict[str, Callable[[], object]] = {
        "loop": lambda: one_image_loop(backend, paths),
        "pipeline": lambda: model_busy.append(pipeline(backend, paths, best, scratch)),
        "ceiling": partial(in_memory_pass, backend, images, best),
    }
    if not args.no_model_only:
        runs.update(model_only_runs(backend.info, images, best))
    rounds = interleaved(runs, len(paths), args.repeats)
    best_rate = {name: max(r[name].img_s for r in rounds) for name in runs}
    result = {
        "backbone": backend.info.name,
        "input_size": backend.info.input_size,
        "images": len(paths),
        "mean_file_kb": round(sum(map(len, images)) / len(images) / 1024, 1),
        "batch_size": best,
        "ceiling_by_batch_size_img_s": {str(k): round(v, 2) for k, v in rates.items()},
        **{f"{name}_img_s": round(rate, 2) for name, rate in best_rate.items()},
        **{
            f"{name}_cpu_ms_per_img": round(min(r[name].cpu_ms for r in rounds), 1) for name in runs
        },
        # Ratios within a round, then the median: passes of one round ran under the same load.
        "pipeline_over_ceiling": _median_ratio(rounds, "pipeline", "ceiling"),
        "pipeline_over_loop": _median_ratio(rounds, "pipeline", "loop"),
        "pipeline_model_busy": round(float(np.median(model_busy)), 3),
        "rounds_img_s": [{k: round(v.img_s, 2) for k, v in r.items()} for r in rounds],
    }
    if not args.no_model_only:
        result["pipeline_over_model_only"] = _median_ratio(rounds, "pipeline", "model_only")
    return result


def _median_ratio(rounds: list[dict], top: str, bottom: str) -> float:
    return round(float(np.median([r[top].img_s / r[bottom].img_s for r in rounds])), 3)


def print_figures(result: dict) -> None:
    print(
        f"{result['backbone']} ({result['input_size']}px): {result['images']} JPEG files of "
        f"{result['mean_file_kb']} KiB on average; best pass of {len(result['rounds_img_s'])}, "
        "ratios: median over rounds"
    )
    sweep_text = ", ".join(f"{k}: {v}" for k, v in result["ceiling_by_batch_size_img_s"].items())
    print(f"  ceiling by batch size        {sweep_text} img/s")
    rows = [
        ("one image per call (loop)", "loop"),
        (f"pipeline from files (b={result['batch_size']})", "pipeline"),
        (f"ceiling, bytes in RAM (b={result['batch_size']})", "ceiling"),
    ]
    for label, key in rows:
        print(
            f"  {label:<29}{result[f'{key}_img_s']:8.2f} img/s "
            f"{result[f'{key}_cpu_ms_per_img']:8.1f} CPU ms/img"
        )
    print(
        f"  pipeline / ceiling = {result['pipeline_over_ceiling']:.2f}x, "
        f"pipeline / loop = {result['pipeline_over_loop']:.2f}x; in the pipeline the model "
        f"runs {100 * result['pipeline_model_busy']:.1f}% of the time"
    )
    if "model_only_img_s" in result:
        print(
            f"  decode + resize only         {result['decode_only_img_s']:8.2f} img/s "
            f"{result['decode_only_cpu_ms_per_img']:8.1f} CPU ms/img"
        )
        print(
            f"  network only, on pixels      {result['model_only_img_s']:8.2f} img/s "
            f"{result['model_only_cpu_ms_per_img']:8.1f} CPU ms/img "
            f"(pipeline / network only = {result['pipeline_over_model_only']:.2f}x)"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as scratch:
        paths = image_paths(args, Path(scratch))
        if not paths:
            print("bench: error: no images to time", file=sys.stderr)
            return 2
        results = []
        for model_dir in args.model_dir:
            results.append(bench_model(model_dir, paths, args, Path(scratch)))
            print_figures(results[-1])
    figures = {"cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "runs": results}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
