"""Start-up, health, shutdown and the command-line programs, run as real processes."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from matcher.factory import make_core
from matcher.v1 import matcher_pb2, matcher_pb2_grpc
from service.server import SERVICE_NAME, start_server
from tests import samples
from tests.cli_output import run_module
from tests.conftest import query_images

ROOT = Path(__file__).resolve().parent.parent
Health = health_pb2.HealthCheckResponse


async def test_not_serving_until_models_are_loaded(settings) -> None:
    running = await start_server(settings, make_core(settings))
    try:
        async with grpc.aio.insecure_channel(f"localhost:{running.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub = matcher_pb2_grpc.MatcherStub(channel)
            for name in ("", SERVICE_NAME):
                answer = await health.Check(health_pb2.HealthCheckRequest(service=name))
                assert answer.status == Health.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Match(matcher_pb2.ImageRequest(image=samples.jpeg()), timeout=30)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "not loaded" in caught.value.details()
            await running.load_models()
            answer = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
            assert answer.status == Health.SERVING
    finally:
        await running.stop(0)


def service_process(*flags: str) -> subprocess.Popen[str]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.Popen(
        # Metrics on a free port: the default 9464 may be taken on a shared machine.
        [sys.executable, "-m", "service", "--metrics-port", "0", *flags],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )


async def wait_for_port(process: subprocess.Popen[str]) -> tuple[int, list[str]]:
    """Read the log until the server says which port it listens on."""
    lines: list[str] = []
    while True:
        line = await asyncio.to_thread(process.stderr.readline)
        assert line, f"server exited early: {lines}"
        lines.append(line)
        if found := re.search(r"listening on \S+:(\d+)", line):
            return int(found.group(1)), lines


async def until_serving(channel: grpc.aio.Channel, within_s: float = 120) -> None:
    """Until the server reports SERVING, told by health `Watch` as its status changes (the
    models load after the port opens); `within_s` only fails a server that never gets there."""
    watch = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=within_s
    )
    try:
        async for answer in watch:
            if answer.status == Health.SERVING:
                return
    finally:
        watch.cancel()
    raise AssertionError("the health watch ended before the server was SERVING")


async def test_the_server_process_serves_then_stops_gracefully_on_sigterm(settings) -> None:
    process = service_process(
        "--port",
        "0",
        "--model-dir",
        str(settings.model_dir),
        "--classifier",
        str(settings.classifier),
        "--grace-s",
        "1",
    )
    try:
        port, _ = await wait_for_port(process)
        async with grpc.aio.insecure_channel(f"localhost:{port}") as channel:
            await until_serving(channel)
            stub = matcher_pb2_grpc.MatcherStub(channel)
            answer = await stub.Match(matcher_pb2.ImageRequest(image=samples.jpeg()), timeout=60)
            assert answer.matches
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 30)
        rest = await asyncio.to_thread(process.stderr.read)
        assert code == 0, rest
        assert "shutting down" in rest
    finally:
        process.kill()


async def test_a_missing_classifier_stops_the_server_with_one_line(settings, tmp_path) -> None:
    process = service_process(
        "--port",
        "0",
        "--model-dir",
        str(settings.model_dir),
        "--classifier",
        str(tmp_path / "missing.joblib"),
    )
    code = await asyncio.to_thread(process.wait, 120)
    log = process.stderr.read()
    assert code == 1
    errors = [line for line in log.splitlines() if " ERROR service." in line]
    assert len(errors) == 1 and "missing.joblib does not exist" in errors[0], log
    assert "Traceback" not in log


def test_a_bad_flag_is_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "--port", "70000"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "service: error: port: Input should be less than or equal to 65535"
    ]


def test_flags_fall_back_to_environment_variables() -> None:
    from service.config import load_settings

    env = {"MATCHER_PORT": "6000", "MATCHER_MAX_RECEIVE_BYTES": "1024"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        settings = load_settings(["--port", "7000"])
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    assert settings.port == 7000  # the flag wins
    assert settings.max_receive_bytes == 1024  # the variable fills in


async def run_client(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run_module, "service.client", *args)


async def test_client_prints_ranked_labels(target, demo) -> None:
    (label, first), (_, second) = query_images(demo)[:2]
    result = await run_client(str(first), str(second), "--top-k", "2", "--target", target)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(str(first))
    assert re.search(
        r"  (NO )?MATCH: nearest view -?\d\.\d{3}, threshold -?\d\.\d{3} \(\w+\)$", lines[0]
    )
    reference = r"  ~ \w+/[\w.@]+ -?\d\.\d{3} \((whole|crop \d\.\d\d,\d\.\d\d|turned \d+)\)"
    assert re.fullmatch(rf"\s+1\. \d\.\d{{4}}  {label}{reference}", lines[1]), lines[1]
    assert re.fullmatch(rf"\s+2\. \d\.\d{{4}}  \w+{reference}", lines[2]), lines[2]
    assert len(lines) == 6


async def test_client_reports_each_failure_on_one_line(target, tmp_path) -> None:
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    result = await run_client(str(bad), str(tmp_path / "missing.jpg"), "--target", target)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"client: error: {bad}: INVALID_ARGUMENT: bytes are not a recognised image (12 bytes); "
        "send JPEG, PNG, HEIC, WebP, GIF or BMP",
        f"client: error: {tmp_path / 'missing.jpg'}: No such file or directory",
    ]
