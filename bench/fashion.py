"""Fashion-MNIST, a large real catalogue: 70,000 product photos of 10 kinds, frozen features.

Reads the Debian package `dataset-fashion-mnist` (the published 60,000/10,000 split in four
gzip files), writes every photo once as a PNG into the folder layout `train` reads
(SCRATCH/photos/{train,test}/<kind>/<n>.png: what a user would point `matcher-train` at),
and extracts features of both splits through the embedded backend (the default engine),
`matcher.extraction.extract_features` and the content-hash cache, each split in a fresh
process whose peak memory is measured. Then it trains each matcher on the training split and
scores it on the test split, each fit in a fresh process (time, peak memory), and prints the
accuracies beside the dataset's published scikit-learn benchmark (best row: SVC, 0.897 on raw
pixels).

Configurations (`--configs`):

* `default`: the default backbone as `make export` writes it (EfficientNet-Lite0, pooled at its
  last layer, 1280 features).
* `lite0-multi`: the same network exported with `--layer block4c_add,block5c_add,block6d_add,
  block7a_project_bn`: four mid-level layers average-pooled and concatenated (704 features).
  Each of its layers alone is scored too (a slice of the same features).
* `lite0-grid`: three of those layers each pooled over a 2 x 2 grid of cells (`NAME:2`, 2496
  features): Fashion-MNIST's photos are aligned, so where a pattern sits counts.
* `lite1-multi`: EfficientNet-Lite1 (240 px), its four corresponding layers.

Matchers: `linear` (on all training photos; `sgd` is its rival, a calibrated linear SVM trained
by SGD, scored for comparison), `knn` and `prototype` (the catalogue index), and
`svm` (the original's grid search, on a stratified subsample of `--svm-samples`: its refit
grows faster than the square of the photos). Memory is also checked against the number of
photos: the training split's extraction peak against a `--memory-probe` photo one.

    .venv/bin/python -m bench.fashion [--configs default,lite0-multi] [--json FILE]
        [--train-limit N --test-limit N] [--scratch build/fashion]

About 45 minutes on 2 cores the first time (three extractions of 60,000-70,000 photos); the
cache makes a rerun cost only the matchers.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np

DATA = Path("/usr/share/datasets/fashion-mnist")
#: The dataset's class names, in label order (its README).
KINDS = (
    "T-shirt_top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle_boot",
)
#: The best rows of the published scikit-learn benchmark on raw pixels
#: (/usr/share/doc/dataset-fashion-mnist/benchmark/baselines.json).
PUBLISHED = {
    "SVC (C=10, rbf)": 0.897,
    "GradientBoostingClassifier": 0.880,
    "RandomForestClassifier": 0.873,
    "MLPClassifier": 0.871,
    "KNeighborsClassifier": 0.860,
    "LogisticRegression": 0.842,
}
TARGET = 0.92
MATCHERS = ("linear", "sgd", "knn", "prototype", "svm")


@dataclass(frozen=True)
class Config:
    """One way of making features: a backbone exported with a layer choice."""

    name: str
    backbone: str
    #: Comma-separated layers pooled into the features ("" : the last).
    layer: str = ""
    #: Each layer's share of the features, in order, to score alone (multi-layer only).
    slices: tuple[tuple[str, int], ...] = ()


CONFIGS = {
    "default": Config("default", "efficientnet_lite0"),
    "lite0-multi": Config(
        "lite0-multi",
        "efficientnet_lite0",
        "block4c_add,block5c_add,block6d_add,block7a_project_bn",
        (("block4c_add", 80), ("block5c_add", 112), ("block6d_add", 192), ("block7a", 320)),
    ),
    "lite0-grid": Config(
        "lite0-grid",
        "efficientnet_lite0",
        "block5c_add:2,block6d_add:2,block7a_project_bn:2",
        (("block5c_add:2", 448), ("block6d_add:2", 768), ("block7a:2", 1280)),
    ),
    "lite1-multi": Config(
        "lite1-multi",
        "efficientnet_lite1",
        "block4d_add,block5d_add,block6e_add,block7a_project_bn",
        (("block4d_add", 80), ("block5d_add", 112), ("block6e_add", 192), ("block7a", 320)),
    ),
}


def read_split(data: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, 28, 28] and labels [N] of "train" or "t10k" (IDX files, gzipped)."""
    images = gzip.decompress((data / f"{split}-images-idx3-ubyte.gz").read_bytes())
    labels = gzip.decompress((data / f"{split}-labels-idx1-ubyte.gz").read_bytes())
    # IDX: a big-endian magic and dimension sizes, then the raw bytes.
    if int.from_bytes(images[:4], "big") != 2051 or int.from_bytes(labels[:4], "big") != 2049:
        raise ValueError(f"{data}: not Fashion-MNIST IDX files")
    count = int.from_bytes(images[4:8], "big")
    x = np.frombuffer(images, np.uint8, offset=16).reshape(count, 28, 28)
    y = np.frombuffer(labels, np.uint8, offset=8)
    return x, y


def write_photos(root: Path, split: str, images: np.ndarray, labels: np.ndarray) -> list[Path]:
    """Each photo as root/<split>/<kind>/<n>.png (written once), in dataset order."""
    from PIL import Image
    from tqdm import tqdm

    paths = [root / split / KINDS[label] / f"{n:05d}.png" for n, label in enumerate(labels)]
    missing = [n for n, path in enumerate(paths) if not path.is_file()]
    for kind in KINDS:
        (root / split / kind).mkdir(parents=True, exist_ok=True)
    for n in tqdm(missing, desc=f"{split} photos", unit="img", disable=not missing):
        tmp = paths[n].with_suffix(".tmp")
        Image.fromarray(images[n]).save(tmp, format="PNG")
        tmp.replace(paths[n])
    return paths


def export_config(config: Config, scratch: Path) -> Path:
    """The SavedModel base path of a non-default configuration (exported once)."""
    base = scratch / "models"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "export",
            "--backbone",
            config.backbone,
            "--layer",
            config.layer,
            "--base-path",
            str(base),
            "--model-name",
            config.name,
            "--if-missing",
        ],
        check=True,
    )
    return base / config.name


# --- in a fresh process: one extraction, one matcher ---


def extract_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Features of the listed photos to spec["out"] (.npy); time and peak memory."""
    from bench.extract_scale import AnonPeak
    from bench.startup import memory_mb
    from matcher.backends.embedded import EmbeddedBackend
    from matcher.extraction import FeatureCache, extract_features

    backend = EmbeddedBackend(Path(spec["model_dir"]))
    backend.load()
    paths = PathList(Path(spec["paths"]).read_text().splitlines())
    cache = FeatureCache(Path(spec["cache"]), backend.info.cache_key)
    before = memory_mb(os.getpid())
    started = time.perf_counter()
    with AnonPeak() as anon:
        found = extract_features(paths, backend, cache, out=Path(spec["out"]), progress=True)
    seconds = time.perf_counter() - started
    if found.rejected:
        raise RuntimeError(f"{len(found.rejected)} photos rejected: {list(found.rejected)[:3]}")
    return {
        "images": len(paths),
        "computed": found.computed,
        "seconds": round(seconds, 1),
        "images_per_s": round(len(paths) / seconds, 1),
        "peak_rss_mb": round(memory_mb(os.getpid())["VmHWM"], 1),
        "peak_anon_mb": round(anon.peak_mb, 1),
        # Resident and anonymous memory just before extraction (model loaded, list read):
        # the peaks minus these are what extraction itself added.
        "rss_before_mb": round(before["VmRSS"], 1),
        "anon_before_mb": round(before["RssAnon"], 1),
        "extraction_anon_mb": round(anon.peak_mb - before["RssAnon"], 1),
        "engine": backend.info.engine,
        "feature_dim": backend.info.feature_dim,
    }


class PathList(Sequence[Path]):
    """The photos' paths as the listing's strings, each made a Path when read: 60,000 Path
    objects (with their cached strings) hold 23 MB, 0.4 KB a photo, which would show as
    extraction memory growing with the catalogue when it is the caller's list."""

    def __init__(self, lines: list[str]) -> None:
        self._lines = lines

    def __len__(self) -> int:
        return len(self._lines)

    @overload
    def __getitem__(self, index: int) -> Path: ...
    @overload
    def __getitem__(self, index: slice) -> list[Path]: ...
    def __getitem__(self, index: int | slice) -> Path | list[Path]:
        if isinstance(index, slice):
            return [Path(line) for line in self._lines[index]]
        return Path(self._lines[index])


def matcher_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one matcher on spec's training features, score it on the test features."""
    from bench.startup import memory_mb

    x_train, y_train = _features(spec, "train")
    x_test, y_test = _features(spec, "test")
    matcher = spec["matcher"]
    started = time.perf_counter()
    details: dict[str, Any] = {}
    if matcher == "linear":
        from matcher.linear import fit_linear

        linear = fit_linear(x_train, [str(y) for y in y_train])
        trained = time.perf_counter() - started
        predicted = linear.predict(x_test)
        details = {"C": linear.best_params_["C"], "validation": linear.validation}
    elif matcher == "sgd":
        # What the issue named: a linear SVM by SGD, calibrated (the linear matcher's rival).
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.linear_model import SGDClassifier
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        model = make_pipeline(
            StandardScaler(),
            CalibratedClassifierCV(SGDClassifier(alpha=1e-3, random_state=0), ensemble=False, cv=3),
        )
        model.fit(x_train, y_train)
        trained = time.perf_counter() - started
        predicted = model.predict(x_test)
        details = {"alpha": 1e-3}
    elif matcher in ("knn", "prototype"):
        from matcher.index import CatalogueIndex

        index = CatalogueIndex.build(x_train, list(y_train), [str(i) for i in range(len(y_train))])
        trained = time.perf_counter() - started
        if matcher == "knn":
            scores = np.concatenate(
                [index.search(x_test[i : i + 500]).similarity for i in range(0, len(x_test), 500)]
            )
        else:
            scores = index.prototype_similarity(x_test)
        predicted = np.asarray(index.labels)[scores.argmax(axis=1)]
    elif matcher == "svm":
        from matcher.svm import grid_search, stratified_subsample

        keep = stratified_subsample(list(y_train), int(spec["svm_samples"]), 5, seed=0)
        fit = grid_search(x_train[keep], list(y_train[keep]), folds=5, calibrated=False)
        trained = time.perf_counter() - started
        predicted = fit.predict(x_test)
        details = {"samples": len(keep), **{k: str(v) for k, v in fit.best_params_.items()}}
    else:
        raise ValueError(f"unknown matcher {matcher!r}")
    return {
        "accuracy": round(float(np.mean(np.asarray(predicted) == y_test)), 4),
        "train_seconds": round(trained, 1),
        "score_seconds": round(time.perf_counter() - started - trained, 1),
        "peak_rss_mb": round(memory_mb(os.getpid())["VmHWM"], 1),
        "training_photos": len(y_train) if matcher != "svm" else details["samples"],
        **details,
    }


def _features(spec: dict[str, Any], split: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.load(spec[f"{split}_features"], mmap_mode="r")
    columns = spec.get("columns")
    if columns:
        x = x[:, columns[0] : columns[1]]
    y = np.load(spec[f"{split}_labels"])
    limit = spec.get(f"{split}_limit")
    return np.ascontiguousarray(x[:limit], np.float32), y[:limit]


def in_child(kind: str, spec: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """Run `extract_child` or `matcher_child` in a fresh process; its figures."""
    spec_file = scratch / f"spec-{os.getpid()}-{time.monotonic_ns()}.json"
    result_file = spec_file.with_suffix(".result.json")
    spec_file.write_text(json.dumps(spec))
    try:
        subprocess.run(
            [sys.executable, "-m", "bench.fashion", "--child", kind, str(spec_file)], check=True
        )
        figures: dict[str, Any] = json.loads(result_file.read_text())
        return figures
    finally:
        spec_file.unlink(missing_ok=True)
        result_file.unlink(missing_ok=True)


# --- the run ---


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.fashion", description=__doc__)
    parser.add_argument("--data", type=Path, default=DATA, help="the four gzip files (%(default)s)")
    parser.add_argument("--scratch", type=Path, default=Path("build/fashion"))
    parser.add_argument("--cache", type=Path, default=Path("cache/features"))
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=Path("models/backbones/efficientnet_lite0"),
        help="the default configuration's SavedModel (make export)",
    )
    parser.add_argument(
        "--configs", default="default,lite0-multi,lite0-grid", help=", ".join(CONFIGS)
    )
    parser.add_argument("--matchers", default=",".join(MATCHERS))
    parser.add_argument("--train-limit", type=int, help="first N training photos (all 60,000)")
    parser.add_argument("--test-limit", type=int, help="first N test photos (all 10,000)")
    parser.add_argument(
        "--svm-samples", type=int, default=10_000, help="training photos the SVM sees (10,000)"
    )
    parser.add_argument(
        "--memory-probe",
        type=int,
        default=10_000,
        help="photos of the smaller extraction whose peak memory the full one is compared "
        "with (10,000; 0: skip)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.child:
        kind, spec_path = args.child
        spec = json.loads(Path(spec_path).read_text())
        figures = extract_child(spec) if kind == "extract" else matcher_child(spec)
        Path(spec_path).with_suffix(".result.json").write_text(json.dumps(figures))
        return 0
    configs = [CONFIGS[name] for name in args.configs.split(",")]
    matchers = args.matchers.split(",")
    args.scratch.mkdir(parents=True, exist_ok=True)
    photos = args.scratch / "photos"
    splits = {}
    for split, source in (("train", "train"), ("test", "t10k")):
        images, labels = read_split(args.data, source)
        limit = args.train_limit if split == "train" else args.test_limit
        images, labels = images[:limit], labels[:limit]
        paths = write_photos(photos, split, images, labels)
        listing = args.scratch / f"{split}-{len(paths)}.txt"
        listing.write_text("\n".join(str(p) for p in paths) + "\n")
        label_file = args.scratch / f"{split}-{len(paths)}-labels.npy"
        np.save(label_file, np.asarray([KINDS[y] for y in labels]))
        splits[split] = (listing, label_file, len(paths))
    results: dict[str, Any] = {
        "published_best": PUBLISHED,
        "target": TARGET,
        "train_photos": splits["train"][2],
        "test_photos": splits["test"][2],
        "configs": {},
    }
    for config in configs:
        model_dir = (
            args.model_dir if config.name == "default" else export_config(config, args.scratch)
        )
        results["configs"][config.name] = run_config(config, model_dir, splits, matchers, args)
        _write(results, args.json)
    print_table(results)
    _write(results, args.json)
    return 0


def run_config(
    config: Config,
    model_dir: Path,
    splits: dict[str, tuple[Path, Path, int]],
    matchers: list[str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Extract both splits with one configuration, then fit and score each matcher."""
    found: dict[str, Any] = {"backbone": config.backbone, "layer": config.layer or "last"}
    features = {}
    for split, (listing, _, count) in splits.items():
        out = args.scratch / "features" / f"{config.name}-{split}-{count}.npy"
        spec = {"model_dir": str(model_dir), "paths": str(listing), "cache": str(args.cache)}
        print(f"{config.name}: extracting {count} {split} photos", flush=True)
        found[f"extract_{split}"] = in_child("extract", spec | {"out": str(out)}, args.scratch)
        features[split] = out
    probe = args.memory_probe
    if probe and probe < splits["train"][2]:
        # The same extraction on fewer photos, with a cache of its own so that it computes
        # every feature as the full one did the first time.
        short = args.scratch / f"train-probe-{probe}.txt"
        short.write_text("".join(splits["train"][0].read_text().splitlines(True)[:probe]))
        probe_cache = args.scratch / "probe-cache"
        spec = {"model_dir": str(model_dir), "paths": str(short), "cache": str(probe_cache)}
        out = args.scratch / "features" / f"{config.name}-probe.npy"
        print(f"{config.name}: extracting {probe} photos for the memory comparison", flush=True)
        small = in_child("extract", spec | {"out": str(out)}, args.scratch)
        import shutil

        shutil.rmtree(probe_cache, ignore_errors=True)
        out.unlink(missing_ok=True)
        full = found["extract_train"]
        found["memory"] = {
            "probe_photos": probe,
            "probe_peak_rss_mb": small["peak_rss_mb"],
            "full_photos": full["images"],
            "full_peak_rss_mb": full["peak_rss_mb"],
            "ratio": round(full["peak_rss_mb"] / small["peak_rss_mb"], 3),
            # What extraction itself added to the process (model loaded, list read).
            "probe_extraction_anon_mb": small["extraction_anon_mb"],
            "full_extraction_anon_mb": full["extraction_anon_mb"],
            "probe": small,
        }
    base = {
        "train_features": str(features["train"]),
        "test_features": str(features["test"]),
        "train_labels": str(splits["train"][1]),
        "test_labels": str(splits["test"][1]),
        "svm_samples": args.svm_samples,
    }
    found["matchers"] = {}
    for matcher in matchers:
        print(f"{config.name}: {matcher}", flush=True)
        found["matchers"][matcher] = in_child("matcher", base | {"matcher": matcher}, args.scratch)
        print(f"  {found['matchers'][matcher]}", flush=True)
    if "linear" in matchers:
        # A linear model on fewer photos: how much the whole training split adds.
        small = base | {"matcher": "linear", "train_limit": min(10_000, splits["train"][2])}
        found["linear_10k"] = in_child("matcher", small, args.scratch)
        start = 0
        found["layers"] = {}
        for layer, width in config.slices:
            spec = base | {"matcher": "linear", "columns": [start, start + width]}
            found["layers"][layer] = in_child("matcher", spec, args.scratch)
            print(f"  {layer} alone: {found['layers'][layer]['accuracy']}", flush=True)
            start += width
    return found


def print_table(results: dict[str, Any]) -> None:
    print(
        f"\nFashion-MNIST: {results['train_photos']} training, {results['test_photos']} test "
        "photos; test accuracy (frozen features)"
    )
    print(f"{'configuration':<34} {'matcher':<10} {'accuracy':>8} {'train s':>8} {'peak MB':>8}")
    for name, config in results["configs"].items():
        for matcher, row in config["matchers"].items():
            label = f"{name} ({config['layer']})"[:34]
            seen = f" on {row['training_photos']}" if matcher == "svm" else ""
            print(
                f"{label:<34} {matcher + seen:<10} {row['accuracy']:>8.4f} "
                f"{row['train_seconds']:>8.1f} {row['peak_rss_mb']:>8.0f}"
            )
        if "linear_10k" in config:
            row = config["linear_10k"]
            print(
                f"{name:<34} {'linear 10k':<10} {row['accuracy']:>8.4f} "
                f"{row['train_seconds']:>8.1f}"
            )
        for layer, row in config.get("layers", {}).items():
            print(f"{name + ': ' + layer + ' alone':<34} {'linear':<10} {row['accuracy']:>8.4f}")
        for split in ("train", "test"):
            row = config[f"extract_{split}"]
            print(
                f"  extraction {split}: {row['images']} photos, {row['seconds']:.0f} s "
                f"({row['images_per_s']:.0f}/s, {row['engine']}), "
                f"peak RSS {row['peak_rss_mb']:.0f} MB"
            )
        if "memory" in config:
            memory = config["memory"]
            print(
                f"  extraction peak RSS {memory['probe_photos']} -> {memory['full_photos']} "
                "photos: "
                f"{memory['probe_peak_rss_mb']:.0f} -> {memory['full_peak_rss_mb']:.0f} MB "
                f"(x{memory['ratio']:.3f}); added by extraction "
                f"{memory['probe_extraction_anon_mb']:.0f} -> "
                f"{memory['full_extraction_anon_mb']:.0f} MB"
            )
    print("published scikit-learn benchmark, raw pixels (best rows):")
    for name, accuracy in PUBLISHED.items():
        print(f"  {name:<32} {accuracy:.3f}")
    best = max(
        (row["accuracy"], name, matcher)
        for name, config in results["configs"].items()
        for matcher, row in config["matchers"].items()
    )
    verdict = "meets" if best[0] >= TARGET else "misses"
    print(f"best: {best[1]} {best[2]} {best[0]:.4f} ({verdict} the {TARGET} target)")


def _write(results: dict[str, Any], path: Path | None) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
