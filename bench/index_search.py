"""Nearest-reference search against the catalogue's size: exact (numpy) and faiss's inverted file.

For each size N: N reference views in 1280 dimensions (clustered around 10 x sqrt(N)/10 label
centres with overlap, so that nearest neighbours are not trivially found), 200 queries near
held-out points. Prints, per size, the time per query of exact search (one query, and a batch
of 100 per call) and of `IndexIVFFlat` at `matcher.index.IVF_PROBES`, the time to learn the
clusters (at training) and to fill faiss's lists (at every load), and the inverted file's
recall: the share of queries whose nearest view, and whose best label, it finds as exact search
does. `matcher.index.FAISS_MIN_VIEWS` is where the project switches.

    .venv/bin/python -m bench.index_search [--sizes 60000,200000,500000] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

DIM = 1280
QUERIES = 200


def catalogue(size: int, seed: int = 0) -> tuple[np.ndarray, list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = max(10, int(np.sqrt(size)))
    centres = rng.gamma(0.5, 1.0, (labels, DIM)).astype(np.float32)
    y = rng.integers(0, labels, size + QUERIES)
    x = 0.35 * centres[y] + rng.gamma(0.5, 1.0, (size + QUERIES, DIM)).astype(np.float32)
    names = [f"item{i:05d}" for i in y[:size]]
    return x[:size], names, x[size:]


def timed(call: Any, repeat: int = 1) -> tuple[Any, float]:
    started = time.perf_counter()
    for _ in range(repeat):
        result = call()
    return result, (time.perf_counter() - started) / repeat


def measure(size: int) -> dict[str, Any]:
    from matcher import index as index_module
    from matcher.index import CatalogueIndex

    x, names, queries = catalogue(size)
    index = CatalogueIndex.build(x, names, [str(i) for i in range(size)])
    del x
    saved = index_module.FAISS_MIN_VIEWS
    try:
        index_module.FAISS_MIN_VIEWS = 10**12  # exact
        exact, batch_s = timed(lambda: index.search(queries[:100]))
        _, one_s = timed(lambda: index.search(queries[:1]), repeat=5)
        exact = index.search(queries)
        index_module.FAISS_MIN_VIEWS = 1  # through faiss
        _, cluster_s = timed(index.clusters)
        index._faiss = None
        _, fill_s = timed(lambda: index.search(queries[:1]))
        approx = index.search(queries)
        _, ivf_one_s = timed(lambda: index.search(queries[:1]), repeat=20)
        _, ivf_batch_s = timed(lambda: index.search(queries[:100]))
    finally:
        index_module.FAISS_MIN_VIEWS = saved
    exact_row = np.take_along_axis(exact.row, exact.similarity.argmax(1)[:, None], 1)[:, 0]
    approx_row = np.take_along_axis(approx.row, approx.similarity.argmax(1)[:, None], 1)[:, 0]
    return {
        "views": size,
        "labels": len(index.labels),
        "clusters": len(index.clusters()[0]),
        "probes": index_module.IVF_PROBES,
        "exact_ms_per_query": round(1000 * one_s, 2),
        "exact_ms_per_query_batch100": round(10 * batch_s, 2),
        "ivf_ms_per_query": round(1000 * ivf_one_s, 2),
        "ivf_ms_per_query_batch100": round(10 * ivf_batch_s, 2),
        "learn_clusters_s": round(cluster_s, 1),
        "fill_lists_at_load_s": round(fill_s, 1),
        "recall_nearest_view": round(float(np.mean(exact_row == approx_row)), 3),
        "same_best_label": round(
            float(np.mean(exact.similarity.argmax(1) == approx.similarity.argmax(1))), 3
        ),
        "vectors_mb": round(index.vectors.nbytes / 2**20),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.index_search", description=__doc__)
    parser.add_argument("--sizes", default="60000,200000,500000")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rows = []
    print(
        f"{'views':>8} {'exact ms':>9} {'(batch)':>8} {'ivf ms':>7} {'(batch)':>8} "
        f"{'learn s':>8} {'load s':>7} {'recall':>7} {'label':>6}"
    )
    for size in (int(s) for s in args.sizes.split(",")):
        row = measure(size)
        rows.append(row)
        print(
            f"{row['views']:>8} {row['exact_ms_per_query']:>9.2f} "
            f"{row['exact_ms_per_query_batch100']:>8.2f} {row['ivf_ms_per_query']:>7.2f} "
            f"{row['ivf_ms_per_query_batch100']:>8.2f} {row['learn_clusters_s']:>8.1f} "
            f"{row['fill_lists_at_load_s']:>7.1f} {row['recall_nearest_view']:>7.3f} "
            f"{row['same_best_label']:>6.3f}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=2)
            out.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
