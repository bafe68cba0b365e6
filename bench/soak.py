"""Soak: the matcher under steady load for a long time; errors and resident memory over time.

Starts `python -m service` as its own process (embedded backend, production defaults; metrics
on a free port), drives bench/load.py's load at a fixed concurrency for --duration-s, and every
--sample-s reads the server's resident memory (VmRSS in /proc) and the requests and errors so
far. After the warm-up (TensorFlow's thread pools, caches and the allocator settle), resident
memory must not grow by more than 5 %: the last sample and the largest one, each against the
first sample after warm-up.

    .venv/bin/python -m bench.soak --model-dir models/backbones/efficientnet_lite0 \
        --classifier models/classifiers/efficientnet_lite0/classifier.skops \
        --image deploy/ghz/chelsea.jpg [--duration-s 1200] [--concurrency 8] [--sample-s 10] \
        [--warmup-s 60] [--json out.json]

Each sample period is one bench/load.py run of --sample-s on a fresh channel that lets its last
requests finish, so no request is cut off between periods; the run is ceil(duration / sample)
periods, so a slow machine takes every sample asked for (and runs a little longer). Ctrl-C
ends the run early with a verdict on what was measured. Exit status: 0 when no request failed
and memory stayed within the limit; 1 otherwise, or when the server could not start or died;
2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NoReturn

from bench.load import LoadConfig, run_load
from bench.startup import DEFAULT_CLASSIFIER, DEFAULT_MODEL_DIR, matcher_process, memory_mb

#: Resident memory may grow this much after the warm-up, percent.
GROWTH_LIMIT_PCT = 5.0
DEFAULT_IMAGE = Path("deploy/ghz/chelsea.jpg")


@dataclass(frozen=True)
class Sample:
    """The server at one moment: seconds into the load, requests and errors so far, RSS."""

    t_s: float
    requests: int
    errors: int
    rss_mb: float


@dataclass(frozen=True)
class Verdict:
    """Resident memory after the warm-up against the first sample after it."""

    baseline_mb: float
    last_mb: float
    max_mb: float
    last_growth_pct: float
    max_growth_pct: float
    limit_pct: float

    @property
    def within(self) -> bool:
        return max(self.last_growth_pct, self.max_growth_pct) <= self.limit_pct


def verdict(
    samples: Sequence[Sample], warmup_s: float, limit_pct: float = GROWTH_LIMIT_PCT
) -> Verdict | None:
    """Growth of the samples taken at or after `warmup_s`; None with fewer than two of them."""
    settled = [s for s in samples if s.t_s >= warmup_s]
    if len(settled) < 2:
        return None
    baseline = settled[0].rss_mb
    largest = max(s.rss_mb for s in settled)

    def growth(mb: float) -> float:
        return 100.0 * (mb - baseline) / baseline

    return Verdict(
        baseline_mb=baseline,
        last_mb=settled[-1].rss_mb,
        max_mb=largest,
        last_growth_pct=growth(settled[-1].rss_mb),
        max_growth_pct=growth(largest),
        limit_pct=limit_pct,
    )


@dataclass(frozen=True)
class SoakConfig:
    """How long, how hard and how often to look."""

    duration_s: float = 1200.0
    concurrency: int = 8
    sample_s: float = 10.0
    warmup_s: float = 60.0
    timeout_s: float = 20.0


class ServerDiedError(Exception):
    """The matcher process exited during the soak."""


async def soak(
    process: subprocess.Popen[bytes],
    target: str,
    images: tuple[bytes, ...],
    config: SoakConfig,
    on_sample: Callable[[Sample], None],
    stop: asyncio.Event | None = None,
) -> tuple[list[Sample], Counter[str]]:
    """Load `target` for the configured time; samples (the first before any load) and the
    count of each error message."""
    samples = [Sample(0.0, 0, 0, _rss_mb(process))]
    on_sample(samples[0])
    errors: Counter[str] = Counter()
    requests = 0
    started = time.monotonic()
    # A fixed number of periods, not "until the clock says": each period lets its last
    # requests finish, so on a slow machine periods run long, and a clock-driven loop would
    # take fewer samples than asked for.
    periods = math.ceil(config.duration_s / config.sample_s - 1e-9)
    for period in range(periods):
        if stop is not None and stop.is_set():
            break
        load = LoadConfig(
            target=target,
            images=images,
            concurrency=config.concurrency,
            duration=min(config.sample_s, config.duration_s - period * config.sample_s),
            duration_stop="wait",
            timeout=config.timeout_s,
            insecure=True,
        )
        report = await run_load(load, stop=stop)
        if stop is not None and stop.is_set():
            break  # a cut-off period (and Ctrl-C reaches the server too): no sample
        requests += report.count
        errors.update(error for error in report.errors if error)
        sample = Sample(
            round(time.monotonic() - started, 1), requests, errors.total(), _rss_mb(process)
        )
        samples.append(sample)
        on_sample(sample)
    return samples, errors


def _rss_mb(process: subprocess.Popen[bytes]) -> float:
    if process.poll() is None:
        rss = memory_mb(process.pid)["VmRSS"]
        if not math.isnan(rss):
            return rss
    raise ServerDiedError(f"the matcher process exited (status {process.poll()})")


class _Table:
    """Prints each sample as it arrives: the table is the progress display."""

    def __init__(self, duration_s: float) -> None:
        self._duration_s = duration_s
        self._previous: Sample | None = None

    def header(self) -> None:
        print(f"{'time':>8} {'done':>5} {'requests':>9} {'errors':>7} {'req/s':>7} {'RSS MB':>8}")

    def __call__(self, sample: Sample) -> None:
        previous = self._previous
        rate = (
            (sample.requests - previous.requests) / (sample.t_s - previous.t_s)
            if previous is not None and sample.t_s > previous.t_s
            else 0.0
        )
        done = min(100.0, 100.0 * sample.t_s / self._duration_s)
        print(
            f"{sample.t_s:>6.0f} s {done:>4.0f}% {sample.requests:>9} {sample.errors:>7} "
            f"{rate:>7.1f} {sample.rss_mb:>8.1f}",
            flush=True,
        )
        self._previous = sample


def summary_lines(
    samples: Sequence[Sample], errors: Counter[str], found: Verdict | None, warmup_s: float
) -> list[str]:
    """The verdict in words: errors, then memory growth after the warm-up against the limit."""
    last = samples[-1]
    lines = [f"requests: {last.requests}, errors: {last.errors}"]
    lines += [f"  [{n}] {message}" for message, n in errors.most_common(5)]
    if found is None:
        lines.append(
            f"memory: fewer than two samples after the {warmup_s:.0f} s warm-up; no verdict"
        )
        return lines
    lines.append(
        f"RSS after the {warmup_s:.0f} s warm-up: {found.baseline_mb:.1f} MB -> last "
        f"{found.last_mb:.1f} MB ({found.last_growth_pct:+.2f} %), max {found.max_mb:.1f} MB "
        f"({found.max_growth_pct:+.2f} %); limit +{found.limit_pct:.0f} %: "
        + ("within" if found.within else "EXCEEDED")
    )
    return lines


def passed(samples: Sequence[Sample], found: Verdict | None) -> bool:
    return samples[-1].errors == 0 and found is not None and found.within


def to_json(
    config: SoakConfig,
    samples: Sequence[Sample],
    errors: Counter[str],
    found: Verdict | None,
    interrupted: bool,
) -> dict:
    return {
        "config": asdict(config),
        "interrupted": interrupted,
        "samples": [asdict(s) for s in samples],
        "requests": samples[-1].requests,
        "errors": samples[-1].errors,
        "error_distribution": dict(errors.most_common()),
        "memory": None if found is None else {**asdict(found), "within": found.within},
        "passed": passed(samples, found),
    }


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)  # one line, not argparse's usage block


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _Parser(
        prog="python -m bench.soak",
        description="Soak the matcher: errors and resident memory under load over time.",
    )
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument(
        "--classifier",
        type=Path,
        default=DEFAULT_CLASSIFIER,
    )
    parser.add_argument(
        "--image",
        type=Path,
        action="append",
        help="encoded photo; repeat to cycle through several (deploy/ghz/chelsea.jpg)",
    )
    parser.add_argument("--duration-s", type=float, default=1200.0, help="(1200)")
    parser.add_argument("--concurrency", type=int, default=8, help="(8)")
    parser.add_argument("--sample-s", type=float, default=10.0, help="(10)")
    parser.add_argument("--warmup-s", type=float, default=60.0, help="(60)")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    args.image = args.image or [DEFAULT_IMAGE]
    if args.concurrency < 1 or args.sample_s <= 0 or args.warmup_s < 0:
        parser.error("concurrency must be >= 1, sample-s > 0 and warmup-s >= 0")
    for path in (args.classifier, args.model_dir):
        if not path.exists():
            parser.error(f"{path} does not exist")
    if args.duration_s < args.warmup_s + args.sample_s:
        parser.error(
            "duration-s must be at least warmup-s + sample-s, so that memory is sampled "
            "at least twice after the warm-up"
        )
    return args


def _read_images(paths: Sequence[Path]) -> tuple[bytes, ...]:
    try:
        return tuple(path.read_bytes() for path in paths)
    except OSError as exc:
        raise _UsageError(f"cannot read image {exc.filename}: {exc.strerror}") from None


async def _soak_interruptible(
    process: subprocess.Popen[bytes], target: str, images: tuple[bytes, ...], config: SoakConfig
) -> tuple[list[Sample], Counter[str], bool]:
    stop = asyncio.Event()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)
    table = _Table(config.duration_s)
    table.header()
    samples, errors = await soak(process, target, images, config, table, stop)
    return samples, errors, stop.is_set()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parse_args(argv)
        images = _read_images(args.image)
    except _UsageError as exc:
        print(f"python -m bench.soak: error: {exc}", file=sys.stderr)
        return 2
    config = SoakConfig(args.duration_s, args.concurrency, args.sample_s, args.warmup_s)
    flags = ["--model-dir", str(args.model_dir), "--classifier", str(args.classifier)]
    print(f"starting the matcher ({args.model_dir}); soak {config.duration_s:.0f} s", flush=True)
    try:
        with matcher_process(flags) as (process, target, to_serving):
            print(f"SERVING after {to_serving:.1f} s; load at concurrency {config.concurrency}")
            samples, errors, interrupted = asyncio.run(
                _soak_interruptible(process, target, images, config)
            )
    except (TimeoutError, RuntimeError, ServerDiedError) as exc:
        print(f"python -m bench.soak: {exc}", file=sys.stderr)
        return 1
    found = verdict(samples, config.warmup_s)
    if interrupted:
        print(f"interrupted at {samples[-1].t_s:.0f} s")
    print("\n".join(summary_lines(samples, errors, found, config.warmup_s)))
    if args.json:
        report = to_json(config, samples, errors, found, interrupted)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if passed(samples, found) else 1


if __name__ == "__main__":
    raise SystemExit(main())
