"""bench.load, the ghz-compatible load generator, against a FAKE Matcher server.

The fake answers Match after a fixed sleep and never loads a model: these tests are about the
load generator (counts, concurrency, rate, reports), not about matching. Timing is only ever
asserted as a lower bound, so a slow or busy machine cannot fail them.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from PIL import Image

from bench.load import (
    GO_CODE_NAMES,
    PERCENTILES,
    LoadConfig,
    LoadReport,
    format_summary,
    main,
    parse_duration,
    run_load,
)
from matcher.v1 import matcher_pb2, matcher_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
GHZ_DIR = ROOT / "deploy" / "ghz"
FAKE_DELAY_S = 0.01
JPEG = b"\xff\xd8 not decoded by the fake \xff\xd9"
EMPTY_IMAGE_ERROR = "rpc error: code = InvalidArgument desc = image is empty (0 bytes)"
GHZ_REPORT_KEYS = [
    "date",
    "endReason",
    "options",
    "count",
    "total",
    "average",
    "fastest",
    "slowest",
    "rps",
    "errorDistribution",
    "statusCodeDistribution",
    "latencyDistribution",
    "histogram",
    "details",
]


class FakeMatcherServicer(matcher_pb2_grpc.MatcherServicer):
    """A FAKE Matcher for load-generator tests: sleeps FAKE_DELAY_S, answers one made-up label,
    and rejects an empty image with INVALID_ARGUMENT as the real service does. It records what
    the load generator did to it."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.image_sizes: Counter[int] = Counter()
        self.peers: set[str] = set()

    async def Match(self, request, context):
        self.calls += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.image_sizes[len(request.image)] += 1
        self.peers.add(context.peer())
        try:
            await asyncio.sleep(FAKE_DELAY_S)
            if not request.image:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "image is empty (0 bytes)")
            return matcher_pb2.MatchResponse(
                matches=[matcher_pb2.LabelScore(label="fake", score=1.0)],
                model=matcher_pb2.ModelIdentity(backbone="fake"),
            )
        finally:
            self.in_flight -= 1


@pytest.fixture(scope="module")
async def fake_server() -> AsyncIterator[tuple[FakeMatcherServicer, str]]:
    servicer = FakeMatcherServicer()
    server = grpc.aio.server()
    matcher_pb2_grpc.add_MatcherServicer_to_server(servicer, server)
    port = server.add_insecure_port("localhost:0")
    await server.start()
    yield servicer, f"localhost:{port}"
    await server.stop(0)


@pytest.fixture
def fake(fake_server) -> FakeMatcherServicer:
    servicer, _ = fake_server
    servicer.reset()
    return servicer


@pytest.fixture
def target(fake_server) -> str:
    return fake_server[1]


def config(target: str, **overrides) -> LoadConfig:
    settings = {"images": (JPEG,), "insecure": True, "concurrency": 4, "total": 20}
    return LoadConfig(target=target, **(settings | overrides))


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def run_cli(*args: str) -> tuple[int, str, str]:
    """The CLI in a subprocess, so that the fake server keeps serving on this event loop."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.load",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    return process.returncode, stdout.decode(), stderr.decode()


async def test_total_is_honoured(fake, target) -> None:
    report = await run_load(config(target, total=23, concurrency=5))
    assert report.count == 23 == fake.calls
    assert report.status_distribution == {"OK": 23}
    assert report.end_reason == "normal"


async def test_concurrency_is_never_exceeded(fake, target) -> None:
    await run_load(config(target, total=40, concurrency=4))
    assert 1 < fake.max_in_flight <= 4


async def test_connections_are_separate(fake, target) -> None:
    await run_load(config(target, total=8, concurrency=4, connections=2))
    assert len(fake.peers) == 2  # two client ports: two TCP connections, not one shared


async def test_rate_limit_spaces_requests(fake, target) -> None:
    # 40 requests at 50/s: the last may not start before 39/50 = 0.78 s.
    report = await run_load(config(target, total=40, concurrency=8, rate=50))
    assert report.count == 40
    assert report.total_ns >= 0.7e9
    starts = np.array(report.timestamps_ns) - np.array(report.latencies_ns)
    assert (starts.max() - starts.min()) >= 0.7e9


async def test_images_cycle_and_errors_use_ghz_names(fake, target) -> None:
    report = await run_load(config(target, images=(JPEG, b""), total=20))
    assert fake.image_sizes == {len(JPEG): 10, 0: 10}
    assert report.status_distribution == {"OK": 10, "InvalidArgument": 10}
    assert report.error_distribution == {EMPTY_IMAGE_ERROR: 10}
    # ghz leaves failed requests out of fastest, slowest, histogram and percentiles.
    assert report.ok_latencies_ns.size == 10
    assert sum(n for _, n, _ in report.histogram) == 10


async def test_summary_has_every_ghz_section(fake, target) -> None:
    summary = format_summary(await run_load(config(target, images=(JPEG, b""), total=20)))
    lines = summary.splitlines()
    for label in ("Count:\t20", "Total:\t", "Slowest:\t", "Fastest:\t", "Average:\t"):
        assert f"  {label}" in summary
    assert "  Requests/sec:\t" in summary
    histogram = lines[lines.index("Response time histogram:") + 1 :][:11]
    assert all("] " in line and "|" in line for line in histogram)
    assert any("∎" * 40 in line for line in histogram)
    for p in PERCENTILES:
        assert f"  {p} % in " in summary
    assert "Status code distribution:" in lines
    assert any(line.startswith("  [OK]") and line.endswith(" 10 responses") for line in lines)
    assert any(line.startswith("  [InvalidArgument]") for line in lines)
    assert "Error distribution:" in lines
    assert any(line.startswith("  [10]") and line.endswith(EMPTY_IMAGE_ERROR) for line in lines)


async def test_duration_runs_for_its_time(fake, target) -> None:
    report = await run_load(config(target, total=0, duration=0.3, rate=100))
    assert report.total_ns >= 0.3e9
    assert report.end_reason == "timeout"
    assert 0 < report.count <= 31  # 100/s for 0.3 s, counting the one at t = 0


async def test_cli_writes_ghz_json(fake, target, tmp_path) -> None:
    image = tmp_path / "photo.jpg"
    image.write_bytes(JPEG)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    out = tmp_path / "report.json"
    code, stdout, stderr = await run_cli(
        "--target",
        target,
        "--insecure",
        "--image",
        str(image),
        "--image",
        str(empty),
        "--total",
        "10",
        "--concurrency",
        "2",
        "--json",
        str(out),
    )
    assert code == 0, stderr
    assert stdout.startswith("Summary:\n  Count:\t10\n")
    report = json.loads(out.read_text())
    assert list(report) == GHZ_REPORT_KEYS
    assert report["count"] == 10 and report["endReason"] == "normal"
    # Nanoseconds, as Go's time.Duration marshals: the fake alone takes 10 ms a call.
    for key in ("total", "average", "fastest", "slowest"):
        assert isinstance(report[key], int) and report[key] >= FAKE_DELAY_S * 1e9 / 2
    assert report["statusCodeDistribution"] == {"OK": 5, "InvalidArgument": 5}
    assert report["errorDistribution"] == {EMPTY_IMAGE_ERROR: 5}
    assert [d["percentage"] for d in report["latencyDistribution"]] == list(PERCENTILES)
    assert all(isinstance(d["latency"], int) for d in report["latencyDistribution"])
    assert len(report["histogram"]) == 11
    assert 0 < report["histogram"][0]["mark"] < 10  # seconds
    assert sum(b["count"] for b in report["histogram"]) == 5
    assert len(report["details"]) == 10
    assert set(report["details"][0]) == {"timestamp", "latency", "error", "status"}
    options = report["options"]
    assert options["call"] == "matcher.v1.Matcher.Match" and options["host"] == target
    assert options["concurrency"] == 2 and options["total"] == 10 and options["timeout"] == 20e9


async def test_cli_against_a_closed_port_reports_unavailable() -> None:
    code, stdout, stderr = await run_cli(
        "--target",
        f"127.0.0.1:{closed_port()}",
        "--insecure",
        "--image",
        __file__,
        "--total",
        "6",
        "--concurrency",
        "2",
        "--timeout",
        "5s",
    )
    assert code == 0  # as ghz: the failures are the result
    assert "Traceback" not in stderr
    assert "[Unavailable]" in stdout and "6 responses" in stdout
    assert "rpc error: code = Unavailable desc = " in stdout


@pytest.mark.parametrize(
    "args",
    [
        ["--image", __file__],  # no target
        ["--target", "h:1"],  # no image
        ["--target", "h:1", "--image", "/no/such/photo.jpg"],
        ["--target", "h:1", "--image", __file__, "--total", "5", "--duration", "1s"],
        ["--target", "h:1", "--image", __file__, "--duration", "30"],
        ["--target", "h:1", "--image", __file__, "--timeout", "soon"],
        ["--target", "h:1", "--image", __file__, "--concurrency", "0"],
        ["--target", "h:1", "--image", __file__, "-c", "2", "--connections", "3"],
        ["--target", "h:1", "--image", __file__, "--rate", "-1"],
        ["--target", "h:1", "--image", __file__, "--bogus"],
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, capsys) -> None:
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.splitlines()) == 1
    assert captured.err.startswith("python -m bench.load: error: ")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("500ms", 0.5),
        ("2m", 120),
        ("1h30m", 5400),
        ("1.5s", 1.5),
        ("0", 0),
        ("250us", 250e-6),
        ("10µs", 10e-6),
        ("3ns", 3e-9),
    ],
)
def test_durations_parse_like_go(text, seconds) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "30", "s", "-1s", "1x", "1s 2s", "ms5"])
def test_bad_durations_are_refused(text) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def ghz_percentile(sorted_latencies: list[int], percentage: int) -> int:
    """ghz's runner/reporter.go latencies(), transcribed."""
    rank = percentage / 100 * len(sorted_latencies)
    index = int(rank)
    if rank == index:
        index -= 1
    return sorted_latencies[max(index, 0)]


@pytest.mark.parametrize("count", [1, 2, 7, 10, 30, 99, 100, 1001])
def test_percentiles_rank_as_ghz_does(count) -> None:
    latencies = np.random.default_rng(count).integers(1, 10**9, count).tolist()
    report = LoadReport(
        config=config("h:1"),
        date=None,
        end_reason="normal",
        total_ns=10**9,
        latencies_ns=latencies,
        statuses=["OK"] * count,
        errors=[""] * count,
        timestamps_ns=[0] * count,
    )
    ordered = sorted(latencies)
    assert report.latency_distribution == [(p, ghz_percentile(ordered, p)) for p in PERCENTILES]
    histogram = report.histogram
    assert sum(n for _, n, _ in histogram) == count
    assert histogram[0][0] == ordered[0] / 1e9 and histogram[-1][0] == ordered[-1] / 1e9


def test_every_grpc_code_has_its_go_name() -> None:
    assert set(GO_CODE_NAMES) == set(grpc.StatusCode)
    assert GO_CODE_NAMES[grpc.StatusCode.CANCELLED] == "Canceled"


def test_ghz_config_is_current_and_well_formed(tmp_path) -> None:
    sys.path.insert(0, str(GHZ_DIR))
    try:
        import make_config
    finally:
        sys.path.remove(str(GHZ_DIR))
    make_config.main(["--out-dir", str(tmp_path)])
    committed = json.loads((GHZ_DIR / "match.json").read_text())
    assert json.loads((tmp_path / "match.json").read_text()) == committed, "run make_config.py"
    assert (tmp_path / "chelsea.jpg").read_bytes() == (GHZ_DIR / "chelsea.jpg").read_bytes()
    # Paths in a ghz config are relative to the working directory: the repository root.
    assert (ROOT / committed["proto"]).is_file()
    assert all((ROOT / path).is_dir() for path in committed["import-paths"])
    assert committed["call"] == "matcher.v1.Matcher.Match"
    assert committed["insecure"] is True and committed["host"] == "localhost:50051"
    assert (committed["concurrency"], committed["total"]) == (16, 2000)
    # ghz fills the request with the protobuf JSON mapping: bytes are base64.
    request = json_format.ParseDict(committed["data"], matcher_pb2.ImageRequest())
    assert request.top_k == 5
    assert request.image == base64.b64decode(committed["data"]["image"])
    photo = Image.open(io.BytesIO(request.image))
    assert photo.format == "JPEG" and max(photo.size) == 224
