"""SVM search time, peak memory and hold-out accuracy against the catalogue's size.

Each size N is a catalogue of N feature vectors split 80/20 as `python -m train` splits it:
the search (matcher/svm.py) sees the 80 %, the accuracy is measured on the 20 % it never saw.
Features are synthetic but shaped like the real ones (`--dim` non-negative ReLU-like values,
`--labels` labels drawn around label centres with overlap, so the SVM has real work to do), or
the real ones of a training run (`--features run/features.npz`). Each size runs in a fresh
process; peak RSS is the largest sum over that process and its worker processes, sampled every
0.2 s, and CPU time is theirs too (user + system).

    .venv/bin/python -m bench.training [--sizes 1000,5000,20000] [--strategy auto] [--json out.json]

`--strategy original` runs the first version's search for comparison: every candidate a
calibrated SVC inside every fold, on every sample, with `--folds` folds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

STRATEGIES = ("auto", "full", "original")


#: Weight of the label centre against the noise. 0.12 overlaps the labels so that an SVM
#: trained on 800 samples of 12 labels scores about 0.84 on held-out ones (0.5, the first
#: version's, scored 1.000: too easy to tell searches apart, and fewer support vectors than
#: real features give, so too quick).
SEPARATION = 0.12


def synthetic(samples: int, dim: int, labels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative features around one centre per label, with overlap between labels."""
    rng = np.random.default_rng(seed)
    centres = rng.gamma(0.5, 1.0, size=(labels, dim)).astype(np.float32)
    y = rng.integers(0, labels, samples)
    noise = rng.gamma(0.5, 1.0, size=(samples, dim)).astype(np.float32)
    return SEPARATION * centres[y] + noise, np.asarray([f"item_{i:02d}" for i in y])


def real(path: Path, samples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`samples` stratified vectors of a training run's features.npz (all of them if fewer)."""
    from sklearn.model_selection import train_test_split

    data = np.load(path)
    x, y = data["features"].astype(np.float32), data["labels"]
    if samples >= len(y):
        return x, y
    keep, _ = train_test_split(np.arange(len(y)), train_size=samples, stratify=y, random_state=seed)
    return x[keep], y[keep]


class PeakRss:
    """The largest RSS of this process plus its descendants (joblib's workers), sampled, and
    their CPU time: on a shared machine CPU seconds say more about the work than wall time."""

    def __init__(self, every_s: float = 0.2) -> None:
        self.peak_kb = 0
        self.cpu_s = 0.0
        self._before = sum(_cpu_s(os.getpid()).values())  # data generation, imports
        self._cpu: dict[int, float] = {}
        self._every = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.cpu_s = sum(self._cpu.values()) - self._before

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = _tree(os.getpid())
            self.peak_kb = max(self.peak_kb, sum(_rss_kb(pid) for pid in pids))
            for pid in pids:  # the last reading of each process (workers outlive the fit)
                self._cpu.update(_cpu_s(pid))
            self._stop.wait(self._every)


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(OSError):  # the task ended since the listing
                todo += [int(child) for child in task.read_text().split()]
    return pids


def _cpu_s(pid: int) -> dict[int, float]:
    """{pid: its user + system CPU seconds so far}, or {} if it has ended."""
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return {pid: (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")}
    return {}


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass  # the worker ended between the listing and the read
    return 0


def _original(x: np.ndarray, y: list[str], folds: int, jobs: int, seed: int):
    """The first version's search: a calibrated SVC per candidate and fold, refit on all."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.svm import SVC

    from matcher.svm import calibration_folds, cv_folds, param_grid

    folds = cv_folds(y, folds)
    estimator = CalibratedClassifierCV(SVC(), ensemble=False, cv=calibration_folds(y, folds))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    # The grid reaches the SVC inside the calibration through scikit-learn's nested names.
    grid = [{f"estimator__{k}": v for k, v in part.items()} for part in param_grid()]
    return GridSearchCV(estimator, grid, cv=cv, n_jobs=jobs).fit(x, y)


def one_size(samples: int, args: argparse.Namespace) -> dict[str, object]:
    """Run in a child process: one search, its time, peak RSS and hold-out accuracy."""
    from sklearn.model_selection import train_test_split

    from matcher.svm import grid_search

    if args.features:
        x, y = real(args.features, samples)
    else:
        x, y = synthetic(samples, args.dim, args.labels)
    train, test = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=0)
    y_train = list(y[train])
    with PeakRss() as rss:
        started = time.perf_counter()
        if args.strategy == "original":
            search = _original(x[train], y_train, args.folds, args.jobs, seed=0)
            plan = {"strategy": "original", "folds": int(search.n_splits_)}
            plan["search_samples"] = len(train)
        else:
            search = grid_search(x[train], y_train, args.folds, args.jobs, strategy=args.strategy)
            plan = search.plan.as_dict()
        seconds = time.perf_counter() - started
    accuracy = float(np.mean(search.predict(x[test]) == y[test]))
    return {
        "samples": len(y),
        "train": len(train),
        **{k: plan[k] for k in ("strategy", "folds", "search_samples")},
        "seconds": round(seconds, 1),
        "cpu_seconds": round(rss.cpu_s, 1),
        "peak_rss_mb": round(rss.peak_kb / 1024),
        "holdout_accuracy": round(accuracy, 4),
        "best_params": dict(search.best_params_),
        "best_cv_accuracy": round(float(search.best_score_), 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.training", description=__doc__)
    parser.add_argument("--sizes", default="1000,5000,20000", help="catalogue sizes N")
    parser.add_argument("--strategy", choices=STRATEGIES, default="auto")
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--labels", type=int, default=12, help="synthetic labels (12)")
    parser.add_argument("--features", type=Path, help="a training run's features.npz instead")
    parser.add_argument("--folds", type=int, default=10, help="as python -m train --folds")
    parser.add_argument("--jobs", type=int, default=-1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one_size(args.one, args), default=_plain))
        return 0
    rows = []
    print(
        f"{'N':>7} {'train':>6} {'strategy':>15} {'folds':>5} {'searched':>8} "
        f"{'time':>9} {'CPU time':>9} {'peak RSS':>9} {'hold-out':>8}"
    )
    for size in (int(s) for s in args.sizes.split(",")):
        command = [sys.executable, "-m", "bench.training", "--one", str(size), *_passed(args)]
        child = subprocess.run(command, capture_output=True, text=True)
        if child.returncode != 0:
            print(child.stderr, file=sys.stderr)
            return 1
        row = json.loads(child.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{row['samples']:>7} {row['train']:>6} {row['strategy']:>15} {row['folds']:>5} "
            f"{row['search_samples']:>8} {row['seconds']:>7.1f} s {row['cpu_seconds']:>7.1f} s "
            f"{row['peak_rss_mb']:>6} MB "
            f"{row['holdout_accuracy']:>8.3f}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def _passed(args: argparse.Namespace) -> list[str]:
    passed = ["--strategy", args.strategy, "--dim", str(args.dim), "--labels", str(args.labels)]
    passed += ["--folds", str(args.folds), "--jobs", str(args.jobs)]
    return passed + (["--features", str(args.features)] if args.features else [])


def _plain(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


if __name__ == "__main__":
    sys.exit(main())
