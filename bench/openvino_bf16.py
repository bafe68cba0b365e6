"""Which layers must stay float32 for OpenVINO's bfloat16 to pass the accuracy guard?

OpenVINO's CPU plugin runs a whole compiled model at one `INFERENCE_PRECISION_HINT`; marking
nodes with `disable_fp16_compression` runtime info (what keeps a MatMul in f32 in its own
tests) changed nothing for this network's convolutions. So the network is cut in two at a
convolution (`openvino_engine.split_network`, as the engine's bf16 runs it: the next clean cut
where a residual connection crosses the one asked for): the *head* is compiled in f32 and the
*tail* in bf16, and an image runs through both.
For each cut this prints how many convolutions stay f32, the cosine between the split
network's features and all-f32 features on the accuracy guard's package photos (min / mean,
and the photos that fare worst), and images per second side by side with all-f32 and all-bf16
(batches of `INFER_BATCH`, the engine's inference size; the precisions take turns).

    .venv/bin/python -m bench.openvino_bf16 [--model-dir models/backbones/efficientnet_lite0] \\
        [--cuts 2,6,10,20,35,45] [--json build/bench-openvino-bf16.json]

Only on a CPU that computes bf16 (AVX512_BF16 or AMX); elsewhere it says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from matcher.backends.openvino_engine import INFER_BATCH, cpu_has_bf16, split_network
from matcher.layout import OPENVINO_MODEL_FILE, read_model_info, resolve_version
from matcher.pixels import network_input

#: The accuracy guard's bound (tests/test_engines.py).
MIN_COSINE = 0.999


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.openvino_bf16", description=__doc__)
    default = Path("models/backbones/efficientnet_lite0")
    parser.add_argument("--model-dir", type=Path, default=default, help=f"({default})")
    parser.add_argument("--cuts", default="2,6,10,20,35,45", help="f32 convolutions to try")
    parser.add_argument("--seconds", type=float, default=3.0, help="per speed figure (3)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def package_photos() -> list[Path]:
    """The accuracy guard's photos (tests/test_engines.py uses these): real photos shipped in
    packages, scikit-image's (PNG and JPEG) and scikit-learn's."""
    import skimage
    import sklearn.datasets

    skimage_dir = Path(skimage.__file__).parent / "data"
    sklearn_dir = Path(sklearn.datasets.__file__).parent / "images"
    found = [*skimage_dir.glob("*.png"), *skimage_dir.glob("*.jpg"), *sklearn_dir.glob("*.jpg")]
    return sorted(found)


def _compiled(model: Any, precision: str) -> Callable[[np.ndarray], np.ndarray]:
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
    compiled = ov.Core().compile_model(model, "CPU", config)
    return lambda pixels: np.asarray(compiled([pixels])[0], np.float32)


def _features(run: Callable[[np.ndarray], np.ndarray], pixels: np.ndarray) -> np.ndarray:
    return np.concatenate(
        [run(pixels[start : start + INFER_BATCH]) for start in range(0, len(pixels), INFER_BATCH)]
    )


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cosines: np.ndarray = np.sum(a * b, axis=1) / norms
    return cosines


def _rates(
    runs: dict[str, Callable[[np.ndarray], np.ndarray]], batch: np.ndarray, seconds: float
) -> dict[str, float]:
    """Images per second of each run, in turns of a third of `seconds`, best turn kept."""
    best = dict.fromkeys(runs, 0.0)
    for run in runs.values():
        run(batch)  # warm
    for _ in range(3):
        for name, run in runs.items():
            started, images = time.perf_counter(), 0
            while time.perf_counter() - started < seconds / 3:
                run(batch)
                images += len(batch)
            best[name] = max(best[name], images / (time.perf_counter() - started))
    return best


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not cpu_has_bf16():
        print("bench.openvino_bf16: OpenVINO finds no bf16 on this CPU (AVX512_BF16 or AMX)")
        return 2
    _, version_dir = resolve_version(args.model_dir, None)
    path = version_dir / OPENVINO_MODEL_FILE
    side = read_model_info(version_dir).input_size
    photos = package_photos()
    pixels = np.stack([network_input(p.read_bytes(), side) for p in photos])
    f32, bf16 = _compiled(str(path), "f32"), _compiled(str(path), "bf16")
    reference = _features(f32, pixels)
    runs: dict[str, Callable[[np.ndarray], np.ndarray]] = {"f32": f32, "bf16": bf16}
    accuracy: dict[str, dict[str, Any]] = {}
    for cut in (int(c) for c in args.cuts.split(",") if c):
        try:
            head, tail, cut = split_network(path, cut)  # the next clean cut from there
        except ValueError as exc:
            print(f"{cut} f32 convolutions: {exc}")
            continue
        if any(row["f32_convolutions"] == cut for row in accuracy.values()):
            continue
        first, second = _compiled(head, "f32"), _compiled(tail, "bf16")

        def split(batch: np.ndarray, first=first, second=second) -> np.ndarray:
            return second(first(batch))

        name = f"f32 x {cut}, then bf16"
        runs[name] = split
        found = _cosines(reference, _features(split, pixels))
        worst = np.argsort(found)[:3]
        accuracy[name] = {
            "f32_convolutions": cut,
            "min_cosine": round(float(found.min()), 5),
            "mean_cosine": round(float(found.mean()), 5),
            "worst": {photos[i].name: round(float(found[i]), 5) for i in worst},
        }
    found = _cosines(reference, _features(bf16, pixels))
    accuracy["bf16"] = {
        "min_cosine": round(float(found.min()), 5),
        "mean_cosine": round(float(found.mean()), 5),
    }
    rates = _rates(runs, pixels[:INFER_BATCH], args.seconds)
    print(
        f"{version_dir} ({len(photos)} package photos, the guard asks min cosine >= {MIN_COSINE})"
    )
    print(f"{'':24s} {'min cos':>8s} {'mean cos':>9s} {'img/s':>7s} {'/ f32':>6s}  worst photos")
    for name, rate in rates.items():
        row = accuracy.get(name, {"min_cosine": 1.0, "mean_cosine": 1.0})
        listed = ", ".join(f"{k} {v:.5f}" for k, v in row.get("worst", {}).items())
        print(
            f"{name:24s} {row['min_cosine']:8.5f} {row['mean_cosine']:9.5f} {rate:7.1f} "
            f"{rate / rates['f32']:6.2f}  {listed}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "model": str(version_dir),
            "photos": len(photos),
            "rates": {k: round(v, 1) for k, v in rates.items()},
            "accuracy": accuracy,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
