"""bench/soak.py: a short real soak of a real matcher process, and its verdict on memory.

The 20-minute soak itself is a benchmark (`make soak`); here it runs for a few seconds, to show
that it counts requests and errors, samples the server's memory and exits as documented.
"""

from __future__ import annotations

import itertools
import json
import subprocess

import pytest

from bench.soak import Sample, verdict
from tests import samples
from tests.cli_output import cli_stderr_lines, run_module


def soak(*args: str) -> subprocess.CompletedProcess[str]:
    return run_module("bench.soak", *args, timeout_s=300)


def test_a_short_soak_counts_requests_errors_and_memory(settings, tmp_path) -> None:
    good = tmp_path / "good.jpg"
    good.write_bytes(samples.jpeg())
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    report_path = tmp_path / "soak.json"
    result = soak(
        "--model-dir", str(settings.model_dir),
        "--classifier", str(settings.classifier),
        "--image", str(good),
        "--image", str(bad),
        "--duration-s", "3",
        "--sample-s", "1",
        "--warmup-s", "1",
        "--concurrency", "2",
        "--json", str(report_path),
    )  # fmt: skip
    # Every other request is refused as not an image: errors were counted, so the soak failed.
    assert result.returncode == 1, result.stderr
    report = json.loads(report_path.read_text())
    points = report["samples"]
    assert len(points) == 4 and points[0]["requests"] == 0  # before the load, then 3 periods
    assert [p["t_s"] for p in points] == sorted(p["t_s"] for p in points)
    assert all(p["rss_mb"] > 0 for p in points)
    assert all(a["requests"] <= b["requests"] for a, b in itertools.pairwise(points))
    last = points[-1]
    assert (report["requests"], report["errors"]) == (last["requests"], last["errors"])
    assert 0 < last["errors"] < last["requests"]
    assert abs(2 * last["errors"] - last["requests"]) <= 2 * 2  # one in two, give or take c=2
    (message,) = report["error_distribution"]
    assert "InvalidArgument" in message and "not a recognised image" in message
    after_warm_up = [p["rss_mb"] for p in points if p["t_s"] >= 1]
    assert report["memory"]["baseline_mb"] == after_warm_up[0]
    assert report["memory"]["max_mb"] == max(after_warm_up)
    assert report["passed"] is False
    out = result.stdout
    assert "RSS MB" in out and "errors: " in out and "warm-up" in out
    assert not any("Traceback" in line for line in cli_stderr_lines(result))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--duration-s", "30", "--warmup-s", "60"], "at least warmup-s + sample-s"),
        (["--image", "/nonexistent.jpg"], "cannot read image /nonexistent.jpg"),
        (["--classifier", "/nonexistent.joblib"], "/nonexistent.joblib does not exist"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, message, tmp_path) -> None:
    image = tmp_path / "photo.jpg"
    image.write_bytes(samples.jpeg())
    defaults = {"--image": str(image), "--model-dir": str(tmp_path), "--classifier": str(image)}
    flags = [*args]
    for flag, value in defaults.items():
        if flag not in args:
            flags += [flag, value]
    result = soak(*flags)
    assert result.returncode == 2
    lines = cli_stderr_lines(result)
    assert len(lines) == 1 and message in lines[0], result.stderr


def rss(*values: tuple[float, float]) -> list[Sample]:
    return [Sample(t, 10 * i, 0, mb) for i, (t, mb) in enumerate(values)]


def test_memory_growth_is_judged_after_the_warm_up_against_5_percent() -> None:
    # Growth during the warm-up does not count; the first sample after it is the baseline.
    settled = verdict(rss((0, 300), (30, 500), (60, 1000), (90, 1030), (120, 1040)), 60)
    assert settled is not None and settled.within
    assert (settled.baseline_mb, settled.last_mb, settled.max_mb) == (1000, 1040, 1040)
    assert settled.last_growth_pct == pytest.approx(4.0)
    # A peak above the limit fails even when memory comes back down by the end.
    peak = verdict(rss((60, 1000), (90, 1060), (120, 1010)), 60)
    assert peak is not None and not peak.within and peak.max_growth_pct == pytest.approx(6.0)
    grown = verdict(rss((60, 1000), (90, 1030), (120, 1051)), 60)
    assert grown is not None and not grown.within
    assert verdict(rss((0, 300), (60, 1000)), 60) is None  # one sample after warm-up: no verdict
