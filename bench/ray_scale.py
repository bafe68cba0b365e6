"""Feature extraction on Ray against the in-process pipeline, and as nodes are added.

Each row runs in a fresh process over the same distinct JPEG files (no cache, so every photo
reaches the model), timing the whole call including the model load (an actor loads its model
when the dataset starts, the local pipeline before it):

* `local`: `matcher.extraction.extract_features`, the engine on every core;
* `ray, 1 node`: `train --ray auto` on this machine: a local Ray instance with every core,
  one model actor;
* `simulated, N node(s)`: `ray.cluster_utils.Cluster` with N nodes of CORES/2 CPUs each on this
  machine, one actor per node whose engine runs CORES/2 threads. The nodes share this
  machine's cores, so the 2-node row shows the work spreading, not a real second machine's
  speed: with 2 cores, 2 nodes can at best equal 1 node of 2 CPUs.

    .venv/bin/python -m bench.ray_scale [--photos 3000] [--model-dir ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.extract_scale import make_photos

OBJECT_STORE = 200 * 2**20


def run_mode(mode: str, model_dir: Path, paths: list[Path], nodes: int) -> dict[str, Any]:
    """In this process: extract `paths` one way; seconds and images/s."""
    from matcher.extraction import extract_features
    from matcher.settings import BackendSettings

    settings = BackendSettings(backend="embedded", model_dir=model_dir)
    cores = os.cpu_count() or 1
    started = time.perf_counter()
    if mode == "local":
        from matcher.factory import make_backend

        backend = make_backend(settings)
        backend.load()
        loaded = time.perf_counter()
        found = extract_features(paths, backend, None, progress=False)
        end = time.perf_counter()
        return _figures(len(found.kept), started, end, loaded, None)
    import ray

    from matcher.factory import make_backend
    from matcher.ray_extraction import RayOptions, extract_features_ray

    info_backend = make_backend(settings)
    info_backend.load()  # the driver's own backend: the cache key and feature size
    info = info_backend.info
    cluster = None
    if mode == "ray":
        ray.init(num_cpus=cores, object_store_memory=OBJECT_STORE, include_dashboard=False)
    else:
        from ray.cluster_utils import Cluster

        per_node = max(1, cores // 2)
        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": per_node, "object_store_memory": OBJECT_STORE},
        )
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=per_node, object_store_memory=OBJECT_STORE)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
    try:
        began = time.perf_counter()
        found = extract_features_ray(
            paths, settings, info.cache_key, info.feature_dim, None, RayOptions(), progress=False
        )
        end = time.perf_counter()
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
    return _figures(len(found.kept), began, end, None, found.nodes)


def _figures(
    images: int, started: float, end: float, loaded: float | None, nodes: dict[str, int] | None
) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "images": images,
        "seconds": round(end - started, 2),
        "images_per_s": round(images / (end - started), 1),
    }
    if loaded is not None:
        figures["images_per_s_after_load"] = round(images / (end - loaded), 1)
    if nodes is not None:
        figures["photos_per_node"] = sorted(nodes.values(), reverse=True)
    return figures


def in_child(mode: str, model_dir: Path, scratch: Path, photos: int, nodes: int) -> dict[str, Any]:
    result = scratch / f"result-{mode}-{nodes}.json"
    result.unlink(missing_ok=True)
    subprocess.run(
        [
            sys.executable, "-m", "bench.ray_scale", "--model-dir", str(model_dir),
            "--scratch", str(scratch), "--photos", str(photos),
            "--child", mode, str(nodes), str(result),
        ],
        check=True,
    )  # fmt: skip
    figures: dict[str, Any] = json.loads(result.read_text())
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ray_scale", description=__doc__)
    parser.add_argument(
        "--model-dir", type=Path, default=Path("models/backbones/efficientnet_lite0")
    )
    parser.add_argument("--photos", type=int, default=3000)
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/ray-scale"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    photo_dir = args.scratch / "photos"
    if args.child:
        mode, nodes, result = args.child
        paths = sorted(photo_dir.glob("*/*.jpg"))[: args.photos]
        figures = run_mode(mode, args.model_dir, paths, int(nodes))
        Path(result).write_text(json.dumps(figures))
        return 0
    print(f"generating {args.photos} photos under {photo_dir} (kept for the next run)")
    make_photos(photo_dir, args.photos)
    rows = {
        "local": in_child("local", args.model_dir, args.scratch, args.photos, 1),
        "ray, 1 node": in_child("ray", args.model_dir, args.scratch, args.photos, 1),
        "simulated, 1 node": in_child("cluster", args.model_dir, args.scratch, args.photos, 1),
        "simulated, 2 nodes": in_child("cluster", args.model_dir, args.scratch, args.photos, 2),
    }
    local = rows["local"]["images_per_s"]
    one = rows["simulated, 1 node"]["images_per_s"]
    summary = {
        "cores": os.cpu_count(),
        "photos": args.photos,
        "rows": rows,
        "ray_one_node_vs_local": round(rows["ray, 1 node"]["images_per_s"] / local, 3),
        "simulated_two_vs_one_node": round(rows["simulated, 2 nodes"]["images_per_s"] / one, 3),
    }
    print(f"{'':<20} {'img/s':>7} {'seconds':>8}  photos per node")
    for name, row in rows.items():
        print(
            f"{name:<20} {row['images_per_s']:>7.1f} {row['seconds']:>8.1f}  "
            f"{row.get('photos_per_node', '')}"
        )
    print(
        f"one-node Ray / local: {summary['ray_one_node_vs_local']:.2f}; simulated 2 nodes / 1 "
        f"node: {summary['simulated_two_vs_one_node']:.2f} (the nodes share {os.cpu_count()} "
        "cores)"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
