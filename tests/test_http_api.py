"""The HTTP/JSON API: the real server on free ports, called with a real HTTP client (aiohttp),
answers compared with the same server's gRPC answers (one contract: the protobuf JSON mapping),
errors, limits, token and TLS as gRPC's, requests counted in the same metrics, the OpenAPI
document checked against the live answers."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import grpc
import numpy as np
import pytest
from aiohttp import web
from google.protobuf import json_format
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from matcher.dataset import images_in
from matcher.factory import make_core
from matcher.v1 import matcher_pb2
from service.config import Settings
from service.http_api import HttpApi
from service.server import RunningServer, start_server
from tests.certs import make_certs
from tests.conftest import query_images
from tests.test_observability import scrape, value

MATCH = "/matcher.v1.Matcher/Match"
TOKEN = "http-t0ken_5d1e"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def url(running: RunningServer, path: str, scheme: str = "http") -> str:
    return f"{scheme}://localhost:{running.http_port}{path}"


@pytest.fixture(scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session


@asynccontextmanager
async def serving(settings: Settings, load: bool = True) -> AsyncIterator[RunningServer]:
    running = await start_server(settings, make_core(settings))
    try:
        if load:
            await running.load_models()
        yield running
    finally:
        await running.stop(0)


def form(path: Path, **options: str) -> aiohttp.FormData:
    data = aiohttp.FormData()
    data.add_field("image", path.read_bytes(), filename=path.name, content_type="image/jpeg")
    for key, option in options.items():
        data.add_field(key, option)
    return data


async def post_match(http, running, path: Path, **options: str) -> tuple[int, dict]:
    async with http.post(url(running, "/v1/match"), data=form(path, **options)) as response:
        return response.status, await response.json()


def validator(document: dict, schema: str) -> Draft202012Validator:
    """A JSON Schema validator for one component of the OpenAPI document, refs resolved."""
    resource = Resource.from_contents(document, default_specification=DRAFT202012)
    registry = Registry().with_resource("urn:openapi", resource)
    return Draft202012Validator(
        {"$ref": f"urn:openapi#/components/schemas/{schema}"}, registry=registry
    )


# --- answers: the same as gRPC's ---


async def test_match_by_multipart_ranks_a_demo_query_first_as_grpc_does(http, server, stub, demo):
    for label, path in query_images(demo)[::7]:
        status, body = await post_match(http, server, path, top_k="3")
        assert status == 200, body
        assert body["matches"][0]["label"] == label
        http_answer = json_format.ParseDict(body, matcher_pb2.MatchResponse())
        grpc_answer = await stub.Match(matcher_pb2.ImageRequest(image=path.read_bytes(), top_k=3))
        assert [m.label for m in http_answer.matches] == [m.label for m in grpc_answer.matches]
        assert [m.reference_id for m in http_answer.matches] == [
            m.reference_id for m in grpc_answer.matches
        ]
        assert http_answer.verdict == grpc_answer.verdict == matcher_pb2.MATCH
        assert http_answer.verdict_score == pytest.approx(grpc_answer.verdict_score, abs=1e-5)
        assert http_answer.model == grpc_answer.model
        # Every field is printed, zeros too: a client need not know proto3's defaults.
        assert {"matches", "model", "verdict", "verdictScore", "threshold", "views"} <= set(body)


async def test_match_by_json_and_by_raw_body_take_the_same_options(http, server, demo):
    label, path = query_images(demo)[0]
    request = {
        "image": base64.b64encode(path.read_bytes()).decode(),
        "topK": 2,
        "views": "VIEWS_WHOLE",
        "noMatchThreshold": 0.99,
        "minInliers": 0,  # no geometric check: the verdict is the similarity's alone
    }
    async with http.post(url(server, "/v1/match"), json=request) as response:
        by_json = await response.json()
    assert response.status == 200, by_json
    assert len(by_json["matches"]) == 2 and by_json["matches"][0]["label"] == label
    assert by_json["threshold"] == pytest.approx(0.99)
    assert by_json["verdict"] == "NO_MATCH"  # no photo is that similar to a catalogue view
    assert by_json["views"] == "VIEWS_WHOLE"
    assert "inliers" not in by_json["matches"][0]
    raw = url(server, "/v1/match?top_k=2&views=whole&no_match_threshold=0.99&min_inliers=0")
    headers = {"Content-Type": "image/jpeg"}
    async with http.post(raw, data=path.read_bytes(), headers=headers) as response:
        by_raw = await response.json()
    assert response.status == 200, by_raw
    assert [m["label"] for m in by_raw["matches"]] == [m["label"] for m in by_json["matches"]]
    assert by_raw["verdict"] == by_json["verdict"]


async def test_embed_and_model_info_equal_grpc(http, server, stub, demo):
    _, path = query_images(demo)[0]
    async with http.post(url(server, "/v1/embed"), data=form(path)) as response:
        body = await response.json()
    assert response.status == 200
    grpc_embed = await stub.Embed(matcher_pb2.ImageRequest(image=path.read_bytes()))
    np.testing.assert_allclose(body["features"], grpc_embed.features, rtol=1e-5, atol=1e-6)
    async with http.get(url(server, "/v1/model")) as response:
        info = json_format.ParseDict(await response.json(), matcher_pb2.ModelInfo())
    assert info == await stub.GetModelInfo(matcher_pb2.GetModelInfoRequest())


async def test_reference_images_as_jpeg_and_as_json(http, server, stub, demo):
    _, path = query_images(demo)[0]
    _, answer = await post_match(http, server, path, top_k="1")
    reference_id = answer["matches"][0]["referenceId"]
    assert "/" in reference_id  # ids are <label>/<photo>: the route keeps the slash
    async with http.get(url(server, f"/v1/references/{reference_id}")) as response:
        image = await response.read()
        assert response.status == 200 and response.content_type == "image/jpeg"
    expected = await stub.GetReference(matcher_pb2.GetReferenceRequest(reference_id=reference_id))
    assert image == expected.image
    headers = {"Accept": "application/json"}
    async with http.get(url(server, f"/v1/references/{reference_id}"), headers=headers) as r:
        as_json = json_format.ParseDict(await r.json(), matcher_pb2.Reference())
    assert as_json == expected
    async with http.get(url(server, "/v1/references/nothing/here.jpg")) as response:
        body = await response.json()
    assert response.status == 404 and body["error"]["status"] == "NOT_FOUND"
    assert "no reference view 'nothing/here.jpg'" in body["error"]["message"]


# --- errors: the same status and message as gRPC, and the server keeps serving ---


async def test_bad_input_gets_400_with_grpcs_message(http, server, stub, demo):
    not_an_image = Path(__file__)
    status, body = await post_match(http, server, not_an_image)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Match(matcher_pb2.ImageRequest(image=not_an_image.read_bytes()))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert status == 400
    assert body["error"] == {
        "code": 400,
        "status": "INVALID_ARGUMENT",
        "message": refused.value.details(),
    }
    _, path = query_images(demo)[0]
    cases = {
        "top_k": ("-1", "top_k must be a whole number >= 0, not '-1'"),
        "views": ("sideways", "views must be whole, crops or crops_rotations, not 'sideways'"),
        "no_match_threshold": ("1.5", "no_match_threshold 1.5 is not a similarity in [-1, 1]"),
        "min_inliers": ("-3", "min_inliers must be a whole number >= 0, not '-3'"),
    }
    for option, (bad, message) in cases.items():
        status, body = await post_match(http, server, path, **{option: bad})
        assert (status, body["error"]["message"]) == (400, message)
    async with http.post(url(server, "/v1/match"), json={"image": "not base64!"}) as response:
        body = await response.json()
    assert response.status == 400 and "not an ImageRequest" in body["error"]["message"]
    async with http.post(
        url(server, "/v1/match"), data=b"x", headers={"Content-Type": "text/plain"}
    ) as r:
        body = await r.json()
    assert r.status == 415 and "unsupported Content-Type 'text/plain'" in body["error"]["message"]
    async with http.post(url(server, "/v1/match"), data=aiohttp.FormData({"top_k": "1"})) as r:
        body = await r.json()
    assert r.status == 400 and 'file field "image"' in body["error"]["message"]
    async with http.get(url(server, "/v1/nothing")) as response:
        assert response.status == 404
        assert (await response.json())["error"]["status"] == "NOT_FOUND"
    status, body = await post_match(http, server, path)
    assert status == 200  # still serving


async def test_a_body_over_the_limit_gets_413_and_the_server_keeps_serving(
    http, server, settings, demo
):
    limit = settings.max_receive_bytes
    data = aiohttp.FormData()
    data.add_field("image", b"\xff" * (limit + 1), filename="big.jpg")
    async with http.post(url(server, "/v1/match"), data=data) as response:
        body = await response.json()
    assert response.status == 413
    assert body["error"]["message"] == (
        f"the request body is larger than {limit} bytes (--max-receive-bytes)"
    )
    status, _ = await post_match(http, server, query_images(demo)[0][1])
    assert status == 200


async def test_readiness_follows_the_models_and_calls_before_them_get_503(http, settings):
    async with serving(settings, load=False) as running:
        async with http.get(url(running, "/healthz")) as response:
            assert response.status == 200
        async with http.get(url(running, "/readyz")) as response:
            body = await response.json()
            assert response.status == 503 and body["error"]["status"] == "UNAVAILABLE"
        async with http.get(url(running, "/v1/model")) as response:
            assert response.status == 503
        await running.load_models()
        async with http.get(url(running, "/readyz")) as response:
            assert response.status == 200


class SlotSpy:
    """Tells when a request takes a --max-concurrent-rpcs slot and when it gives it back: a
    spy around the API's limit (`_limited`, which counts `in_flight`), so that a test waits
    for the request itself instead of polling the count."""

    def __init__(self, api: HttpApi, monkeypatch: pytest.MonkeyPatch) -> None:
        self.taken = asyncio.Event()
        self.given_back = asyncio.Event()
        limited = api._limited

        async def spied(request: web.Request, handler: Handler, route: str) -> web.StreamResponse:
            admitted = False

            async def inside(request: web.Request) -> web.StreamResponse:
                nonlocal admitted
                admitted = True  # past the limit: `in_flight` counts this request
                self.taken.set()
                return await handler(request)

            try:
                return await limited(request, inside, route)
            finally:
                if admitted:  # `in_flight` no longer counts it
                    self.given_back.set()

        monkeypatch.setattr(api, "_limited", spied)


async def test_too_many_requests_at_once_get_429(http, settings, demo, monkeypatch):
    """One request holds the only slot (its body not yet sent); the next is refused."""
    async with serving(settings.model_copy(update={"max_concurrent_rpcs": 1})) as running:
        api = running.http_endpoint.api
        slot = SlotSpy(api, monkeypatch)
        _, writer = await asyncio.open_connection("127.0.0.1", running.http_port)
        writer.write(
            b"POST /v1/match HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            b"Content-Length: 1000\r\n\r\n" + b"\xff" * 10
        )
        await writer.drain()
        # The handler is waiting for the rest of the body (60 s only fail a hung test).
        async with asyncio.timeout(60):
            await slot.taken.wait()
        assert api.in_flight == 1
        status, body = await post_match(http, running, query_images(demo)[0][1])
        assert status == 429 and body["error"]["status"] == "RESOURCE_EXHAUSTED"
        assert "--max-concurrent-rpcs" in body["error"]["message"]
        writer.close()
        await writer.wait_closed()
        async with asyncio.timeout(60):  # the server hears of the closed connection
            await slot.given_back.wait()
        assert api.in_flight == 0
        status, _ = await post_match(http, running, query_images(demo)[0][1])
        assert status == 200


# --- metrics, request ids, the document ---


async def test_http_requests_are_counted_in_the_same_metrics(http, server, demo):
    before = scrape(server.metrics_port)
    await post_match(http, server, query_images(demo)[0][1])
    await post_match(http, server, Path(__file__))
    after = scrape(server.metrics_port)
    for code in ("OK", "INVALID_ARGUMENT"):
        labels = {"method": MATCH, "code": code, "transport": "http"}
        assert (
            value(after, "matcher_requests_total", **labels)
            - value(before, "matcher_requests_total", **labels)
            == 1
        )


async def test_request_ids_are_kept_or_made(http, server):
    headers = {"x-request-id": "field-test-42"}
    async with http.get(url(server, "/v1/model"), headers=headers) as response:
        assert response.headers["x-request-id"] == "field-test-42"
    async with http.get(url(server, "/v1/model")) as response:
        assert len(response.headers["x-request-id"]) == 32


async def test_the_openapi_document_is_valid_and_describes_the_live_answers(http, server, demo):
    async with http.get(url(server, "/openapi.json")) as response:
        document = await response.json()
    validate_openapi(document)
    routes = {
        resource.canonical
        for resource in server.http_endpoint.api.app.router.resources()
        if not resource.canonical.startswith("/static")
    }
    assert routes == set(document["paths"])
    _, path = query_images(demo)[0]
    _, answer = await post_match(http, server, path)
    validator(document, "MatchResponse").validate(answer)
    async with http.post(url(server, "/v1/embed"), data=form(path)) as response:
        validator(document, "EmbedResponse").validate(await response.json())
    async with http.get(url(server, "/v1/model")) as response:
        validator(document, "ModelInfo").validate(await response.json())
    _, error = await post_match(http, server, Path(__file__))
    validator(document, "Error").validate(error)
    # A field the protos do not declare is refused: the schemas are the protos'.
    with pytest.raises(Exception, match="Additional properties"):
        validator(document, "MatchResponse").validate({**answer, "extra": 1})


# --- the page's feedback ---


async def test_feedback_saves_the_photo_as_a_view_for_matcher_train_add(
    http, settings, demo, tmp_path
):
    feedback = tmp_path / "feedback"
    label, path = query_images(demo)[0]
    async with serving(settings.model_copy(update={"feedback_dir": feedback})) as running:
        async with http.get(url(running, "/v1/feedback")) as response:
            assert await response.json() == {"enabled": True}
        data = form(path, label=label, answer=label, verdict="MATCH")
        async with http.post(url(running, "/v1/feedback"), data=data) as response:
            saved = await response.json()
        assert response.status == 200, saved
        assert saved["label"] == label and saved["saved"].startswith(f"{label}/")
        assert (feedback / saved["saved"]).read_bytes() == path.read_bytes()
        assert images_in(feedback / label) == [feedback / saved["saved"]]
        (entry,) = [
            json.loads(line) for line in (feedback / "feedback.jsonl").read_text().splitlines()
        ]
        assert entry["photo"] == saved["saved"] and entry["answer"] == label
        data = form(path, label="../../etc")
        async with http.post(url(running, "/v1/feedback"), data=data) as response:
            body = await response.json()
        assert response.status == 400 and "is not a catalogue label" in body["error"]["message"]
        bad = form(Path(__file__), label=label)
        async with http.post(url(running, "/v1/feedback"), data=bad) as response:
            assert response.status == 400
        assert sorted(p.name for p in feedback.iterdir()) == sorted(["feedback.jsonl", label])


async def test_feedback_is_off_by_default(http, server, demo):
    label, path = query_images(demo)[0]
    async with http.get(url(server, "/v1/feedback")) as response:
        assert await response.json() == {"enabled": False}
    async with http.post(url(server, "/v1/feedback"), data=form(path, label=label)) as response:
        body = await response.json()
    assert response.status == 404 and "--feedback-dir" in body["error"]["message"]


# --- token, TLS, ports ---


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("http-certs"))


async def test_token_and_tls_as_for_grpc(settings, certs, tmp_path, demo):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    secured = settings.model_copy(
        update={
            "tls_cert": certs.server_cert,
            "tls_key": certs.server_key,
            "auth_token_file": token_file,
        }
    )
    context = ssl.create_default_context(cafile=certs.ca)
    label, path = query_images(demo)[0]
    async with (
        serving(secured) as running,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as https,
    ):

        async def status_of(
            method: str, route: str, token: str | None, **kwargs
        ) -> tuple[int, dict]:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            async with https.request(
                method, url(running, route, "https"), headers=headers, **kwargs
            ) as r:
                body = await r.json() if r.content_type == "application/json" else {}
                return r.status, body

        status, body = await status_of("POST", "/v1/match", None, data=form(path))
        assert status == 401 and body["error"]["status"] == "UNAUTHENTICATED"
        assert "bearer token" in body["error"]["message"]
        status, body = await status_of("GET", "/v1/model", TOKEN + "x")
        assert status == 403 and body["error"]["message"] == "the bearer token is not valid"
        status, body = await status_of("POST", "/v1/feedback", None, data=form(path, label=label))
        assert status == 401  # feedback too: it writes files
        status, body = await status_of("POST", "/v1/match", TOKEN, data=form(path))
        assert status == 200 and body["matches"][0]["label"] == label
        # Probes and the page need no token (as gRPC health, by default).
        for route in ("/healthz", "/readyz", "/", "/static/app.js", "/openapi.json"):
            assert (await status_of("GET", route, None))[0] == 200, route
        # Plain HTTP on the TLS port gets no answer.
        async with aiohttp.ClientSession() as plain:
            with pytest.raises(aiohttp.ClientError):
                async with plain.get(url(running, "/healthz")):
                    pass


async def test_mutual_tls_asks_every_http_client_for_a_certificate(settings, certs, demo):
    mutual = settings.model_copy(
        update={
            "tls_cert": certs.server_cert,
            "tls_key": certs.server_key,
            "tls_client_ca": certs.ca,
        }
    )
    async with serving(mutual, load=False) as running:
        without = ssl.create_default_context(cafile=certs.ca)
        with_cert = ssl.create_default_context(cafile=certs.ca)
        with_cert.load_cert_chain(certs.client_cert, certs.client_key)
        async with aiohttp.ClientSession() as https:
            with pytest.raises(aiohttp.ClientError):
                async with https.get(url(running, "/healthz", "https"), ssl=without) as r:
                    await r.read()
            async with https.get(url(running, "/healthz", "https"), ssl=with_cert) as r:
                assert r.status == 200


async def test_http_off_and_a_taken_http_port(settings, server):
    async with serving(settings.model_copy(update={"http_port": -1}), load=False) as running:
        assert running.http_port is None
    taken = settings.model_copy(update={"http_port": server.http_port})
    with pytest.raises(OSError, match=f"cannot serve HTTP on localhost:{server.http_port}"):
        await start_server(taken, make_core(taken))


# --- the README's examples ---


def readme_curl_commands() -> list[str]:
    """The `$ curl ...` commands of the README's HTTP section, continuation lines joined."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("\n## HTTP/JSON API\n", 1)[1].split("\n## ", 1)[0]
    commands, current = [], ""
    for line in section.splitlines():
        if line.startswith("$ curl") or current:
            current += line.removeprefix("$ ").strip()
            if current.endswith("\\"):
                current = current[:-1] + " "
                continue
            commands.append(current)
            current = ""
    return commands


async def test_the_readmes_curl_commands_work(server, demo, tmp_path):
    curl = shutil.which("curl")
    assert curl, "curl is needed: `apt-get install curl` (make test installs it as root)"
    commands = readme_curl_commands()
    assert len(commands) >= 6
    reference = None  # the README's id, from its catalogue, is replaced by one of this one's
    for command in commands:
        if "Bearer" in command:  # needs a server with a token: test_token_and_tls_as_for_grpc
            continue
        local = command.replace("localhost:8080", f"localhost:{server.http_port}").replace(
            "data/demo", str(demo.out)
        )
        local = local.replace("-o reference.jpg", f"-o {tmp_path / 'reference.jpg'}")
        if reference is not None:
            local = re.sub(r"/v1/references/\S+", f"/v1/references/{reference}", local)
        result = await asyncio.to_thread(
            subprocess.run,
            ["bash", "-c", local.replace("curl ", "curl -sS ", 1)],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,  # for README.md
            timeout=120,
        )
        assert result.returncode == 0, (command, result.stderr)
        if "-o reference.jpg" in command:
            assert (tmp_path / "reference.jpg").read_bytes()[:2] == b"\xff\xd8"
            continue
        body = json.loads(result.stdout)
        if "README.md" in command:
            assert body["error"]["status"] == "INVALID_ARGUMENT"
        elif "/v1/match" in command:
            expected = "rocket" if "rocket" in command else "chelsea"
            assert body["matches"][0]["label"] == expected, command
            reference = reference or body["matches"][0]["referenceId"]
        else:
            assert body == {"status": "ready"}
