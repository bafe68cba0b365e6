"""Observability against a real server: /metrics scraped over HTTP, request ids in call
metadata and in log records (text and JSON)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from matcher import metrics
from matcher.batcher import BatchingOptions, DynamicBatcher
from matcher.factory import make_core
from matcher.v1 import matcher_pb2, matcher_pb2_grpc
from service import logs, observability
from service.server import RunningServer, start_server
from tests import kustomize, samples
from tests.test_grpcurl import grpcurl

MATCH = "/matcher.v1.Matcher/Match"
CHECK = "/grpc.health.v1.Health/Check"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
GENERATED_ID = re.compile(r"[0-9a-f]{32}")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
async def running(settings) -> AsyncIterator[RunningServer]:
    """This module's own server, so that the models-loaded gauge is about it."""
    config = settings.model_copy(update={"metrics_port": 0})
    server = await start_server(config, make_core(config))
    await server.load_models()
    yield server
    await server.stop(0)


@pytest.fixture(scope="module")
async def stub(running) -> AsyncIterator[matcher_pb2_grpc.MatcherStub]:
    async with grpc.aio.insecure_channel(f"localhost:{running.port}") as channel:
        yield matcher_pb2_grpc.MatcherStub(channel)


def scrape(port: int | None) -> Samples:
    """Every sample the /metrics endpoint serves, by name and labels."""
    assert port is not None
    with urllib.request.urlopen(f"http://localhost:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def series(samples: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


async def match(stub, image: bytes, request_id: str | None = None) -> grpc.aio.Metadata:
    """Call Match; the trailing metadata, whatever the status."""
    metadata = (("x-request-id", request_id),) if request_id is not None else ()
    call = stub.Match(matcher_pb2.ImageRequest(image=image, top_k=1), metadata=metadata, timeout=60)
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.trailing_metadata()
    return await call.trailing_metadata()


def returned_id(trailing: Any) -> str:
    [request_id] = [v for k, v in trailing if k == "x-request-id"]
    return request_id


# ---- metrics ---------------------------------------------------------------------------------


async def test_calls_are_counted_by_method_and_status_code(running, stub) -> None:
    before = scrape(running.metrics_port)
    for _ in range(2):
        await match(stub, samples.jpeg())
    for _ in range(3):
        await match(stub, b"not an image")
    after = scrape(running.metrics_port)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("matcher_requests_total", method=MATCH, code="OK", transport="grpc") == 2
    assert (
        delta("matcher_requests_total", method=MATCH, code="INVALID_ARGUMENT", transport="grpc")
        == 3
    )
    assert delta("matcher_request_duration_seconds_count", method=MATCH, transport="grpc") == 5
    assert (
        delta("matcher_request_duration_seconds_bucket", method=MATCH, le="+Inf", transport="grpc")
        == 5
    )
    assert delta("matcher_request_duration_seconds_sum", method=MATCH, transport="grpc") > 0
    # One call at a time: each good image is a batch of one; bad ones never reach the model.
    assert delta("matcher_batch_size_count") == 2
    assert delta("matcher_batch_size_sum") == 2
    assert delta("matcher_batch_size_bucket", le="1.0") == 2
    assert delta("matcher_backend_duration_seconds_count", backend="embedded") == 2
    assert delta("matcher_backend_duration_seconds_sum", backend="embedded") > 0
    assert value(after, "matcher_queue_depth") == 0


async def test_health_checks_and_reflection_streams_are_counted(running) -> None:
    before = scrape(running.metrics_port)
    async with grpc.aio.insecure_channel(f"localhost:{running.port}") as channel:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        call = reflection.ServerReflectionInfo(iter([request]))
        answers = [answer async for answer in call]
        assert answers[0].list_services_response.service
        assert GENERATED_ID.fullmatch(returned_id(await call.trailing_metadata()))
    after = scrape(running.metrics_port)
    for method in (CHECK, REFLECTION):
        counted = value(after, "matcher_requests_total", method=method, code="OK", transport="grpc")
        assert (
            counted
            - value(before, "matcher_requests_total", method=method, code="OK", transport="grpc")
            == 1
        )


async def test_models_loaded_shows_only_the_models_served(running, trained) -> None:
    metrics.record_models_loaded("some_other_backbone", 9, "0" * 64)
    await running.load_models()
    loaded = series(scrape(running.metrics_port), "matcher_models_loaded")
    expected = {
        "backbone": "efficientnet_lite0",
        "version": "1",
        "classifier_sha256": trained.report["classifier"]["sha256"],
    }
    assert loaded == {tuple(sorted(expected.items())): 1.0}


async def test_the_engine_and_its_precision_are_shown(running) -> None:
    metrics.record_engine("tensorflow", "bf16")  # what an earlier model ran with
    await running.load_models()
    engine = series(scrape(running.metrics_port), "matcher_engine")
    assert engine == {(("engine", "openvino"), ("precision", "fp32")): 1.0}


async def test_reload_failures_are_counted_per_model(running) -> None:
    before = scrape(running.metrics_port)
    assert ("matcher_reload_failures_total", (("model", "backbone"),)) in before
    metrics.record_reload_failure("classifier", "sha256 mismatch")
    after = scrape(running.metrics_port)
    for model, moved in (("classifier", 1), ("backbone", 0)):
        name = "matcher_reload_failures_total"
        assert value(after, name, model=model) - value(before, name, model=model) == moved


async def test_metrics_off_and_a_taken_metrics_port(running, settings) -> None:
    off = settings.model_copy(update={"metrics_port": -1})
    server = await start_server(off, make_core(off))
    try:
        assert server.metrics_port is None
    finally:
        await server.stop(0)
    taken = settings.model_copy(update={"metrics_port": running.metrics_port})
    with pytest.raises(OSError, match=f"cannot serve metrics on localhost:{running.metrics_port}"):
        await start_server(taken, make_core(taken))


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_the_pods_are_scraped_where_the_matcher_serves_metrics(overlay: str) -> None:
    objects = kustomize.build(Path(__file__).parent.parent / "deploy/k8s/overlays" / overlay)
    [deployment] = [
        o for o in objects if (o["kind"], o["metadata"]["name"]) == ("Deployment", "matcher")
    ]
    [service] = [o for o in objects if (o["kind"], o["metadata"]["name"]) == ("Service", "matcher")]
    [config] = [o for o in objects if o["metadata"]["name"].startswith("matcher-config")]
    template = deployment["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    port = config["data"]["MATCHER_METRICS_PORT"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert (annotations["prometheus.io/port"], annotations["prometheus.io/path"]) == (
        port,
        "/metrics",
    )
    [matcher] = [c for c in template["spec"]["containers"] if c["name"] == "matcher"]
    ports = {p["name"]: p["containerPort"] for p in matcher["ports"]}
    assert ports["http-metrics"] == int(port)
    assert {
        "name": "http-metrics",
        "port": int(port),
        "targetPort": "http-metrics",
        "protocol": "TCP",
    } in service["spec"]["ports"]


# ---- request ids -----------------------------------------------------------------------------


@pytest.mark.parametrize("image", [samples.jpeg(), b"not an image"], ids=["ok", "invalid"])
async def test_the_clients_request_id_comes_back(stub, image: bytes) -> None:
    assert returned_id(await match(stub, image, "req-42 from checkout")) == "req-42 from checkout"


async def test_grpcurl_sends_a_request_id_and_sees_it_in_the_trailers(running) -> None:
    """The README's way: -H sends it; -v shows the trailers, on an error status too."""
    result = await grpcurl(
        "-plaintext",
        "-v",
        "-H",
        "x-request-id: checkout-7f3a",
        "-d",
        '{"image": "bm9wZQ=="}',
        f"localhost:{running.port}",
        "matcher.v1.Matcher/Match",
    )
    assert "InvalidArgument" in result.stdout + result.stderr
    trailers = (result.stdout + result.stderr).split("Response trailers received:")[1]
    assert "x-request-id: checkout-7f3a" in trailers


@pytest.mark.parametrize("sent", [None, "", "x" * 129], ids=["absent", "empty", "too-long"])
async def test_a_missing_or_unusable_request_id_is_replaced(stub, sent: str | None) -> None:
    returned = returned_id(await match(stub, samples.jpeg(), sent))
    assert GENERATED_ID.fullmatch(returned)
    assert returned != returned_id(await match(stub, samples.jpeg(), sent))


@pytest.mark.parametrize(
    "metadata, kept",
    [
        ((("x-request-id", "abc"),), "abc"),
        ((("x-request-id", "~" * 128),), "~" * 128),
        ((("x-request-id", "a\tb"),), None),
        ((("x-request-id", "caf\u00e9"),), None),
        ((("x-request-id", b"bytes"),), None),
        ((("other", "abc"),), None),
        (None, None),
    ],
)
def test_request_id_validation(metadata: Any, kept: str | None) -> None:
    request_id = observability.request_id_from(metadata)
    if kept is None:
        assert GENERATED_ID.fullmatch(request_id)
    else:
        assert request_id == kept


async def test_each_call_logs_one_access_line_with_its_request_id(stub, caplog) -> None:
    caplog.set_level(logging.INFO, logger="service.access")
    caplog.handler.addFilter(logs.RequestIdFilter())
    await match(stub, b"not an image", "trace-7")
    [record] = [r for r in caplog.records if getattr(r, "request_id", None) == "trace-7"]
    assert record.name == "service.access"
    assert (record.grpc_method, record.grpc_code) == (MATCH, "INVALID_ARGUMENT")
    assert record.duration_ms > 0
    assert record.peer in record.getMessage()


async def test_json_lines_carry_the_request_id(stub, caplog) -> None:
    caplog.set_level(logging.INFO, logger="service")
    stream = io.StringIO()
    handler = logs.make_handler("json", stream)
    logging.getLogger("service").addHandler(handler)
    try:
        await match(stub, samples.jpeg(), "json-1")
        token = logs.REQUEST_ID.set("json-2")
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("service.test").exception("it failed")
        finally:
            logs.REQUEST_ID.reset(token)
        logging.getLogger("service.test").warning("outside any call")
    finally:
        logging.getLogger("service").removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    [access] = [line for line in lines if line.get("request_id") == "json-1"]
    assert access["logger"] == "service.access" and access["level"] == "INFO"
    assert (access["grpc_method"], access["grpc_code"]) == (MATCH, "OK")
    assert access["message"].startswith(f"{MATCH} OK ")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", access["time"])
    [failed] = [line for line in lines if line.get("request_id") == "json-2"]
    assert failed["level"] == "ERROR" and "ValueError: boom" in failed["exc_info"]
    [outside] = [line for line in lines if line["message"] == "outside any call"]
    assert "request_id" not in outside


def test_text_lines_keep_the_layout_and_add_the_request_id() -> None:
    stream = io.StringIO()
    handler = logs.make_handler("text", stream)
    record = logging.makeLogRecord({"name": "service.x", "levelname": "INFO", "msg": "hello"})
    token = logs.REQUEST_ID.set("text-1")
    try:
        handler.handle(record)
    finally:
        logs.REQUEST_ID.reset(token)
    handler.handle(logging.makeLogRecord({"name": "service.x", "levelname": "INFO", "msg": "bye"}))
    first, second = stream.getvalue().splitlines()
    assert re.fullmatch(r"\S+ \S+ INFO service\.x \[text-1\]: hello", first)
    assert second.endswith("INFO service.x [-]: bye")


# ---- calls the servicer never answers ----------------------------------------------------------


class RefuseOrCrash(grpc.aio.ServerInterceptor):
    """Stands in for the credentials check later in the chain, and for a handler bug."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        wanted = dict(handler_call_details.invocation_metadata).get("test-outcome")

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
            logging.getLogger("service.test").warning("refusing")
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no token")

        async def crash(request: Any, context: grpc.aio.ServicerContext) -> None:
            raise RuntimeError("bug")

        behaviors = {"refuse": refuse, "crash": crash}
        if wanted not in behaviors:
            return handler
        # Like the credentials check: a made-up method is refused like a real one.
        return grpc.unary_unary_rpc_method_handler(behaviors[wanted])


async def test_calls_refused_or_failed_later_in_the_chain_are_counted(caplog) -> None:
    caplog.set_level(logging.INFO, logger="service")
    caplog.handler.addFilter(logs.RequestIdFilter())
    server = grpc.aio.server(interceptors=[*observability.interceptors(), RefuseOrCrash()])
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("localhost:0")
    await server.start()
    codes = {}
    try:
        before = scrape_registry()
        async with grpc.aio.insecure_channel(f"localhost:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for outcome in ("refuse", "crash"):
                metadata = (("test-outcome", outcome), ("x-request-id", f"id-{outcome}"))
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.Check(health_pb2.HealthCheckRequest(), metadata=metadata)
                codes[outcome] = caught.value.code()
                assert returned_id(caught.value.trailing_metadata()) == f"id-{outcome}"
            made_up = channel.unary_unary("/no.such.Service/Probe")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await made_up(b"", metadata=(("test-outcome", "refuse"),))
            codes["made-up"] = caught.value.code()
        after = scrape_registry()
    finally:
        await server.stop(0)
    assert codes == {
        "refuse": grpc.StatusCode.UNAUTHENTICATED,
        "crash": grpc.StatusCode.UNKNOWN,
        "made-up": grpc.StatusCode.UNAUTHENTICATED,
    }
    for method, code in (
        (CHECK, "UNAUTHENTICATED"),
        (CHECK, "UNKNOWN"),
        ("unknown", "UNAUTHENTICATED"),
    ):
        moved = value(after, "matcher_requests_total", method=method, code=code, transport="grpc")
        assert (
            moved
            - value(before, "matcher_requests_total", method=method, code=code, transport="grpc")
            == 1
        )
    assert not any("no.such" in dict(labels).get("method", "") for _, labels in after)
    # Logged by the refusing interceptor's handler, inside the call.
    refusals = [r.request_id for r in caplog.records if r.getMessage() == "refusing"]
    assert refusals[0] == "id-refuse" and GENERATED_ID.fullmatch(refusals[1])


def scrape_registry() -> Samples:
    """The default registry without HTTP (this test's server has no metrics endpoint)."""
    from prometheus_client import REGISTRY

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in REGISTRY.collect()
        for s in family.samples
    }


async def test_the_batch_worker_does_not_keep_the_first_callers_request_id() -> None:
    seen: list[str | None] = []

    def run_batch(images):
        seen.append(logs.REQUEST_ID.get())
        return list(images)

    batcher = DynamicBatcher(run_batch, BatchingOptions())

    async def call(request_id: str) -> None:
        logs.REQUEST_ID.set(request_id)  # a task of its own: its context ends with it
        await batcher.features(b"image")

    try:
        await asyncio.create_task(call("first"))
        await asyncio.create_task(call("second"))
    finally:
        await batcher.close()
    assert seen == [None, None]
