"""The embedded backend's engines side by side, in one run: network, pipeline, service.

For each model directory (Lite0 and Inception v3 by default) and each engine and precision
this CPU runs (tensorflow; openvino fp32; openvino bf16 where the CPU computes bfloat16):

* network alone: pixels already decoded and resized, in, features out; batch 1 and 32. For
  tensorflow the same network rebuilt with Keras (`bench.pipeline.model_only_runs`), since the
  SavedModel keeps only bytes-in signatures; for openvino the model file export wrote.
* ceiling: the backend on encoded bytes in memory (decode + resize + network), best batch;
  and one call on a 12-megapixel JPEG (a phone photo: decoded at a reduced DCT scale).
* pipeline: `matcher.extraction.extract_features` from the JPEG files, as `make train` runs
  it on a first run (readers, prefetch, a fresh cache, features streamed to a `.npy`).
* service (with --classifier for that model): the real server process, one view per request
  (`--views whole`), at concurrency 1 and 16: requests/s against the engine's own ceiling and
  p50 against one single-image call; its time from start to SERVING and resident memory.

Network and pipeline passes run in `--repeats` rounds, the order rotated per round
(`bench.pipeline.interleaved`); rates are the best pass, ratios the median within a round (one
round shares one load). The ceiling is `bench.service.model_ceiling`.

    .venv/bin/python -m bench.engines --model-dir models/backbones/efficientnet_lite0 \
        --classifier models/classifiers/efficientnet_lite0 \
        --model-dir build/bench-models/fp32/inception_v3 [--count 128] [--json out.json]

The JSON has, for the first model (Lite0) and the default engine (openvino fp32),
`pipeline_vs_tensorflow` and `pipeline_vs_ceiling` (pipeline over the network alone).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

from bench.pipeline import in_batches, interleaved, pipeline, realistic_jpegs, timed
from bench.service import load_level, model_ceiling
from bench.startup import matcher_process

DEFAULT_ENGINE = ("openvino", "fp32")


def engines() -> list[tuple[str, str]]:
    """(engine, precision) pairs this CPU runs natively."""
    from matcher.backends.openvino_engine import cpu_has_bf16

    found = [("tensorflow", "fp32"), ("openvino", "fp32")]
    return found + ([("openvino", "bf16")] if cpu_has_bf16() else [])


def network_runs(backend, images: list[bytes]) -> dict[int, Callable[[], object]]:
    """Passes of the network alone over every image's pre-decoded pixels, at batch 1 and 32."""
    info = backend.info
    runner = backend.runner  # the engine's own parts: the network without decoding
    if info.engine == "openvino":
        pixels = runner.pixels(images)
        return {
            1: lambda: [runner.run(pixels[i : i + 1]) for i in range(len(pixels))],
            32: lambda: [runner.run(batch) for batch in in_batches(pixels, 32)],
        }
    from bench.pipeline import model_only_runs

    return {size: model_only_runs(info, images, size)["model_only"] for size in (1, 32)}


def phone_photo_ms(backend) -> float:
    """Median ms of one call on a 12-megapixel JPEG (4032x3024, a phone camera's size)."""
    import io

    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((4032, 3024)).save(buffer, "JPEG", quality=92)
    photo = buffer.getvalue()
    backend.features([photo])
    return 1000 * statistics.median(timed(partial(backend.features, [photo])) for _ in range(5))


def bench_model(model_dir: Path, paths: list[Path], repeats: int, scratch: Path) -> dict:
    from matcher.backends.embedded import EmbeddedBackend

    images = [p.read_bytes() for p in paths]
    backends = {}
    for engine, precision in engines():
        backend = EmbeddedBackend(model_dir, engine=engine, precision=precision)
        backend.load()
        backends[f"{engine}-{precision}"] = backend
    runs: dict[str, Callable[[], object]] = {}
    for name, backend in backends.items():
        for size, run in network_runs(backend, images).items():
            runs[f"{name}/network_b{size}"] = run
        runs[f"{name}/pipeline"] = partial(pipeline, backend, paths, 32, scratch)
    _progress(f"{model_dir.name}: {repeats} rounds of network and pipeline passes")
    rounds = [
        {name: figures.img_s for name, figures in one.items()}
        for one in interleaved(runs, len(paths), repeats)
    ]
    names = list(runs)
    best = {k: max(r[k] for r in rounds) for k in names}
    result: dict = {"backbone": next(iter(backends.values())).info.name, "images": len(paths)}
    for name, backend in backends.items():
        _progress(f"{model_dir.name}: {name} on bytes in memory")
        alone = model_ceiling(backend, images, repeats=2)
        result[name] = {
            "phone_photo_call_ms": round(phone_photo_ms(backend), 1),
            "network_b1_img_s": round(best[f"{name}/network_b1"], 1),
            "network_b32_img_s": round(best[f"{name}/network_b32"], 1),
            "ceiling_img_s": round(alone["ceiling_img_s"], 1),
            "ceiling_batch": alone["ceiling_batch"],
            "single_call_ms": round(alone["single_call_ms"], 2),
            "pipeline_img_s": round(best[f"{name}/pipeline"], 1),
            "pipeline_vs_network": round(
                statistics.median(
                    r[f"{name}/pipeline"] / max(r[f"{name}/network_b1"], r[f"{name}/network_b32"])
                    for r in rounds
                ),
                3,
            ),
        }
        if name != "tensorflow-fp32":
            result[name]["pipeline_vs_tensorflow"] = round(
                statistics.median(
                    r[f"{name}/pipeline"] / r["tensorflow-fp32/pipeline"] for r in rounds
                ),
                3,
            )
    return result


def bench_service(
    model_dir: Path, classifier: Path, image: bytes, total: int, figures: dict
) -> None:
    """The server per engine at c=1 and c=16, beside that engine's ceiling and single call."""
    from bench.startup import memory_mb

    for name in [k for k in figures if "-" in k and isinstance(figures[k], dict)]:
        engine, precision = name.split("-")
        flags = [
            "--model-dir", str(model_dir), "--classifier", str(classifier),
            "--engine", engine, "--precision", precision, "--views", "whole",
        ]  # fmt: skip
        rows = {}
        _progress(f"{model_dir.name}: the server with {name}")
        with matcher_process(flags) as (process, target, to_serving):
            for concurrency in (1, 16):
                level = load_level(target, image, concurrency, total)
                rows[f"c{concurrency}"] = {
                    "rps": round(level["rps"], 1),
                    "p50_ms": round(level["p50_ms"], 2),
                    "errors": level["errors"],
                }
            rss = memory_mb(process.pid)["VmRSS"]
        own = figures[name]
        own["service"] = rows
        own["service_c16_vs_ceiling"] = round(rows["c16"]["rps"] / own["ceiling_img_s"], 3)
        own["service_c1_p50_vs_single_call"] = round(
            rows["c1"]["p50_ms"] / own["single_call_ms"], 3
        )
        own["start_to_serving_s"] = round(to_serving, 2)
        own["rss_mb_serving"] = round(rss, 1)


def _progress(step: str) -> None:
    print(f"... {step}", file=sys.stderr, flush=True)


def print_figures(result: dict) -> None:
    for model in result["models"]:
        print(f"\n{model['backbone']} ({model['images']} JPEG files)")
        print(
            f"{'engine':<18}{'net b1':>8}{'net b32':>8}{'ceiling':>8}{'pipeline':>9}{'pipe/net':>9}"
            f"{'pipe/tf':>8}{'c16/ceil':>9}{'c1 p50/1':>9}{'start s':>8}{'RSS MB':>8}{'12MP ms':>8}"
        )
        for name, row in model.items():
            if not isinstance(row, dict):
                continue
            print(
                f"{name:<18}{row['network_b1_img_s']:>8}{row['network_b32_img_s']:>8}"
                f"{row['ceiling_img_s']:>8}{row['pipeline_img_s']:>9}{row['pipeline_vs_network']:>9}"
                f"{row.get('pipeline_vs_tensorflow', 1.0):>8}"
                f"{row.get('service_c16_vs_ceiling', ''):>9}"
                f"{row.get('service_c1_p50_vs_single_call', ''):>9}"
                f"{row.get('start_to_serving_s', ''):>8}{row.get('rss_mb_serving', ''):>8}"
                f"{row['phone_photo_call_ms']:>8}"
            )
    print(
        f"\ndefault engine {'-'.join(DEFAULT_ENGINE)} on {result['models'][0]['backbone']}: "
        f"pipeline {result['pipeline_vs_tensorflow']}x tensorflow's, "
        f"{result['pipeline_vs_ceiling']}x its network-alone ceiling"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.engines",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model-dir", type=Path, action="append", required=True)
    parser.add_argument(
        "--classifier", type=Path, action="append", default=[],
        help="a run folder for the model dir of the same position: also bench the service",
    )  # fmt: skip
    parser.add_argument("--count", type=int, default=128, help="JPEG files (128)")
    parser.add_argument("--size", type=int, nargs=2, default=(640, 480))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--total", type=int, default=200, help="requests per service level")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryDirectory() as scratch:
        paths = realistic_jpegs(Path(scratch) / "images", args.count, tuple(args.size))
        models = []
        for index, model_dir in enumerate(args.model_dir):
            figures = bench_model(model_dir, paths, args.repeats, Path(scratch))
            if index < len(args.classifier):
                bench_service(
                    model_dir, args.classifier[index], paths[0].read_bytes(), args.total, figures
                )
            models.append(figures)
    default = models[0]["-".join(DEFAULT_ENGINE)]
    result = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "engines": ["-".join(e) for e in engines()],
        "default_engine": "-".join(DEFAULT_ENGINE),
        "pipeline_vs_tensorflow": default["pipeline_vs_tensorflow"],
        "pipeline_vs_ceiling": default["pipeline_vs_network"],
        "models": models,
    }
    print_figures(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
