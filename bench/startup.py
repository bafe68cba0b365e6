"""Time to SERVING and resident memory of the matcher process, per feature backend.

Starts `python -m service` as a real process, polls grpc.health.v1 until SERVING, sends a few
Match calls, and reads the process's resident memory (VmRSS) and peak (VmHWM) from /proc. For
the `tfserving` backend a TF Serving test double (tests/tfserving_double.py, which needs
TensorFlow) runs in another process, so its memory is not counted.

    .venv/bin/python -m bench.startup --model-base-path models/backbones \
        --classifier models/classifiers/efficientnet_lite0/classifier.skops \
        --image data/demo/queries/chelsea/chelsea_0000.jpg [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from matcher.settings import CoreSettings
from matcher.v1 import matcher_pb2, matcher_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
#: The server's own defaults (what `make run` builds), so that benches and server agree.
DEFAULT_CLASSIFIER: Path = CoreSettings.model_fields["classifier"].default
DEFAULT_MODEL_DIR: Path = CoreSettings.model_fields["model_dir"].default


def memory_mb(pid: int) -> dict[str, float]:
    """Resident, peak resident and anonymous resident memory of a process, MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    values = {}
    for key in ("VmRSS", "VmHWM", "RssAnon"):
        found = re.search(rf"^{key}:\s+(\d+) kB", status, re.MULTILINE)
        values[key] = int(found.group(1)) / 1024 if found else float("nan")
    return values


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def wait_serving(
    target: str, deadline_s: float, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll health until SERVING; raises if `process` exits first or time runs out."""
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the matcher exited with status {process.returncode}")
            try:
                answer = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if answer.status == SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.02)
    raise TimeoutError(f"{target} not SERVING after {deadline_s} s")


@contextlib.contextmanager
def matcher_process(
    flags: list[str], http_port: int = 0
) -> Iterator[tuple[subprocess.Popen[bytes], str, float]]:
    """`python -m service FLAGS` on a free port (metrics and HTTP on others: HTTP on
    `http_port` when given), until SERVING; yields (process, target, seconds from start to
    SERVING) and stops it afterwards."""
    port = free_port()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    started = time.monotonic()
    # Its log goes to a file, read back when it fails to start: a refused model says why.
    with tempfile.TemporaryFile() as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service",
                *("--port", str(port), "--metrics-port", "0", "--http-port", str(http_port)),
                *flags,
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
        try:
            target = f"localhost:{port}"
            try:
                wait_serving(target, 300, process)
            except (RuntimeError, TimeoutError) as exc:
                log_file.seek(0)
                tail = log_file.read().decode(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError(f"{exc}; its last log lines:\n" + "\n".join(tail)) from None
            yield process, target, time.monotonic() - started
        finally:
            process.terminate()
            process.wait(30)


def measure(flags: list[str], image: bytes, calls: int) -> dict[str, float]:
    """Start the matcher with `flags`; time to SERVING, then memory after `calls` Matches."""
    with matcher_process(flags) as (process, target, to_serving):
        with grpc.insecure_channel(target) as channel:
            stub = matcher_pb2_grpc.MatcherStub(channel)
            for _ in range(calls):
                stub.Match(matcher_pb2.ImageRequest(image=image, top_k=1), timeout=60)
        memory = memory_mb(process.pid)
    return {
        "to_serving_s": round(to_serving, 2),
        "rss_mb": round(memory["VmRSS"], 1),
        "peak_rss_mb": round(memory["VmHWM"], 1),
    }


def start_double(base: Path) -> tuple[subprocess.Popen[str], str]:
    """The TF Serving test double in its own process; returns it and its target."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.tfserving_double",
            "--model-base-path",
            str(base),
            "--port",
            str(port),
        ],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    return process, f"localhost:{port}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__)
    parser.add_argument("--model-base-path", type=Path, default=Path("models/backbones"))
    parser.add_argument("--model-name", default="efficientnet_lite0")
    parser.add_argument(
        "--classifier",
        type=Path,
        default=DEFAULT_CLASSIFIER,
    )
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--calls", type=int, default=20, help="Match calls before measuring")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    image = args.image.read_bytes()
    common = ["--classifier", str(args.classifier), "--model-name", args.model_name]
    results = {
        "embedded": measure(
            [*common, "--model-dir", str(args.model_base_path / args.model_name)],
            image,
            args.calls,
        )
    }
    double, target = start_double(args.model_base_path)
    try:
        wait_for_double(target)
        results["tfserving"] = measure(
            [*common, "--backend", "tfserving", "--tfserving-target", target], image, args.calls
        )
    finally:
        double.terminate()
        double.wait(30)
    print(f"{'backend':<10} {'to SERVING':>11} {'RSS':>9} {'peak RSS':>9}")
    for name, figures in results.items():
        print(
            f"{name:<10} {figures['to_serving_s']:>9.2f} s {figures['rss_mb']:>6.0f} MB "
            f"{figures['peak_rss_mb']:>6.0f} MB"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def wait_for_double(target: str, deadline_s: float = 120) -> None:
    """Until the double answers at all (any gRPC status means it is up)."""
    end = time.monotonic() + deadline_s
    with grpc.insecure_channel(target) as channel:
        while time.monotonic() < end:
            try:
                grpc.channel_ready_future(channel).result(timeout=1)
                return
            except grpc.FutureTimeoutError:
                continue
    raise TimeoutError(f"TF Serving double at {target} did not start")


if __name__ == "__main__":
    sys.exit(main())
