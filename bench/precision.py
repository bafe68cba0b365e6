"""Backbone speed in fp32 and bf16 (`python -m export --precision`), side by side in one run.

For each backbone, both precisions are built from the same weights (random by default: speed
does not depend on them) and timed at one batch size, best of N passes, the passes of fp32 and
bf16 taking turns so that a busy, shared machine slows both alike:

* model: the Keras model alone on pre-decoded, resized, normalised float32 pixels;
* signature: both exported as SavedModels by `python -m export` (to a temporary folder; random
  weights with one `--seed`, so both precisions get the same weights), loaded with
  `tf.saved_model.load` and called through `serving_default` on JPEG bytes (real photos of
  about 300 to 640 px a side), as the embedded backend does; decoding and resizing included.

`--grappler-amp` also times the fp32 SavedModel loaded with TensorFlow's runtime rewrite
`auto_mixed_precision_onednn_bfloat16` switched on, and its features' cosine similarity to plain
fp32, to show whether the runtime rewrite reaches a loaded SavedModel. It runs in a child
process that sets the option before anything is loaded, so that no function optimised without
it is reused. (With random weights its cosine is about 1 whatever it does: for a meaningful one,
add `--weights imagenet --backbones efficientnet_lite0`.)

    .venv/bin/python -m bench.precision [--backbones efficientnet_lite0,inception_v3] \\
        [--batch-size 32] [--repeats 3] [--grappler-amp] [--json build/bench-precision.json]

On 2 cores it takes about two minutes, most of it Inception v3. Measured so on a 2-core AMD EPYC
with AVX512_BF16 (no AMX), TensorFlow 2.21, other jobs sharing the cores (img/s, fp32 -> bf16):
Lite0 model 118.7 -> 155.8 (1.31x), signature 93.3 -> 118.4 (1.27x); Inception v3 model
16.6 -> 33.8 (2.04x), signature 16.5 -> 30.8 (1.87x: the float32 decoding and resizing, about
390 img/s, costs both the same).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

DEFAULT_BACKBONES = ("efficientnet_lite0", "inception_v3")
PRECISIONS = ("fp32", "bf16")
#: scikit-image's bundled colour photos, cycled to fill a batch.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.precision",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--backbones", default=",".join(DEFAULT_BACKBONES))
    parser.add_argument("--weights", default="random", help="random (default) or imagenet")
    parser.add_argument("--batch-size", type=int, default=32, help="images per call (32)")
    parser.add_argument("--repeats", type=int, default=3, help="best of N passes (3)")
    parser.add_argument(
        "--no-signature", action="store_true", help="time the models alone, skip the export"
    )
    parser.add_argument(
        "--grappler-amp",
        action="store_true",
        help="also time the fp32 SavedModel with the runtime oneDNN bf16 rewrite",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    # Internal: the child process of --grappler-amp (SavedModel version folder, features file).
    parser.add_argument("--amp-child", nargs=2, type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def jpegs(count: int) -> list[bytes]:
    """`count` JPEG-encoded real photos (quality 90), cycling through PHOTOS."""
    from PIL import Image
    from skimage import data

    encoded = []
    for name in PHOTOS:
        buffer = io.BytesIO()
        Image.fromarray(getattr(data, name)()).convert("RGB").save(buffer, "JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return [encoded[i % len(encoded)] for i in range(count)]


def best_rates(
    runs: Mapping[str, Callable[[], object]], count: int, repeats: int
) -> dict[str, float]:
    """Images per second of each run's fastest pass; the runs take turns, after one warm-up."""
    for run in runs.values():
        run()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for key, run in runs.items():
            started = time.perf_counter()
            run()
            best[key] = min(best[key], time.perf_counter() - started)
    return {key: count / seconds for key, seconds in best.items()}


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def bench_backbone(name: str, args: argparse.Namespace, images: list[bytes], tmp: Path) -> dict:
    import tensorflow as tf

    from matcher.backbones.builder import build_backbone
    from matcher.layout import INPUT_KEY, OUTPUT_KEY, SIGNATURE, resolve_version
    from matcher.preprocess import decode_batch

    backbones = {p: build_backbone(name, args.weights, precision=p) for p in PRECISIONS}
    # Random weights differ per build; the same weights make the features comparable. Both
    # models list their layers in the same order (bf16 is a per-layer copy of fp32).
    backbones["bf16"].model.set_weights(backbones["fp32"].model.get_weights())
    size = backbones["fp32"].input_size
    pixels = backbones["fp32"].normalize(decode_batch(tf.constant(images), size))
    models = {
        p: tf.function(lambda x, m=b.model: m(x, training=False)) for p, b in backbones.items()
    }
    model_runs = {p: (lambda f=f: f(pixels).numpy()) for p, f in models.items()}
    model_rates = best_rates(model_runs, len(images), args.repeats)
    figures: dict = {"input_size": size, "model_img_s": model_rates}
    if args.no_signature:
        return figures

    batch = tf.constant(images)
    signatures = {}
    for precision in backbones:
        model_name = f"{name}_{precision}"
        export_savedmodel(name, args.weights, precision, tmp, model_name)
        _, path = resolve_version(tmp / model_name, None)
        signatures[precision] = tf.saved_model.load(str(path)).signatures[SIGNATURE]
    outputs = {p: s(**{INPUT_KEY: batch})[OUTPUT_KEY] for p, s in signatures.items()}
    figures["signature_output"] = {
        p: [o.dtype.name, *o.shape.as_list()] for p, o in outputs.items()
    }
    runs = {
        p: (lambda s=s: s(**{INPUT_KEY: batch})[OUTPUT_KEY].numpy()) for p, s in signatures.items()
    }
    figures["signature_img_s"] = best_rates(runs, len(images), args.repeats)
    features = {p: o.numpy() for p, o in outputs.items()}
    similarity = cosine(features["fp32"], features["bf16"])
    figures["bf16_cosine_to_fp32"] = {
        "min": float(similarity.min()),
        "mean": float(similarity.mean()),
    }
    figures["_fp32_path"] = str(tmp / f"{name}_fp32")
    figures["_fp32_features"] = features["fp32"]
    return figures


def export_savedmodel(name: str, weights: str, precision: str, base: Path, model_name: str) -> None:
    """`python -m export` in a child process, as a user exports (seeded: the same weights)."""
    command = [sys.executable, "-m", "export", "--backbone", name, "--weights", weights]
    command += ["--precision", precision, "--seed", "0", "--base-path", str(base)]
    done = subprocess.run(
        [*command, "--model-name", model_name], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"export of {model_name} failed: {done.stderr.strip()[-2000:]}")


def bench_grappler_amp(figures: dict, args: argparse.Namespace, tmp: Path) -> None:
    """Time each fp32 SavedModel in a child process that has the runtime bf16 rewrite on."""
    from matcher.layout import resolve_version

    for name, result in figures.items():
        _, path = resolve_version(Path(result["_fp32_path"]), None)
        features = tmp / f"{name}_amp.npy"
        child = [sys.executable, "-m", "bench.precision", "--amp-child", str(path), str(features)]
        child += ["--batch-size", str(args.batch_size), "--repeats", str(args.repeats)]
        done = subprocess.run(child, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            result["grappler_amp"] = {"error": done.stderr.strip().splitlines()[-1:]}
            continue
        similarity = cosine(result["_fp32_features"], np.load(features))
        result["grappler_amp"] = {
            "signature_img_s": json.loads(done.stdout.strip().splitlines()[-1])["img_s"],
            "cosine_to_fp32": {"min": float(similarity.min()), "mean": float(similarity.mean())},
        }


def amp_child(args: argparse.Namespace) -> int:
    """--amp-child: load a SavedModel with the rewrite on, time it, save its features."""
    import tensorflow as tf

    from matcher.layout import INPUT_KEY, OUTPUT_KEY, SIGNATURE

    # Before anything is loaded or traced: grappler reads the option when it optimises a function.
    tf.config.optimizer.set_experimental_options({"auto_mixed_precision_onednn_bfloat16": True})
    version_dir, features = args.amp_child
    signature = tf.saved_model.load(str(version_dir)).signatures[SIGNATURE]
    batch = tf.constant(jpegs(args.batch_size))
    np.save(features, signature(**{INPUT_KEY: batch})[OUTPUT_KEY].numpy())
    run = {"amp": lambda: signature(**{INPUT_KEY: batch})[OUTPUT_KEY].numpy()}
    print(json.dumps({"img_s": best_rates(run, args.batch_size, args.repeats)["amp"]}))
    return 0


def report(figures: dict, env: dict, batch_size: int, repeats: int) -> None:
    """Print the figures side by side, and add each bf16/fp32 ratio to them."""
    print(
        f"batch {batch_size}, best of {repeats}, {env['cpus']} CPUs "
        f"(load average {env['load_average']}), bf16 CPU support: {env['cpu_bf16']}"
    )
    print(f"{'backbone':20s} {'images/s':32s} {'fp32':>8s} {'bf16':>8s} {'bf16/fp32':>10s}")
    rows = (("model", "model on decoded pixels"), ("signature", "signature on JPEG bytes"))
    for name, result in figures.items():
        for key, label in rows:
            rates = result.get(f"{key}_img_s")
            if rates is None:
                continue
            ratio = result[f"{key}_speedup"] = rates["bf16"] / rates["fp32"]
            fp32, bf16 = rates["fp32"], rates["bf16"]
            print(f"{name:20s} {label:32s} {fp32:8.1f} {bf16:8.1f} {ratio:9.2f}x")
        indent = " " * 21
        if "bf16_cosine_to_fp32" in result:
            cos = result["bf16_cosine_to_fp32"]
            print(
                f"{indent}bf16 vs fp32 features ({result['weights']} weights): "
                f"cosine min {cos['min']:.5f}, mean {cos['mean']:.5f}"
            )
        amp = result.get("grappler_amp")
        if amp and "error" in amp:
            print(f"{indent}runtime grappler bf16 failed: {amp['error']}")
        elif amp:
            print(
                f"{indent}fp32 SavedModel + runtime grappler bf16: "
                f"{amp['signature_img_s']:.1f} img/s, cosine to fp32 min "
                f"{amp['cosine_to_fp32']['min']:.5f}"
            )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.amp_child:
        return amp_child(args)
    import tensorflow as tf

    from matcher.backbones.builder import names
    from matcher.backbones.precision import cpu_has_bf16

    chosen = [b.strip() for b in args.backbones.split(",") if b.strip()]
    unknown = [b for b in chosen if b not in names()]
    if unknown:
        print(
            f"bench: error: unknown backbone(s) {unknown}; choose from {names()}", file=sys.stderr
        )
        return 2
    env = {
        "tensorflow": tf.__version__,
        "cpus": len(os.sched_getaffinity(0)),
        "cpu_bf16": cpu_has_bf16(),
        "load_average": round(os.getloadavg()[0], 2),
    }
    images = jpegs(args.batch_size)
    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        for name in chosen:
            figures[name] = {
                "weights": args.weights,
                **bench_backbone(name, args, images, Path(tmp)),
            }
        if args.grappler_amp and not args.no_signature:
            bench_grappler_amp(figures, args, Path(tmp))
    for result in figures.values():
        result.pop("_fp32_path", None)
        result.pop("_fp32_features", None)
    report(figures, env, args.batch_size, args.repeats)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            **env,
            "backbones": figures,
        }
        args.json.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
