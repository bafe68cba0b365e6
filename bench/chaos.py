"""Chaos: steady load on a real matcher while its world is broken on purpose; nothing may be lost.

Starts the TF Serving test double (tests/tfserving_double.py, the real SavedModel behind TF
Serving's API) and `python -m service --backend tfserving` in front of it, watching a
classifier run folder with hot reload, then keeps `--concurrency` clients sending Match (good
photos, and hostile bytes: not an image, a truncated JPEG, a PNG declaring 100000 x 100000
pixels, an empty message) while, in turn, it:

1. stops TF Serving and starts it again on the same port (`--outage-s` down);
2. retrains into the served folder (`python -m train ... --out` the folder the server watches);
3. starts a training and kills it with SIGKILL half-way (after its first progress line);
4. sends the matcher SIGHUP (a reload poll at once).

Every answer is sorted: OK for a good photo; INVALID_ARGUMENT for a hostile one; UNAVAILABLE
(TF Serving down: the documented answer), RESOURCE_EXHAUSTED (overload) for either. After each
step the load runs alone for `--calm-s`. Anything
else, an answer that does not fit the request (a hostile image matched, a good one refused as
invalid) or no answer within the deadline, is **lost**. The matcher's resident memory is
sampled after every step; from the third round of steps on, each step's sample must stay within
10 % of the same step's in that round.

    .venv/bin/python -m bench.chaos [--duration-s 600] [--concurrency 4] [--json out.json]

Exit status 0 when nothing was lost and memory stayed flat; 1 otherwise. Not in CI (minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from PIL import Image

from bench.startup import free_port, matcher_process, memory_mb, wait_for_double
from matcher.v1 import matcher_pb2, matcher_pb2_grpc

#: What each kind of request may be answered with, besides its own expected code.
ALWAYS_ALLOWED = {"UNAVAILABLE", "RESOURCE_EXHAUSTED"}
EXPECTED = {"good": {"OK"} | ALWAYS_ALLOWED, "hostile": {"INVALID_ARGUMENT"} | ALWAYS_ALLOWED}
GROWTH_LIMIT_PCT = 10.0
#: Rounds of every step before memory is compared: TensorFlow's pools, the first reloads and
#: reconnections settle (measured: round 3 on is flat).
WARMUP_ROUNDS = 2


def hostile_images() -> list[bytes]:
    """Bytes the server must refuse with INVALID_ARGUMENT, and keep serving."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 30, 200)).save(buffer, "JPEG")
    jpeg = buffer.getvalue()
    png = io.BytesIO()
    Image.new("RGB", (32, 32)).save(png, "PNG")
    huge = bytearray(png.getvalue())
    huge[16:24] = (100_000).to_bytes(4, "big") * 2  # IHDR width and height (CRC now wrong)
    return [b"not an image at all", jpeg[: len(jpeg) // 2], bytes(huge), b""]


@dataclass
class Tally:
    """Answers by request kind and status; lost requests with why."""

    sent: int = 0
    answers: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)

    def record(self, kind: str, code: str) -> None:
        self.answers[f"{kind} {code}"] += 1
        if code not in EXPECTED[kind]:
            self.lost.append(f"{kind} answered {code}")


async def client(target: str, good: list[bytes], bad: list[bytes], tally: Tally, stop) -> None:
    """Send requests until `stop`: four good photos to each hostile one."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = matcher_pb2_grpc.MatcherStub(channel)
        n = 0
        while not stop.is_set():
            n += 1
            kind = "hostile" if n % 5 == 0 else "good"
            image = bad[n % len(bad)] if kind == "hostile" else good[n % len(good)]
            tally.sent += 1
            try:
                await stub.Match(matcher_pb2.ImageRequest(image=image, top_k=1), timeout=60)
                tally.record(kind, "OK")
            except grpc.aio.AioRpcError as exc:
                tally.record(kind, exc.code().name)
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    await asyncio.sleep(0.2)  # as a client backs off, rather than spin


class Double:
    """The TF Serving test double in its own process, stopped and started on one port."""

    def __init__(self, base: Path) -> None:
        self.base, self.port = base, free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"localhost:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.tfserving_double", "--model-base-path",
             str(self.base), "--port", str(self.port)],
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for_double(self.target)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(60)
            self.process = None


def train_command(data: Path, out: Path, model_dir: Path, cache: Path) -> list[str]:
    return [
        sys.executable, "-m", "train", str(data), "--out", str(out), "--model-dir",
        str(model_dir), "--cache-dir", str(cache), "--matcher", "knn", "--no-report",
        "--no-turned-views",
    ]  # fmt: skip


def kill_half_way(command: list[str]) -> None:
    """Start a training and SIGKILL it once it is extracting (its first progress output)."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert process.stderr is not None
    seen = b""
    # The progress bar redraws with carriage returns: read what comes, not lines.
    while b"%|" not in seen and process.poll() is None:
        seen = seen[-4096:] + os.read(process.stderr.fileno(), 4096)
    process.kill()
    process.wait(60)


def small_catalogue(source: Path, out: Path, items: int, photos: int) -> Path:
    for label in sorted(p for p in source.iterdir() if p.is_dir())[:items]:
        (out / label.name).mkdir(parents=True)
        for photo in sorted(label.iterdir())[:photos]:
            shutil.copy(photo, out / label.name / photo.name)
    return out


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="chaos-") as folder:
        yield Path(folder)


async def run(args: argparse.Namespace) -> Tally:
    tally = Tally()
    good = [p.read_bytes() for p in sorted(args.queries.glob("*/*"))[:: args.query_stride]][:24]
    bad = hostile_images()
    with workspace() as work:
        data = small_catalogue(args.data, work / "data", items=4, photos=6)
        out, cache = work / "classifier", work / "cache"
        command = train_command(data, out, args.model_base_path / args.model_name, cache)
        subprocess.run([*command, "--no-progress"], check=True, capture_output=True)
        double = Double(args.model_base_path)
        double.start()
        flags = [
            "--backend", "tfserving", "--tfserving-target", double.target, "--model-name",
            args.model_name, "--classifier", str(out), "--reload-interval-s", "1",
            "--tfserving-timeout-s", "10",
        ]  # fmt: skip
        try:
            with matcher_process(flags) as (matcher, target, _):
                stop = asyncio.Event()
                clients = [
                    asyncio.create_task(client(target, good, bad, tally, stop))
                    for _ in range(args.concurrency)
                ]
                steps = [
                    ("TF Serving stopped and started", lambda: outage(double, args.outage_s)),
                    ("retrained into the served folder", lambda: subprocess.run(
                        [*command, "--no-progress"], check=True, capture_output=True)),
                    ("a training killed half-way", lambda: kill_half_way(command)),
                    ("SIGHUP", lambda: os.kill(matcher.pid, signal.SIGHUP)),
                ]  # fmt: skip
                end = time.monotonic() + args.duration_s
                i = 0
                while time.monotonic() < end:
                    name, step = steps[i % len(steps)]
                    await asyncio.to_thread(step)
                    tally.steps.append(name)
                    await asyncio.sleep(args.calm_s)  # steady load between the blows
                    tally.rss_mb.append(round(memory_mb(matcher.pid)["VmRSS"], 1))
                    print(
                        f"{time.monotonic() - end + args.duration_s:6.0f} s  {name:<34} "
                        f"sent {tally.sent:>6}  lost {len(tally.lost):>3}  "
                        f"matcher {tally.rss_mb[-1]:.0f} MB",
                        flush=True,
                    )
                    i += 1
                stop.set()
                await asyncio.gather(*clients)
        finally:
            double.stop()
    return tally


def outage(double: Double, seconds: float) -> None:
    double.stop()
    time.sleep(seconds)  # the outage itself: how long TF Serving is away
    double.start()


def memory_growth(rss_mb: list[float], steps: list[str]) -> tuple[float, str]:
    """Growth of resident memory, percent: each step's sample in the last round against the
    same step's in the first round after the warm-up (memory differs from step to step: it
    peaks after TF Serving's restart, drops after a retrain), the largest of them."""
    kinds = len(set(steps)) or 1
    rounds = [rss_mb[i : i + kinds] for i in range(0, len(rss_mb) - kinds + 1, kinds)]
    if len(rounds) <= WARMUP_ROUNDS:
        return 0.0, "too short to tell"
    base, last = rounds[WARMUP_ROUNDS], rounds[-1]
    growth = max(100 * (b / a - 1) for a, b in zip(base, last, strict=True))
    pairs = ", ".join(f"{a:.0f}->{b:.0f}" for a, b in zip(base, last, strict=True))
    return growth, f"{pairs} MB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    parser.add_argument("--duration-s", type=float, default=600)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--outage-s", type=float, default=3)
    parser.add_argument("--calm-s", type=float, default=10, help="load alone after each step")
    parser.add_argument("--model-base-path", type=Path, default=Path("models/backbones"))
    parser.add_argument("--model-name", default="efficientnet_lite0")
    parser.add_argument("--data", type=Path, default=Path("data/demo/train"))
    parser.add_argument("--queries", type=Path, default=Path("data/demo/queries"))
    parser.add_argument("--query-stride", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    tally = asyncio.run(run(args))
    growth, settled = memory_growth(tally.rss_mb, tally.steps)
    print(f"requests sent {tally.sent}; answered: " + ", ".join(
        f"{key} {n}" for key, n in sorted(tally.answers.items())))  # fmt: skip
    print(
        f"lost {len(tally.lost)}"
        + (f": {Counter(tally.lost).most_common(5)}" if tally.lost else "")
    )
    print(f"matcher memory, last round against round {WARMUP_ROUNDS + 1} step by step: "
          f"{settled} ({growth:+.1f} % at most, limit {GROWTH_LIMIT_PCT:.0f} %)")  # fmt: skip
    if args.json:
        payload = {
            "sent": tally.sent,
            "answers": dict(tally.answers),
            "lost": len(tally.lost),
            "lost_why": dict(Counter(tally.lost)),
            "steps": tally.steps,
            "rss_mb": tally.rss_mb,
            "growth_pct": round(growth, 2),
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0 if not tally.lost and growth <= GROWTH_LIMIT_PCT else 1


if __name__ == "__main__":
    sys.exit(main())
