"""Grid-search time and peak memory against the number of training samples.

Features are synthetic but shaped like the real ones: `--dim` non-negative values per image
(ReLU-like), 12 labels drawn around label centres, so the SVM has real work to do. Each size
runs the project's own grid search (train/svm.py: linear and RBF candidates, calibrated SVC) in
a fresh process, so the peak RSS reported is that run's alone.

    .venv/bin/python -m bench.training --sizes 1000,5000,20000 --folds 10 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def synthetic(samples: int, dim: int, labels: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Non-negative features around one centre per label, with overlap between labels."""
    rng = np.random.default_rng(seed)
    centres = rng.gamma(0.5, 1.0, size=(labels, dim)).astype(np.float32)
    y = rng.integers(0, labels, samples)
    noise = rng.gamma(0.5, 1.0, size=(samples, dim)).astype(np.float32)
    return 0.5 * centres[y] + noise, [f"item_{i:02d}" for i in y]


def one_size(samples: int, dim: int, folds: int, jobs: int) -> dict[str, float]:
    """Run in a child process: one grid search, its time and the process's peak RSS."""
    from train.svm import grid_search

    x, y = synthetic(samples, dim, labels=12)
    started = time.perf_counter()
    search = grid_search(x, y, folds=folds, jobs=jobs)
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "samples": samples,
        "seconds": round(seconds, 1),
        "best_cv_accuracy": round(float(search.best_score_), 3),
        "peak_rss_mb": round(max(peak_mb, children_mb), 0),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.training", description=__doc__)
    parser.add_argument("--sizes", default="1000,5000,20000")
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=-1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one_size(args.one, args.dim, args.folds, args.jobs)))
        return 0
    rows = []
    print(f"{'samples':>8} {'grid search':>12} {'peak RSS':>9} {'CV acc':>7}")
    for size in (int(s) for s in args.sizes.split(",")):
        child = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.training",
                "--one",
                str(size),
                "--dim",
                str(args.dim),
                "--folds",
                str(args.folds),
                "--jobs",
                str(args.jobs),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        row = json.loads(child.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{row['samples']:>8} {row['seconds']:>10.1f} s {row['peak_rss_mb']:>6.0f} MB "
            f"{row['best_cv_accuracy']:>7.3f}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
