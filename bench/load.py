"""Load generator for matcher.v1.Matcher/Match that reports what ghz reports.

ghz (https://ghz.sh) is what the production team runs against a cluster; it is not installed
everywhere, so this speaks the same language: the same options, the same summary text, the same
JSON report (durations in nanoseconds) and the same exit status (0 even when every request
failed: the failures are the result). deploy/ghz/ holds the ghz config for the same load.

    .venv/bin/python -m bench.load --target localhost:50051 --insecure \
        --image deploy/ghz/chelsea.jpg --concurrency 16 --total 2000 [--rate 100] [--json out.json]

Other benchmarks call it directly:

    report = await run_load(LoadConfig(target=..., images=(jpeg,), insecure=True, total=500))
    print(format_summary(report))
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import grpc
import numpy as np

from matcher.v1 import matcher_pb2, matcher_pb2_grpc

CALL = "matcher.v1.Matcher.Match"
PERCENTILES = (10, 25, 50, 75, 90, 95, 99)
HISTOGRAM_BUCKETS = 10
BAR = "∎"
BAR_WIDTH = 40
DURATION_STOPS = ("close", "wait", "ignore")

#: grpc-go's names for the status codes (codes.Code.String()), which ghz prints. Python's enum
#: names differ (INVALID_ARGUMENT, and CANCELLED with two l's).
GO_CODE_NAMES: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}

#: What grpc-go reports for a call cut off by closing its connection (ghz --duration-stop close).
CLOSED_CONNECTION_ERROR = "rpc error: code = Canceled desc = grpc: the client connection is closing"

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0}
_DURATION_UNITS |= {"m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Seconds in a Go duration string, as ghz reads them: "30s", "500ms", "2m", "1h30m", "0"."""
    text = text.strip()
    if text == "0":
        return 0.0
    seconds, position = 0.0, 0
    for part in _DURATION_PART.finditer(text):
        if part.start() != position:
            break
        seconds += float(part.group(1)) * _DURATION_UNITS[part.group(2)]
        position = part.end()
    if not text or position != len(text):
        raise ValueError(f'invalid duration "{text}" (use e.g. 30s, 500ms, 2m)')
    return seconds


@dataclass(frozen=True)
class LoadConfig:
    """One load run against Matcher/Match; the defaults are ghz's.

    `images` are encoded photos, sent round-robin by request number (ghz's data array).
    `duration` > 0 runs for that long and ignores `total` (ghz -z); `rate` is requests per
    second over all workers, 0 for no limit; `timeout` is per request, 0 for none.
    Without `insecure`, TLS trusts `tls_ca` (PEM; the system's CAs when None) and presents
    `tls_cert` and `tls_key` when given (mutual TLS); `token` is sent as a bearer token.
    """

    target: str
    images: tuple[bytes, ...]
    top_k: int = 5
    concurrency: int = 50
    total: int = 200
    duration: float = 0.0
    rate: float = 0.0
    timeout: float = 20.0
    connections: int = 1
    insecure: bool = False
    duration_stop: str = "close"
    image_names: tuple[str, ...] = ()
    tls_ca: bytes | None = None
    tls_cert: bytes | None = None
    tls_key: bytes | None = field(default=None, repr=False)
    token: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem:
            raise ValueError(problem)

    def _problem(self) -> str | None:
        if not self.target:
            return "host required"
        if not self.images:
            return "at least one image is required"
        if self.concurrency < 1 or self.connections < 1:
            return "concurrency and connections must be at least 1"
        if self.connections > self.concurrency:
            return "number of connections cannot be greater than concurrency"  # ghz's check
        if self.total < 1 and self.duration <= 0:
            return "total must be at least 1"
        if min(self.duration, self.rate, self.timeout, self.top_k) < 0:
            return "duration, rate, timeout and top-k cannot be negative"
        if self.duration_stop not in DURATION_STOPS:
            return f"duration-stop must be one of {', '.join(DURATION_STOPS)}"
        if (self.tls_cert is None) != (self.tls_key is None):
            return "tls-cert and tls-key go together"
        if self.insecure and (self.tls_ca or self.tls_cert):
            return "insecure cannot be combined with tls-ca, tls-cert or tls-key"
        return None


@dataclass
class LoadReport:
    """Every request's outcome, in completion order, and the figures ghz derives from them.

    Like ghz, fastest, slowest, the histogram and the percentiles count successful requests
    only; count, average and requests/sec count every request.
    """

    config: LoadConfig
    date: datetime
    end_reason: str  # ghz's: "normal", "timeout" (duration reached) or "cancel" (interrupted)
    total_ns: int
    latencies_ns: list[int] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    timestamps_ns: list[int] = field(default_factory=list)  # wall clock when each ended

    @property
    def count(self) -> int:
        return len(self.latencies_ns)

    @property
    def average_ns(self) -> int:
        return int(np.mean(self.latencies_ns)) if self.latencies_ns else 0

    @property
    def rps(self) -> float:
        return self.count / (self.total_ns / 1e9) if self.total_ns else 0.0

    @property
    def ok_latencies_ns(self) -> np.ndarray:
        """Sorted latencies of the requests that succeeded."""
        latencies = np.asarray(self.latencies_ns, dtype=np.int64)
        ok = np.asarray([not error for error in self.errors], dtype=bool)
        return np.sort(latencies[ok]) if latencies.size else latencies

    @property
    def fastest_ns(self) -> int:
        ok = self.ok_latencies_ns
        return int(ok[0]) if ok.size else 0

    @property
    def slowest_ns(self) -> int:
        ok = self.ok_latencies_ns
        return int(ok[-1]) if ok.size else 0

    @property
    def status_distribution(self) -> dict[str, int]:
        """Responses per status (Go names), most frequent first."""
        return dict(Counter(self.statuses).most_common())

    @property
    def error_distribution(self) -> dict[str, int]:
        """Responses per error message, most frequent first."""
        return dict(Counter(error for error in self.errors if error).most_common())

    @property
    def latency_distribution(self) -> list[tuple[int, int]]:
        """(percentage, latency ns) from every successful latency, nearest rank as ghz ranks."""
        ok = self.ok_latencies_ns
        if not ok.size:
            return []
        # inverted_cdf is the nearest-rank method: the smallest latency with at least p % of
        # the latencies at or below it, which is the element ghz picks.
        values = np.percentile(ok, PERCENTILES, method="inverted_cdf")
        return [(p, int(v)) for p, v in zip(PERCENTILES, values, strict=True)]

    @property
    def histogram(self) -> list[tuple[float, int, float]]:
        """(mark s, count, frequency) of ghz's 11 marks from fastest to slowest; each counts the
        successful latencies above the previous mark and at or below its own."""
        ok = self.ok_latencies_ns
        if not ok.size:
            return []
        fastest, slowest = float(ok[0]), float(ok[-1])
        step = (slowest - fastest) / HISTOGRAM_BUCKETS
        marks = np.array([fastest + step * i for i in range(HISTOGRAM_BUCKETS)] + [slowest])
        buckets = np.minimum(np.searchsorted(marks, ok, side="left"), HISTOGRAM_BUCKETS)
        counts = np.bincount(buckets, minlength=HISTOGRAM_BUCKETS + 1)
        return [
            (float(mark) / 1e9, int(n), int(n) / ok.size)
            for mark, n in zip(marks, counts, strict=True)
        ]

    def to_ghz_json(self) -> dict:
        """The report as ghz writes it with -O json: durations in integer nanoseconds, histogram
        marks in seconds, dates in RFC 3339; null percentiles and histogram when nothing
        succeeded (Go's nil slices)."""
        latency = [{"percentage": p, "latency": ns} for p, ns in self.latency_distribution]
        histogram = [
            {"mark": mark, "count": n, "frequency": frequency}
            for mark, n, frequency in self.histogram
        ]
        return {
            "date": _rfc3339(self.date),
            "endReason": self.end_reason,
            "options": _ghz_options(self.config),
            "count": self.count,
            "total": self.total_ns,
            "average": self.average_ns,
            "fastest": self.fastest_ns,
            "slowest": self.slowest_ns,
            "rps": self.rps,
            "errorDistribution": self.error_distribution,
            "statusCodeDistribution": self.status_distribution,
            "latencyDistribution": latency or None,
            "histogram": histogram or None,
            "details": [
                {
                    "timestamp": _rfc3339_ns(stamp),
                    "latency": latency_ns,
                    "error": error,
                    "status": status,
                }
                for stamp, latency_ns, error, status in zip(
                    self.timestamps_ns, self.latencies_ns, self.errors, self.statuses, strict=True
                )
            ],
        }


def _ghz_options(config: LoadConfig) -> dict:
    """ghz's report options, with the keys ghz writes. The images stand in as sizes: ghz would
    repeat the whole base64 payload here."""
    names = config.image_names or tuple(f"image {i}" for i in range(len(config.images)))
    data = [
        {"image": f"<{len(image)} bytes: {name}>", "top_k": config.top_k}
        for image, name in zip(config.images, names, strict=True)
    ]
    options: dict = {"call": CALL, "host": config.target, "insecure": config.insecure}
    if config.rate:
        options["rps"] = int(config.rate) if float(config.rate).is_integer() else config.rate
    options |= {"load-schedule": "const", "concurrency": config.concurrency}
    options["concurrency-schedule"] = "const"
    if not config.duration:
        options["total"] = config.total
    options["connections"] = config.connections
    if config.duration:
        options["duration"] = round(config.duration * 1e9)
    if config.timeout:
        options["timeout"] = round(config.timeout * 1e9)
    options |= {"data": data[0] if len(data) == 1 else data, "binary": False, "CPUs": _cpus()}
    return options


def _cpus() -> int:
    with contextlib.suppress(AttributeError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone().isoformat(timespec="seconds").replace("+00:00", "Z")


def _rfc3339_ns(epoch_ns: int) -> str:
    """Go's RFC3339Nano: nanoseconds with trailing zeros dropped."""
    seconds, nanos = divmod(epoch_ns, 1_000_000_000)
    local = datetime.fromtimestamp(seconds).astimezone()
    fraction = f".{nanos:09d}".rstrip("0").rstrip(".")
    offset = local.isoformat()[19:].replace("+00:00", "Z")
    return f"{local:%Y-%m-%dT%H:%M:%S}{fraction}{offset}"


class _Schedule:
    """Hands out request numbers and when each may start, shared by all workers.

    With a rate, request i is due at start + i / rate: a fixed timetable rather than a sleep
    after each request, so per-worker latency does not make the rate drift, and a stall is made
    up afterwards (as ghz's constant pacer does).
    """

    def __init__(self, start: float, config: LoadConfig) -> None:
        self.start = start
        self.rate = config.rate
        self.limit = None if config.duration else config.total
        self.deadline = start + config.duration if config.duration else None
        self.issued = 0
        self.closed = False

    def next(self, now: float) -> tuple[int, float] | None:
        """(request number, due time), or None once the run should send no more."""
        if self.closed or (self.limit is not None and self.issued >= self.limit):
            return None
        due = self.start + self.issued / self.rate if self.rate else now
        if self.deadline is not None and max(due, now) >= self.deadline:
            return None
        self.issued += 1
        return self.issued - 1, due


class _Run:
    """One run's requests, its workers' loop, and what came of every call."""

    def __init__(self, config: LoadConfig) -> None:
        self.config = config
        self.requests = [
            matcher_pb2.ImageRequest(image=image, top_k=config.top_k) for image in config.images
        ]
        self.latencies_ns: list[int] = []
        self.statuses: list[str] = []
        self.errors: list[str] = []
        self.timestamps_ns: list[int] = []
        self.record_cut_off = False  # whether calls cut off at the end count, as Canceled
        self.metadata = (("authorization", f"Bearer {config.token}"),) if config.token else ()

    def record(self, started_ns: int, status: str, error: str) -> None:
        self.latencies_ns.append(time.perf_counter_ns() - started_ns)
        self.statuses.append(status)
        self.errors.append(error)
        self.timestamps_ns.append(time.time_ns())

    async def call(
        self, stub: matcher_pb2_grpc.MatcherStub, request: matcher_pb2.ImageRequest
    ) -> None:
        """One request. Every outcome is recorded; nothing is raised but cancellation."""
        timeout = self.config.timeout or None
        started = time.perf_counter_ns()
        try:
            await stub.Match(request, timeout=timeout, metadata=self.metadata)
        except grpc.aio.AioRpcError as exc:
            code = GO_CODE_NAMES.get(exc.code(), "Unknown")
            self.record(started, code, f"rpc error: code = {code} desc = {exc.details() or ''}")
        except asyncio.CancelledError:
            if self.record_cut_off:
                self.record(started, "Canceled", CLOSED_CONNECTION_ERROR)
            raise
        except Exception as exc:  # a client-side failure is a result too, not a crash
            self.record(started, "Unknown", f"rpc error: code = Unknown desc = {exc!r}")
        else:
            self.record(started, "OK", "")

    async def worker(self, stub: matcher_pb2_grpc.MatcherStub, schedule: _Schedule) -> None:
        loop = asyncio.get_running_loop()
        while (slot := schedule.next(loop.time())) is not None:
            number, due = slot
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
                if schedule.closed:
                    return
            await self.call(stub, self.requests[number % len(self.requests)])


def _open_channels(config: LoadConfig) -> list[grpc.aio.Channel]:
    options = [
        # As ghz: no message size limits on the client side; the server enforces its own.
        ("grpc.max_send_message_length", -1),
        ("grpc.max_receive_message_length", -1),
        # Channels with equal arguments share one TCP connection through gRPC's global
        # subchannel pool; a pool per channel gives each channel its own connection, which is
        # what --connections means.
        ("grpc.use_local_subchannel_pool", 1),
    ]
    if config.insecure:
        return [
            grpc.aio.insecure_channel(config.target, options=options)
            for _ in range(config.connections)
        ]
    credentials = grpc.ssl_channel_credentials(config.tls_ca, config.tls_key, config.tls_cert)
    return [
        grpc.aio.secure_channel(config.target, credentials, options=options)
        for _ in range(config.connections)
    ]


async def run_load(config: LoadConfig, stop: asyncio.Event | None = None) -> LoadReport:
    """Send the configured load and report on it. Failed requests are counted, never raised.

    `concurrency` workers share `connections` channels (worker w uses channel w mod K), each
    with one request in flight at a time. Setting `stop` ends the run early (ghz's "cancel"):
    requests in flight are abandoned and not counted.
    """
    run = _Run(config)
    channels = _open_channels(config)
    stubs = [matcher_pb2_grpc.MatcherStub(channel) for channel in channels]
    loop = asyncio.get_running_loop()
    date = datetime.now().astimezone()
    started = time.perf_counter_ns()
    schedule = _Schedule(loop.time(), config)
    tasks = [
        asyncio.create_task(run.worker(stubs[w % len(stubs)], schedule))
        for w in range(config.concurrency)
    ]
    try:
        end_reason = await _wait_for_end(tasks, run, schedule, stop)
        total_ns = time.perf_counter_ns() - started
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # grace=None: in-flight calls are cancelled now (grpc-stubs omits the default).
        await asyncio.gather(*(channel.close(grace=None) for channel in channels))
    return LoadReport(
        config=config,
        date=date,
        end_reason=end_reason,
        total_ns=total_ns,
        latencies_ns=run.latencies_ns,
        statuses=run.statuses,
        errors=run.errors,
        timestamps_ns=run.timestamps_ns,
    )


async def _wait_for_end(
    tasks: list[asyncio.Task[None]], run: _Run, schedule: _Schedule, stop: asyncio.Event | None
) -> str:
    """Wait for the workers, the duration or `stop`; returns ghz's end reason."""
    config = run.config
    finished = asyncio.gather(*tasks, return_exceptions=True)
    stopped = asyncio.ensure_future(stop.wait()) if stop is not None else None
    waiting: list[asyncio.Future[Any]] = [finished] if stopped is None else [finished, stopped]
    done, _ = await asyncio.wait(
        waiting, timeout=config.duration or None, return_when=asyncio.FIRST_COMPLETED
    )
    if stopped is not None:
        stopped.cancel()
    if finished in done:
        return "normal"
    reason = "cancel" if stopped in done else "timeout"
    schedule.closed = True
    if reason == "timeout" and config.duration_stop == "wait":
        await finished  # in-flight requests complete and count; no new ones start
        return reason
    # ghz "close" reports the calls it cuts off as errors; "ignore" and an interrupt drop them.
    run.record_cut_off = reason == "timeout" and config.duration_stop == "close"
    for task in tasks:
        task.cancel()
    await finished
    return reason


def format_summary(report: LoadReport) -> str:
    """The report as ghz's default "summary" output."""
    lines = [
        "Summary:",
        f"  Count:\t{report.count}",
        f"  Total:\t{_nano_unit(report.total_ns)}",
        f"  Slowest:\t{_nano_unit(report.slowest_ns)}",
        f"  Fastest:\t{_nano_unit(report.fastest_ns)}",
        f"  Average:\t{_nano_unit(report.average_ns)}",
        f"  Requests/sec:\t{report.rps:4.2f}",
        "",
        "Response time histogram:",
        *_histogram_lines(report.histogram),
        "",
        "Latency distribution:",
        *(f"  {p} % in {_nano_unit(ns)}" for p, ns in report.latency_distribution),
        "",
    ]
    statuses = report.status_distribution
    if statuses:
        lines.append("Status code distribution:")
        lines += _columns([(f"  [{status}]", f"{n} responses") for status, n in statuses.items()])
    lines.append("")
    errors = report.error_distribution
    if errors:
        lines.append("Error distribution:")
        lines += _columns([(f"  [{n}]", error) for error, n in errors.items()])
    return "\n".join(lines) + "\n"


def _nano_unit(ns: int) -> str:
    """ghz's formatNanoUnit: ns below 10 µs, then ms below 1 s, then s."""
    if ns < 10_000:
        return f"{ns} ns"
    if ns < 1_000_000_000:
        return f"{ns / 1e6:4.2f} ms"
    return f"{ns / 1e9:4.2f} s"


def _histogram_lines(histogram: list[tuple[float, int, float]]) -> list[str]:
    """ghz's bars: marks in ms, counts aligned, the largest bucket 40 bars long."""
    if not histogram:
        return []
    marks = [f"{mark * 1000:.3f}" for mark, _, _ in histogram]
    counts = [str(n) for _, n, _ in histogram]
    biggest = max(n for _, n, _ in histogram)
    mark_width, count_width = max(map(len, marks)), max(map(len, counts))
    lines = []
    for mark, count, (_, n, _) in zip(marks, counts, histogram, strict=True):
        bars = (n * BAR_WIDTH + biggest // 2) // biggest if biggest else 0
        lines.append(
            f"  {mark:<{mark_width}} [{count}]{' ' * (count_width - len(count))} |" + BAR * bars
        )
    return lines


def _columns(rows: list[tuple[str, str]]) -> list[str]:
    """Two columns as Go's tabwriter lays them out for ghz (padding 3)."""
    width = max(len(left) for left, _ in rows) + 3
    return [f"{left:<{width}}{right}" for left, right in rows]


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block: the caller scripts this.
        raise _UsageError(message)


def _duration_arg(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _Parser(
        prog="python -m bench.load",
        description="Load-test matcher.v1.Matcher/Match; prints what ghz prints.",
    )
    parser.add_argument("--target", required=True, help="HOST:PORT")
    parser.add_argument(
        "--image",
        action="append",
        required=True,
        type=Path,
        help="encoded photo; repeat to cycle through several",
    )
    parser.add_argument("--top-k", type=int, default=5, help="labels per answer (5)")
    parser.add_argument("--concurrency", "-c", type=int, default=50, help="workers (50)")
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--total", "-n", type=int, default=200, help="requests (200)")
    amount.add_argument(
        "--duration",
        "-z",
        type=_duration_arg,
        default=0.0,
        help="run this long instead, e.g. 30s or 2m",
    )
    parser.add_argument(
        "--duration-stop",
        choices=DURATION_STOPS,
        default="close",
        help="in-flight requests at the end of --duration, as ghz (close)",
    )
    parser.add_argument(
        "--rate",
        "--rps",
        type=float,
        default=0.0,
        help="requests/s over all workers, 0 = unlimited (0)",
    )
    parser.add_argument(
        "--timeout", "-t", type=_duration_arg, default=20.0, help="per request, 0 = none (20s)"
    )
    parser.add_argument("--connections", type=int, default=1, help="channels shared (1)")
    parser.add_argument("--json", type=Path, help="also write ghz's JSON report here")
    parser.add_argument("--insecure", action="store_true", help="plaintext, no TLS")
    parser.add_argument("--tls-ca", "--cacert", type=Path, help="CA certificate(s) to trust")
    parser.add_argument("--tls-cert", "--cert", type=Path, help="client certificate (mTLS)")
    parser.add_argument("--tls-key", "--key", type=Path, help="client private key (mTLS)")
    parser.add_argument("--token-file", type=Path, help="file holding the bearer token")
    return parser.parse_args(argv)


def _read_optional(path: Path | None, flag: str) -> bytes | None:
    try:
        return path.read_bytes() if path is not None else None
    except OSError as exc:
        raise _UsageError(f"cannot read {flag} {path}: {exc.strerror}") from None


def _config_from_args(args: argparse.Namespace) -> LoadConfig:
    images = []
    for path in args.image:
        try:
            images.append(path.read_bytes())
        except OSError as exc:
            raise _UsageError(f"cannot read image {path}: {exc.strerror}") from None
    token = _read_optional(args.token_file, "--token-file")
    try:
        return LoadConfig(
            target=args.target,
            images=tuple(images),
            top_k=args.top_k,
            concurrency=args.concurrency,
            total=args.total,
            duration=args.duration,
            rate=args.rate,
            timeout=args.timeout,
            connections=args.connections,
            insecure=args.insecure,
            duration_stop=args.duration_stop,
            image_names=tuple(str(path) for path in args.image),
            tls_ca=_read_optional(args.tls_ca, "--tls-ca"),
            tls_cert=_read_optional(args.tls_cert, "--tls-cert"),
            tls_key=_read_optional(args.tls_key, "--tls-key"),
            token=token.decode("utf-8", "replace").rstrip("\r\n") if token else "",
        )
    except ValueError as exc:
        raise _UsageError(str(exc)) from None


async def _run_interruptible(config: LoadConfig) -> LoadReport:
    """Ctrl-C ends the run and still prints what was measured, as ghz does."""
    stop = asyncio.Event()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)
    return await run_load(config, stop=stop)


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI. 0 whenever a report was printed (failed requests are results, as in ghz);
    2 for bad arguments; 1 when the JSON report cannot be written."""
    try:
        args = _parse_args(argv)
        config = _config_from_args(args)
    except _UsageError as exc:
        print(f"python -m bench.load: error: {exc}", file=sys.stderr)
        return 2
    report = asyncio.run(_run_interruptible(config))
    print(format_summary(report), end="")
    if args.json:
        try:
            args.json.write_text(json.dumps(report.to_ghz_json(), indent=2) + "\n")
        except OSError as exc:
            print(
                f"python -m bench.load: cannot write {args.json}: {exc.strerror}", file=sys.stderr
            )
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
