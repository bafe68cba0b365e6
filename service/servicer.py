"""The gRPC transport: convert the request, call the core, convert the answer back.

`_map_errors` is the one place where core errors become gRPC status codes.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar, cast

import grpc

from matcher.core import MatcherCore
from matcher.errors import (
    BackendUnavailableError,
    InvalidImageError,
    InvalidRequestError,
    MatcherError,
    ModelLoadError,
    NotFoundError,
    NotReadyError,
    OverloadedError,
)
from matcher.v1 import matcher_pb2, matcher_pb2_grpc
from service import converters
from service.grpc_types import Context

log = logging.getLogger(__name__)

STATUS_OF: dict[type[MatcherError], grpc.StatusCode] = {
    InvalidImageError: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    NotReadyError: grpc.StatusCode.UNAVAILABLE,
    BackendUnavailableError: grpc.StatusCode.UNAVAILABLE,
    ModelLoadError: grpc.StatusCode.UNAVAILABLE,
    OverloadedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
}

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[["MatcherServicer", Req, "Context"], Awaitable[Resp]]


def status_for(error: MatcherError) -> grpc.StatusCode:
    """The gRPC status a core error is reported with."""
    for cls in type(error).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.INTERNAL


def _map_errors(handler: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """The handler, its errors answered with their status.

    The status is set, not sent (`context.abort` would send it at once): the call then ends
    when the handler returns, after the interceptors have counted and logged it, so a client
    that has its answer finds the call in the access log and the metrics."""

    @functools.wraps(handler)
    async def wrapper(self: MatcherServicer, request: Req, context: Context) -> Resp:
        try:
            return await handler(self, request, context)
        except MatcherError as exc:
            context.set_code(status_for(exc))
            context.set_details(str(exc))
        except grpc.aio.AbortError:
            raise
        except Exception:
            # Unexpected: the caller gets a generic message, the log gets the traceback.
            log.exception("%s failed", handler.__name__)
            context.set_code(grpc.StatusCode.INTERNAL)
            context.set_details("internal error; see the server log")
        # No response: grpc discards the one of a call whose status is not OK.
        return cast(Resp, None)

    return wrapper


class MatcherServicer(matcher_pb2_grpc.MatcherServicer):
    """matcher.v1.Matcher over the core."""

    def __init__(self, core: MatcherCore) -> None:
        self._core = core

    @_map_errors
    async def Match(
        self, request: matcher_pb2.ImageRequest, context: Context
    ) -> matcher_pb2.MatchResponse:
        result = await self._core.match(*converters.match_args(request))
        return converters.match_to_proto(result)

    @_map_errors
    async def Embed(
        self, request: matcher_pb2.ImageRequest, context: Context
    ) -> matcher_pb2.EmbedResponse:
        result = await self._core.embed(request.image)
        return converters.embed_to_proto(result)

    @_map_errors
    async def GetModelInfo(
        self,
        request: matcher_pb2.GetModelInfoRequest,
        context: Context,
    ) -> matcher_pb2.ModelInfo:
        return converters.description_to_proto(self._core.describe())

    @_map_errors
    async def GetReference(
        self, request: matcher_pb2.GetReferenceRequest, context: Context
    ) -> matcher_pb2.Reference:
        reference = await self._core.reference(request.reference_id)
        return converters.reference_to_proto(reference)
