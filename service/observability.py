"""Observability of each gRPC call: a request id, one access log line, Prometheus metrics.

The interceptor runs first in the chain and wraps the handler the rest of the chain returns,
so it sees the final status of every call: answered, aborted by the servicer's error map,
refused by a later interceptor (credentials), or failed with an unexpected exception.
Unary and streaming handlers written as coroutines or async generators are observed. Passed
through uncounted: a synchronous handler (none here), a method nothing in the chain answers
(gRPC replies UNIMPLEMENTED itself), and calls gRPC refuses before any interceptor runs
(over --max-concurrent-rpcs, or a message over --max-receive-bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
from google.protobuf import descriptor_pool

from matcher import metrics
from service import logs
from service.grpc_types import Context, MethodHandler, ServerInterceptor

__all__ = ["interceptors", "record_call", "request_id_from"]

access_log = logging.getLogger("service.access")

#: Metadata key of the request id, sent by the client and returned in trailing metadata.
REQUEST_ID_KEY = "x-request-id"
_VALID_ID = re.compile(r"[\x20-\x7e]{1,128}")
#: The method label of calls to methods no imported proto declares.
UNKNOWN_METHOD = "unknown"

_HANDLER_KINDS: tuple[tuple[str, Callable[..., MethodHandler]], ...] = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler),
    ("unary_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_unary", grpc.stream_unary_rpc_method_handler),
    ("stream_stream", grpc.stream_stream_rpc_method_handler),
)


def interceptors() -> list[ServerInterceptor]:
    """Server interceptors that give each call a request id, log it and count it."""
    return [ObservabilityInterceptor()]


def request_id_from(metadata: Any) -> str:
    """The client's `x-request-id` when it is printable ASCII of at most 128 characters;
    otherwise (absent or unusable) a fresh uuid4 hex. Never an error: the id is for logs."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY:
            if isinstance(value, str) and _VALID_ID.fullmatch(value):
                return value
            break
    return uuid.uuid4().hex


class ObservabilityInterceptor(ServerInterceptor):
    """Wraps each call's handler in `_observed`."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[MethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> MethodHandler:
        request_id = request_id_from(handler_call_details.invocation_metadata)
        # Later interceptors log with the id too.
        token = logs.REQUEST_ID.set(request_id)
        try:
            handler = await continuation(handler_call_details)
        finally:
            logs.REQUEST_ID.reset(token)
        if handler is None:
            return handler
        method = handler_call_details.method
        for kind, make in _HANDLER_KINDS:
            behavior = getattr(handler, kind)
            if behavior is not None:
                wrapped = _wrap(behavior, method, request_id)
                if wrapped is None:
                    return handler
                return make(wrapped, handler.request_deserializer, handler.response_serializer)
        return handler


def _wrap(behavior: Callable[..., Any], method: str, request_id: str) -> Callable[..., Any] | None:
    """`behavior` run inside `_observed`, of the same kind (grpc.aio dispatches on it)."""
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
            with _observed(method, request_id, context):
                async for response in behavior(request, context):
                    yield response

        return stream
    if inspect.iscoroutinefunction(behavior):

        async def call(request: Any, context: Context) -> Any:
            with _observed(method, request_id, context):
                return await behavior(request, context)

        return call
    return None


@contextlib.contextmanager
def _observed(method: str, request_id: str, context: Context) -> Iterator[None]:
    """Set the request id (context and trailing metadata); at the end, count and log the call."""
    token = logs.REQUEST_ID.set(request_id)
    # Trailing metadata reaches the client with every status, errors included.
    context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
    start = time.perf_counter()
    code = grpc.StatusCode.UNKNOWN
    try:
        yield
        code = context.code() or grpc.StatusCode.OK  # a handler may set_code and return
    except BaseException as exc:
        code = _status_of(exc, context)
        raise
    finally:
        _record(method, code, time.perf_counter() - start, context.peer())
        # A stream closed from another task (its generator finalised there) runs this in
        # another context, where the token is unknown; that context ends with it anyway.
        with contextlib.suppress(ValueError):
            logs.REQUEST_ID.reset(token)


def _status_of(exc: BaseException, context: Context) -> grpc.StatusCode:
    """The status a call ending with `exc` is reported with."""
    if isinstance(exc, grpc.aio.AbortError):
        return context.code() or grpc.StatusCode.UNKNOWN
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        # The client went away, or its deadline passed.
        expired = context.time_remaining() is not None and context.time_remaining() <= 0
        return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN  # grpc.aio logs the traceback and answers UNKNOWN


def method_label(method: str) -> str:
    """`method` when an imported proto declares it, else "unknown".

    The credentials check answers made-up method names like real ones (so that they reveal
    nothing); as labels they would let any caller add series without end.
    """
    service, _, name = method.lstrip("/").partition("/")
    try:
        descriptor = descriptor_pool.Default().FindServiceByName(service)
    except KeyError:
        return UNKNOWN_METHOD
    return method if name in descriptor.methods_by_name else UNKNOWN_METHOD


def _record(method: str, code: grpc.StatusCode, seconds: float, peer: str) -> None:
    record_call(method_label(method), code.name, seconds, peer, "grpc", method)


def record_call(
    method: str,
    code: str,
    seconds: float,
    peer: str,
    transport: str,
    shown: str | None = None,
    extra: dict[str, object] | None = None,
) -> None:
    """Count one finished call and write its access log line.

    `method` is the bounded label (a declared RPC, or "unknown"); `shown` what the log line
    names (the method as called, or an HTTP request line); `code` a gRPC status code name."""
    metrics.REQUESTS.labels(method, code, transport).inc()
    metrics.REQUEST_DURATION.labels(method, transport).observe(seconds)
    shown = shown or method
    access_log.info(
        "%s %s %.1f ms peer=%s",
        shown,
        code,
        seconds * 1000,
        peer,
        extra={
            "transport": transport,
            "grpc_method": method,
            "grpc_code": code,
            "duration_ms": round(seconds * 1000, 3),
            "peer": peer,
            **(extra or {}),
        },
    )
