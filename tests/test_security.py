"""TLS, mutual TLS and bearer tokens, against real servers with certificates made on the spot.

Three servers, each started as tests/conftest.py starts one: TLS with a token (the default
exemptions), mutual TLS, and plaintext with a token where health needs it and reflection not.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from matcher.errors import ConfigurationError
from matcher.factory import make_core
from matcher.v1 import matcher_pb2, matcher_pb2_grpc
from service.config import Settings
from service.server import RunningServer, start_server
from tests import samples
from tests.certs import CertFiles, make_certs
from tests.cli_output import cli_stderr_lines, run_module
from tests.conftest import query_images
from tests.test_grpcurl import grpcurl

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "t0ken-for-tests_7f3a9c"
SERVING = health_pb2.HealthCheckResponse.SERVING
Code = grpc.StatusCode


def bearer(token: str = TOKEN) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secrets") / "token"
    path.write_text(TOKEN + "\n")  # as `echo TOKEN > file` writes it
    return path


@pytest.fixture(scope="module")
def base_settings(exported_model, trained) -> dict:
    return {
        "port": 0,
        "model_dir": exported_model.path.parent,
        "classifier": trained.classifier_path,
        "grace_s": 0.5,
        "metrics_port": -1,
        "reload_interval_s": 0,
    }


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[RunningServer]:
    running = await start_server(settings, make_core(settings))
    try:
        await running.load_models()
        yield running
    finally:
        await running.stop(0)


@pytest.fixture(scope="module")
async def tls_server(base_settings, certs, token_file) -> AsyncIterator[RunningServer]:
    """TLS and a token, with the default exemptions (health open, reflection not)."""
    settings = Settings(
        **base_settings,
        tls_cert=certs.server_cert,
        tls_key=certs.server_key,
        auth_token_file=token_file,
    )
    async with serving(settings) as running:
        yield running


@pytest.fixture(scope="module")
async def mtls_server(base_settings, certs) -> AsyncIterator[RunningServer]:
    settings = Settings(
        **base_settings,
        tls_cert=certs.server_cert,
        tls_key=certs.server_key,
        tls_client_ca=certs.ca,
    )
    async with serving(settings) as running:
        yield running


@pytest.fixture(scope="module")
async def strict_health_server(base_settings, token_file) -> AsyncIterator[RunningServer]:
    """Plaintext with a token that health checks need too and reflection does not."""
    settings = Settings(
        **base_settings,
        auth_token_file=token_file,
        health_requires_auth=True,
        reflection_requires_auth=False,
    )
    async with serving(settings) as running:
        yield running


def tls_channel(
    port: int, ca: Path, cert: Path | None = None, key: Path | None = None
) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
    return grpc.aio.secure_channel(f"localhost:{port}", credentials)


async def match(channel: grpc.aio.Channel, metadata=()) -> matcher_pb2.MatchResponse:
    stub = matcher_pb2_grpc.MatcherStub(channel)
    request = matcher_pb2.ImageRequest(image=samples.jpeg(), top_k=3)
    return await stub.Match(request, timeout=60, metadata=metadata)


async def refusal(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def list_services(channel: grpc.aio.Channel, metadata=(), method: str | None = None):
    """Reflection's list_services over its stream-stream method (v1alpha unless `method`)."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    info = stub.ServerReflectionInfo
    if method is not None:
        info = channel.stream_stream(
            method,
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = [r async for r in info(iter([request]), metadata=metadata, timeout=30)]
    return sorted(s.name for s in responses[0].list_services_response.service)


async def watch_first(channel: grpc.aio.Channel, metadata=()):
    """The first status Health/Watch (unary-stream) sends."""
    call = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=""), metadata=metadata, timeout=30
    )
    try:
        return (await call.read()).status
    finally:
        call.cancel()


# --- TLS ---


async def test_tls_match_works_with_the_ca_and_the_token(tls_server, certs) -> None:
    async with tls_channel(tls_server.port, certs.ca) as channel:
        answer = await match(channel, bearer())
    assert len(answer.matches) == 3


async def test_a_plaintext_client_cannot_talk_to_a_tls_server(tls_server) -> None:
    async with grpc.aio.insecure_channel(f"localhost:{tls_server.port}") as channel:
        error = await refusal(match(channel, bearer()))
    assert error.code() == Code.UNAVAILABLE


async def test_a_client_that_does_not_trust_the_ca_is_refused(tls_server, certs) -> None:
    async with tls_channel(tls_server.port, certs.other_ca) as channel:
        error = await refusal(match(channel, bearer()))
    assert error.code() == Code.UNAVAILABLE


async def test_mtls_needs_a_client_certificate_from_the_ca(mtls_server, certs) -> None:
    async with tls_channel(mtls_server.port, certs.ca) as channel:
        assert (await refusal(match(channel))).code() == Code.UNAVAILABLE
    async with tls_channel(
        mtls_server.port, certs.ca, certs.other_client_cert, certs.other_client_key
    ) as channel:
        assert (await refusal(match(channel))).code() == Code.UNAVAILABLE
    async with tls_channel(mtls_server.port, certs.ca, certs.client_cert, certs.client_key) as ch:
        assert len((await match(ch)).matches) == 3


# --- the bearer token ---


@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        ((), Code.UNAUTHENTICATED),
        ((("authorization", "Bearer"),), Code.UNAUTHENTICATED),
        ((("authorization", "Bearer "),), Code.UNAUTHENTICATED),
        ((("authorization", TOKEN),), Code.UNAUTHENTICATED),
        ((("authorization", "Basic dXNlcjpwYXNz"),), Code.UNAUTHENTICATED),
        ((("x-token", TOKEN),), Code.UNAUTHENTICATED),
        (bearer("wrong"), Code.PERMISSION_DENIED),
        (bearer(TOKEN[:-1]), Code.PERMISSION_DENIED),
        (bearer(TOKEN + "x"), Code.PERMISSION_DENIED),
        (bearer(TOKEN.upper()), Code.PERMISSION_DENIED),
        (bearer() + bearer("wrong"), Code.UNAUTHENTICATED),
        (bearer(), Code.OK),
        ((("authorization", f"bearer  {TOKEN}"),), Code.OK),
    ],
    ids=lambda value: value.name if isinstance(value, Code) else None,
)
async def test_the_token_is_checked(tls_server, certs, metadata, code) -> None:
    async with tls_channel(tls_server.port, certs.ca) as channel:
        if code == Code.OK:
            assert (await match(channel, metadata)).matches
            return
        error = await refusal(match(channel, metadata))
    assert error.code() == code
    assert error.details()
    assert TOKEN not in error.details() and TOKEN[:-1] not in error.details()
    sent = [word for _, value in metadata for word in value.split() if word != "Bearer"]
    assert not [word for word in sent if word in error.details()]


async def test_every_matcher_method_needs_the_token(tls_server, certs) -> None:
    async with tls_channel(tls_server.port, certs.ca) as channel:
        stub = matcher_pb2_grpc.MatcherStub(channel)
        request = matcher_pb2.ImageRequest(image=samples.jpeg())
        error = await refusal(stub.Embed(request, timeout=60))
        assert error.code() == Code.UNAUTHENTICATED
        error = await refusal(stub.GetModelInfo(matcher_pb2.GetModelInfoRequest(), timeout=60))
        assert error.code() == Code.UNAUTHENTICATED
        info = await stub.GetModelInfo(matcher_pb2.GetModelInfoRequest(), metadata=bearer())
        assert info.labels


async def test_unknown_methods_are_refused_before_they_are_looked_up(tls_server, certs) -> None:
    async with tls_channel(tls_server.port, certs.ca) as channel:
        call = channel.unary_unary("/matcher.v1.Matcher/NoSuchMethod")
        assert (await refusal(call(b"", timeout=30))).code() == Code.UNAUTHENTICATED
        error = await refusal(call(b"", timeout=30, metadata=bearer()))
        assert error.code() == Code.UNIMPLEMENTED


async def test_refusals_are_logged_without_the_token(tls_server, certs, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    async with tls_channel(tls_server.port, certs.ca) as channel:
        await refusal(match(channel, bearer(TOKEN + "x")))
        await refusal(match(channel))
    assert "PERMISSION_DENIED" in caplog.text and "UNAUTHENTICATED" in caplog.text
    assert TOKEN not in caplog.text


async def test_the_server_keeps_serving_after_refusals(tls_server, certs) -> None:
    async with tls_channel(tls_server.port, certs.ca) as channel:
        refused = await asyncio.gather(
            *(match(channel, bearer(f"guess-{i}")) for i in range(10)),
            *(match(channel) for _ in range(10)),
            return_exceptions=True,
        )
        codes = {error.code() for error in refused}
        assert codes == {Code.PERMISSION_DENIED, Code.UNAUTHENTICATED}
        assert (await match(channel, bearer())).matches
        health = health_pb2_grpc.HealthStub(channel)
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == SERVING


# --- health and reflection ---


async def test_health_is_exempt_by_default(tls_server, certs) -> None:
    async with tls_channel(tls_server.port, certs.ca) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert (await health.Check(health_pb2.HealthCheckRequest(), timeout=30)).status == SERVING
        assert await watch_first(channel) == SERVING


async def test_reflection_needs_the_token_by_default(tls_server, certs) -> None:
    async with tls_channel(tls_server.port, certs.ca) as channel:
        assert (await refusal(list_services(channel))).code() == Code.UNAUTHENTICATED
        wrong = await refusal(list_services(channel, bearer("wrong")))
        assert wrong.code() == Code.PERMISSION_DENIED
        assert "matcher.v1.Matcher" in await list_services(channel, bearer())
        # The v1 name is guarded too, though this server answers only v1alpha.
        v1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        error = await refusal(list_services(channel, method=v1))
        assert error.code() == Code.UNAUTHENTICATED


async def test_health_can_require_the_token(strict_health_server) -> None:
    async with grpc.aio.insecure_channel(f"localhost:{strict_health_server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest()
        assert (await refusal(health.Check(request))).code() == Code.UNAUTHENTICATED
        assert (await refusal(watch_first(channel))).code() == Code.UNAUTHENTICATED
        assert (await health.Check(request, metadata=bearer())).status == SERVING
        assert await watch_first(channel, bearer()) == SERVING


async def test_reflection_can_be_exempt(strict_health_server) -> None:
    async with grpc.aio.insecure_channel(f"localhost:{strict_health_server.port}") as channel:
        assert "matcher.v1.Matcher" in await list_services(channel)
        assert (await refusal(match(channel))).code() == Code.UNAUTHENTICATED


# --- the command-line client and grpcurl ---


async def run_client(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run_module, "service.client", *args)


async def test_the_cli_client_speaks_tls_and_sends_the_token(
    tls_server, certs, token_file, demo
) -> None:
    label, image = query_images(demo)[0]
    target = ["--target", f"localhost:{tls_server.port}", "--tls-ca", str(certs.ca)]
    result = await run_client(str(image), *target, "--token-file", str(token_file))
    assert result.returncode == 0, result.stderr
    assert f"  {label}  ~ {label}/" in result.stdout.splitlines()[1]
    result = await run_client(str(image), *target)
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"client: error: {image}: UNAUTHENTICATED: ")
    assert "authorization: Bearer <token>" in line


async def test_the_cli_client_presents_its_certificate(mtls_server, certs, demo) -> None:
    _, image = query_images(demo)[0]
    args = ["--target", f"localhost:{mtls_server.port}", "--tls-ca", str(certs.ca)]
    mutual = ["--tls-cert", str(certs.client_cert), "--tls-key", str(certs.client_key)]
    result = await run_client(str(image), *args, *mutual, "--timeout", "30")
    assert result.returncode == 0, result.stderr
    result = await run_client(str(image), *args, "--timeout", "30")
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr


async def test_grpcurl_with_the_ca_and_the_token(tls_server, certs, demo) -> None:
    target = f"localhost:{tls_server.port}"
    header = f"authorization: Bearer {TOKEN}"
    result = await grpcurl("-cacert", str(certs.ca), "-H", header, target, "list")
    assert result.returncode == 0, result.stderr
    assert "matcher.v1.Matcher" in result.stdout.split()
    label, path = query_images(demo)[0]
    body = json.dumps({"image": base64.b64encode(path.read_bytes()).decode(), "top_k": 1})
    result = await grpcurl(
        "-cacert", str(certs.ca), "-H", header, "-d", body, target, "matcher.v1.Matcher/Match"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["matches"][0]["label"] == label
    result = await grpcurl("-cacert", str(certs.ca), target, "list")
    assert result.returncode != 0
    assert "Unauthenticated" in result.stdout + result.stderr


async def test_grpcurl_with_a_client_certificate(mtls_server, certs) -> None:
    target = f"localhost:{mtls_server.port}"
    ca, cert, key = str(certs.ca), str(certs.client_cert), str(certs.client_key)
    result = await grpcurl("-cacert", ca, "-cert", cert, "-key", key, target, "list")
    assert result.returncode == 0, result.stderr
    assert "matcher.v1.Matcher" in result.stdout.split()
    result = await grpcurl("-cacert", ca, target, "list")
    assert result.returncode != 0


# --- settings that cannot work ---


def bad_settings(certs: CertFiles, folder: Path) -> dict[str, tuple[dict, str]]:
    """name -> (security settings, what the error must say)."""
    empty, spaced, garbage = folder / "empty", folder / "spaced", folder / "garbage.pem"
    empty.write_text("\n")
    spaced.write_text("two words\n")
    garbage.write_text("not a certificate\n")
    pair = {"tls_cert": certs.server_cert, "tls_key": certs.server_key}
    return {
        "cert without key": ({"tls_cert": certs.server_cert}, "--tls-cert and --tls-key go"),
        "key without cert": ({"tls_key": certs.server_key}, "--tls-cert and --tls-key go"),
        "client CA without TLS": ({"tls_client_ca": certs.ca}, "--tls-client-ca needs TLS"),
        "missing cert": (
            {**pair, "tls_cert": folder / "nope.pem"},
            f"cannot read --tls-cert {folder / 'nope.pem'}: No such file or directory",
        ),
        "cert is not PEM": ({**pair, "tls_cert": garbage}, "holds no PEM certificate"),
        "key of another cert": (
            {**pair, "tls_key": certs.client_key},
            f"--tls-key {certs.client_key} does not match the certificate",
        ),
        "key is not a key": ({**pair, "tls_key": garbage}, "is not a PEM private key"),
        "client CA is not PEM": (
            {**pair, "tls_client_ca": garbage},
            f"--tls-client-ca {garbage} holds no PEM certificate",
        ),
        "missing token file": (
            {"auth_token_file": folder / "no-token"},
            f"cannot read --auth-token-file {folder / 'no-token'}",
        ),
        "empty token file": ({"auth_token_file": empty}, f"--auth-token-file {empty} is empty"),
        "token with a space": ({"auth_token_file": spaced}, "without spaces"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "cert without key",
        "key without cert",
        "client CA without TLS",
        "missing cert",
        "cert is not PEM",
        "key of another cert",
        "key is not a key",
        "client CA is not PEM",
        "missing token file",
        "empty token file",
        "token with a space",
    ],
)
async def test_bad_security_settings_refuse_to_start(base_settings, certs, tmp_path, case) -> None:
    security, expected = bad_settings(certs, tmp_path)[case]
    settings = Settings(**base_settings, **security)
    with pytest.raises(ConfigurationError) as caught:
        await start_server(settings, make_core(settings))
    assert expected in str(caught.value)
    assert "two words" not in str(caught.value)  # a token is never shown, even a bad one


def test_the_server_process_exits_1_with_one_readable_line(certs) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "--port", "0", "--tls-cert", str(certs.server_cert)],
        cwd=ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in cli_stderr_lines(result) if " ERROR " in line]
    assert len(errors) == 1, result.stderr
    assert errors[0].endswith(
        "cannot serve: --tls-cert and --tls-key go together: set both or neither"
    )


async def run_load_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run_module, "bench.load", *args)


async def test_the_load_generator_speaks_tls_and_sends_the_token(
    tls_server, mtls_server, certs, token_file, demo
) -> None:
    _, image = query_images(demo)[0]
    load = ["--image", str(image), "--total", "4", "--concurrency", "2", "--tls-ca", str(certs.ca)]
    result = await run_load_cli(
        "--target", f"localhost:{tls_server.port}", *load, "--token-file", str(token_file)
    )
    assert result.returncode == 0, result.stderr
    assert "[OK]   4 responses" in result.stdout
    result = await run_load_cli("--target", f"localhost:{tls_server.port}", *load)
    assert "[Unauthenticated]   4 responses" in result.stdout
    mutual = ["--cert", str(certs.client_cert), "--key", str(certs.client_key)]  # ghz's names
    result = await run_load_cli("--target", f"localhost:{mtls_server.port}", *load, *mutual)
    assert "[OK]   4 responses" in result.stdout, result.stdout + result.stderr
