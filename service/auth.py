"""Bearer-token checks: every call must carry `authorization: Bearer <token>` in its metadata.

No header, or one that is not `Bearer <token>`, is UNAUTHENTICATED; a wrong token is
PERMISSION_DENIED. Neither the expected token nor the one sent ever appears in a reply or a log.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc

from matcher.errors import ConfigurationError
from service.grpc_types import Context, MethodHandler, ServerInterceptor

log = logging.getLogger(__name__)

HEALTH_METHODS = ("/grpc.health.v1.Health/",)
#: grpcurl 1.8 and most tools speak v1alpha; newer clients try v1 first.
REFLECTION_METHODS = (
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

MISSING = "this call needs a bearer token: send metadata `authorization: Bearer <token>`"
MALFORMED = "the authorization metadata must be one `Bearer <token>` value"
WRONG = "the bearer token is not valid"

#: The handler factory for each (request streaming, response streaming) shape.
_FACTORIES: dict[tuple[bool, bool], Callable[..., MethodHandler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}

Refusal = tuple[grpc.StatusCode, str]


def read_token(path: Path) -> bytes:
    """The token in `path` without its trailing newline; refuses an empty or unsendable one."""
    try:
        token = path.read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read --auth-token-file {path}: {exc.strerror or exc}"
        ) from None
    if not token:
        raise ConfigurationError(f"--auth-token-file {path} is empty")
    # It travels as a header value after "Bearer ": visible ASCII, no spaces, one line.
    if any(byte < 0x21 or byte > 0x7E for byte in token):
        raise ConfigurationError(
            f"--auth-token-file {path}: the token must be one line of visible ASCII "
            "characters without spaces"
        )
    return token


class BearerTokenInterceptor(ServerInterceptor):
    """Refuses calls without the right bearer token, except to methods under `exempt`."""

    def __init__(self, token: bytes, exempt: Iterable[str] = ()) -> None:
        self._token = token
        self._exempt = tuple(exempt)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[MethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> MethodHandler:
        method = handler_call_details.method
        refusal = None
        if not method.startswith(self._exempt):
            refusal = self.check(handler_call_details.invocation_metadata)
        handler = await continuation(handler_call_details)
        if refusal is None:
            return handler
        return _refusing_handler(handler, method, *refusal)

    def check(self, metadata: Iterable[tuple[str, Any]] | None) -> Refusal | None:
        """Why a call with this metadata is refused; None when its token is right."""
        values = [value for key, value in metadata or () if key == "authorization"]
        if not values:
            return grpc.StatusCode.UNAUTHENTICATED, MISSING
        scheme, _, token = str(values[0]).strip().partition(" ")
        token = token.strip()
        if len(values) > 1 or scheme.lower() != "bearer" or not token:
            return grpc.StatusCode.UNAUTHENTICATED, MALFORMED
        # Constant time, so the reply's timing does not reveal how much of a guess was right.
        if not hmac.compare_digest(token.encode("utf-8", "replace"), self._token):
            return grpc.StatusCode.PERMISSION_DENIED, WRONG
        return None


def _refusing_handler(
    handler: MethodHandler | None,
    method: str,
    code: grpc.StatusCode,
    message: str,
) -> MethodHandler:
    """A handler of the same streaming shape as `handler` that ends the call with `code`.

    It has no deserializer, so an unauthenticated request is never parsed. An unknown method
    is refused like a known one, so callers without a token cannot probe which ones exist.
    """

    async def refuse(request: Any, context: Context) -> None:
        log.warning("refused %s from %s: %s", method, context.peer(), code.name)
        # Set, not sent (as `service.servicer` answers errors): the status leaves once the
        # handler returns, after the access log line and the metrics have the call.
        context.set_code(code)
        context.set_details(message)

    shape = (
        bool(handler and handler.request_streaming),
        bool(handler and handler.response_streaming),
    )
    return _FACTORIES[shape](refuse)
