"""The HTTP/JSON API and the field-testing page, on the gRPC server's event loop (aiohttp).

TensorFlow Serving's REST port beside its gRPC port is the precedent. One contract: requests and
answers are the `matcher.v1` messages in the protobuf's JSON mapping, and every call goes to the
same `MatcherCore` with the same limits, bearer token, TLS, request ids and metrics as gRPC.

    POST /v1/match                  multipart (file field "image", option fields) or JSON
                                    ImageRequest -> MatchResponse
    POST /v1/embed                  the same request -> EmbedResponse
    GET  /v1/model                  -> ModelInfo
    GET  /v1/references/{id}        a reference view's JPEG thumbnail (JSON Reference with
                                    `Accept: application/json`)
    GET|POST /v1/feedback           whether feedback is on; save a photo as a view of a label
    GET  /healthz, /readyz          live; models loaded and backend reachable
    GET  /openapi.json              the OpenAPI document of all of the above
    GET  /, /static/...             the field-testing page

Errors are `{"error": {"code": <HTTP status>, "status": <gRPC code name>, "message": ...}}`
(Google's JSON error shape), with the message gRPC would send.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from aiohttp import BodyPartReader, web
from google.protobuf import json_format
from google.protobuf.message import Message

from matcher.core import MatcherCore
from matcher.errors import MatcherError
from matcher.v1 import matcher_pb2
from service import auth, converters, logs, observability, openapi, security
from service.config import Settings
from service.servicer import status_for

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).parent / "web"
API_PREFIX = "/v1/"
RPC = "/" + matcher_pb2.DESCRIPTOR.services_by_name["Matcher"].full_name + "/"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"

#: The gRPC method each route is counted as (routes that stand for no RPC: "METHOD /path").
METHOD_OF_ROUTE = {
    "/v1/match": RPC + "Match",
    "/v1/embed": RPC + "Embed",
    "/v1/model": RPC + "GetModelInfo",
    "/v1/references/{reference_id}": RPC + "GetReference",
    "/healthz": HEALTH_CHECK,
    "/readyz": HEALTH_CHECK,
}
#: HTTP status of each gRPC code (google.rpc.Code's HTTP mapping).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
}
#: The file suffix a saved feedback photo gets, by the format its header says.
SUFFIX_OF_FORMAT = {
    "JPEG": ".jpg",
    "MPO": ".jpg",
    "PNG": ".png",
    "GIF": ".gif",
    "BMP": ".bmp",
    "HEIF": ".heic",
    "WEBP": ".webp",
}
FEEDBACK_LOG = "feedback.jsonl"
#: Forms: the image must come as a file, which only multipart carries (the message says so).
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
#: The page may load only its own files and show only its own and the photos' pixels.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
#: Option fields of a multipart or raw-body request (form field or query parameter), by the
#: ImageRequest field they set; both the proto and the JSON spelling are accepted.
OPTION_FIELDS = {
    "top_k": "top_k",
    "topK": "top_k",
    "no_match_threshold": "no_match_threshold",
    "noMatchThreshold": "no_match_threshold",
    "views": "views",
    "min_inliers": "min_inliers",
    "minInliers": "min_inliers",
}


class ApiError(Exception):
    """An answer other than OK, with the gRPC code it stands for."""

    def __init__(self, code: grpc.StatusCode, message: str, http_status: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status or HTTP_STATUS.get(code, 500)


def to_json(message: Message) -> dict[str, Any]:
    """A message in the protobuf JSON mapping, every field shown (zeros and empties too)."""
    result: dict[str, Any] = json_format.MessageToDict(
        message, always_print_fields_with_no_presence=True
    )
    return result


def error_response(error: ApiError) -> web.Response:
    body = {"code": error.http_status, "status": error.code.name, "message": error.message}
    return web.json_response({"error": body}, status=error.http_status)


@dataclass
class HttpEndpoint:
    """The started HTTP site(s): one port, every address of --host."""

    runner: web.AppRunner
    port: int
    api: HttpApi

    async def close(self) -> None:
        """Stop accepting, let requests in flight finish (up to --grace-s), then close."""
        await self.runner.cleanup()


class HttpApi:
    """The aiohttp application over the core; `readiness` says whether health is SERVING."""

    def __init__(
        self, core: MatcherCore, settings: Settings, readiness: Callable[[], bool]
    ) -> None:
        self._core = core
        self._settings = settings
        self._ready = readiness
        self._token = (
            auth.BearerTokenInterceptor(auth.read_token(settings.auth_token_file))
            if settings.auth_token_file is not None
            else None
        )
        self._in_flight = 0
        self._feedback_dir = settings.feedback_dir
        self.app = web.Application(
            client_max_size=settings.max_receive_bytes, middlewares=[self._middleware]
        )
        self.app.add_routes(
            [
                web.post("/v1/match", self.match),
                web.post("/v1/embed", self.embed),
                web.get("/v1/model", self.model),
                web.get("/v1/references/{reference_id:.+}", self.reference),
                web.get("/v1/feedback", self.feedback_state),
                web.post("/v1/feedback", self.feedback),
                web.get("/healthz", self.healthz),
                web.get("/readyz", self.readyz),
                web.get("/openapi.json", self.openapi_document),
                web.get("/", self.page),
                web.static("/static", WEB_DIR / "static", show_index=False),
            ]
        )

    @property
    def feedback_dir(self) -> Path | None:
        """Where feedback photos go (--feedback-dir); None when feedback is off."""
        return self._feedback_dir

    @property
    def in_flight(self) -> int:
        """API requests being handled now (what --max-concurrent-rpcs bounds)."""
        return self._in_flight

    # --- the cross-cutting part: ids, credentials, concurrency, errors, metrics ---

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        request_id = observability.request_id_from(
            [(observability.REQUEST_ID_KEY, request.headers.get(observability.REQUEST_ID_KEY))]
        )
        token = logs.REQUEST_ID.set(request_id)
        try:
            return await self._observed(request, handler, request_id)
        finally:
            logs.REQUEST_ID.reset(token)

    async def _observed(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
        request_id: str,
    ) -> web.StreamResponse:
        """The answer, or the error answer gRPC would give; counted and logged either way."""
        route = _route_name(request)
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        response: web.StreamResponse
        try:
            self._check_credentials(request, route)
            response = await self._limited(request, handler, route)
        except ApiError as exc:
            code, response = exc.code, error_response(exc)
        except MatcherError as exc:
            code = status_for(exc)
            response = error_response(ApiError(code, str(exc)))
        except web.HTTPRequestEntityTooLarge:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
            message = (
                f"the request body is larger than {self._settings.max_receive_bytes} bytes "
                "(--max-receive-bytes)"
            )
            response = error_response(ApiError(code, message, 413))
        except web.HTTPException as exc:  # no such route, wrong method
            code = grpc.StatusCode.NOT_FOUND if exc.status == 404 else grpc.StatusCode.UNKNOWN
            message = f"{request.method} {request.path}: {exc.reason}"
            response = error_response(ApiError(code, message, exc.status))
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            code = grpc.StatusCode.INTERNAL
            response = error_response(ApiError(code, "internal error; see the server log"))
        response.headers[observability.REQUEST_ID_KEY] = request_id
        observability.record_call(
            METHOD_OF_ROUTE.get(route, f"{request.method} {route}" if route else "unknown"),
            code.name,
            time.perf_counter() - start,
            request.remote or "",
            "http",
            f"{request.method} {request.path}",
            {"http_status": response.status},
        )
        return response

    def _check_credentials(self, request: web.Request, route: str) -> None:
        """The token rule of gRPC: every API call needs it, health checks only when
        --health-requires-auth; the page, its files and the OpenAPI document never."""
        if self._token is None:
            return
        is_health = route in ("/healthz", "/readyz")
        if not route.startswith(API_PREFIX) and not (
            is_health and self._settings.health_requires_auth
        ):
            return
        sent = [("authorization", value) for value in request.headers.getall("Authorization", [])]
        refusal = self._token.check(sent)
        if refusal is not None:
            log.warning(
                "refused %s %s from %s: %s", request.method, route, request.remote, refusal[0].name
            )
            raise ApiError(*refusal)

    async def _limited(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
        route: str,
    ) -> web.StreamResponse:
        """At most --max-concurrent-rpcs API calls at once, as gRPC allows; more get 429."""
        if not route.startswith(API_PREFIX):
            return await handler(request)
        if self._in_flight >= self._settings.max_concurrent_rpcs:
            raise ApiError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server is handling {self._in_flight} requests, its limit "
                "(--max-concurrent-rpcs); retry later",
            )
        self._in_flight += 1
        try:
            return await handler(request)
        finally:
            self._in_flight -= 1

    # --- the API ---

    async def match(self, request: web.Request) -> web.Response:
        message = await _image_request(request, self._settings.max_receive_bytes)
        result = await self._core.match(*converters.match_args(message))
        return web.json_response(to_json(converters.match_to_proto(result)))

    async def embed(self, request: web.Request) -> web.Response:
        message = await _image_request(request, self._settings.max_receive_bytes)
        result = await self._core.embed(message.image)
        return web.json_response(to_json(converters.embed_to_proto(result)))

    async def model(self, request: web.Request) -> web.Response:
        return web.json_response(to_json(converters.description_to_proto(self._core.describe())))

    async def reference(self, request: web.Request) -> web.Response:
        reference = await self._core.reference(request.match_info["reference_id"])
        if "application/json" in request.headers.get("Accept", ""):
            return web.json_response(to_json(converters.reference_to_proto(reference)))
        # Ids are reused when an item is removed and added again: keep browser copies short.
        headers = {"Cache-Control": "private, max-age=60"}
        return web.Response(
            body=reference.image, content_type=reference.media_type, headers=headers
        )

    async def feedback_state(self, request: web.Request) -> web.Response:
        return web.json_response({"enabled": self._feedback_dir is not None})

    async def feedback(self, request: web.Request) -> web.Response:
        """Save a photo as a new view of a catalogue label, for `matcher-train add`."""
        if self._feedback_dir is None:
            raise ApiError(
                grpc.StatusCode.NOT_FOUND,
                "feedback is off on this server; start it with --feedback-dir DIR",
            )
        form = await read_form(request, self._settings.max_receive_bytes)
        image = form.file("image")
        label = form.fields.get("label", "")
        labels = self._core.describe().labels
        if label not in labels or label in (".", "..") or "/" in label:
            raise ApiError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"label {label[:100]!r} is not a catalogue label; choose one of GetModelInfo's",
            )
        header = self._core.inspect(image)
        answer: dict[str, str] = {
            key: form.fields[key][:200] for key in ("answer", "verdict") if key in form.fields
        }
        saved = await asyncio.to_thread(
            save_feedback, self._feedback_dir, label, image, header.format, answer
        )
        return web.json_response({"saved": saved, "label": label})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "live"})

    async def readyz(self, request: web.Request) -> web.Response:
        if not self._ready():
            raise ApiError(
                grpc.StatusCode.UNAVAILABLE,
                "not ready: the models are loading, or the feature backend is unreachable",
            )
        return web.json_response({"status": "ready"})

    async def openapi_document(self, request: web.Request) -> web.Response:
        return web.json_response(openapi.document())

    async def page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(WEB_DIR / "index.html", headers=PAGE_HEADERS)


def _route_name(request: web.Request) -> str:
    """The route's path pattern ("/v1/references/{reference_id}"); "" when none matched."""
    route = request.match_info.route
    resource = route.resource if route is not None else None
    if resource is None:
        return ""
    canonical = resource.canonical
    return "/static" if canonical.startswith("/static") else canonical


@dataclass
class Form:
    """A form's text fields and file fields (their bytes), read into memory."""

    fields: dict[str, str]
    files: dict[str, bytes]

    def file(self, name: str) -> bytes:
        if name not in self.files:
            raise ApiError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f'send the photo as the multipart file field "{name}" (curl -F {name}=@photo.jpg)',
            )
        return self.files[name]


async def read_form(request: web.Request, limit: int) -> Form:
    """The form of a multipart or urlencoded body. Multipart parts are read into memory, at most
    `limit` bytes in all (aiohttp's `post()` would spool each file part to a temporary file)."""
    if request.content_type not in FORM_TYPES:
        raise ApiError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"send multipart/form-data, not {request.content_type!r}",
            415,
        )
    if request.content_type != "multipart/form-data":
        posted = await request.post()
        return Form({key: str(value) for key, value in posted.items()}, {})
    form = Form({}, {})
    total = 0
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader) or part.name is None:
            continue  # a nested multipart or a nameless part: nothing of ours
        data = bytearray()
        while chunk := await part.read_chunk(1 << 16):
            total += len(chunk)
            if total > limit:
                raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=total)
            data.extend(chunk)
        if part.filename is not None:
            form.files[part.name] = bytes(data)
        else:
            form.fields[part.name] = data.decode(part.get_charset("utf-8"), "replace")
    return form


async def _image_request(request: web.Request, limit: int) -> matcher_pb2.ImageRequest:
    """The ImageRequest of a JSON body, a multipart form or a raw image body."""
    content_type = request.content_type
    if content_type == "application/json":
        body = await request.read()
        try:
            return json_format.Parse(body, matcher_pb2.ImageRequest())
        except json_format.ParseError as exc:
            raise ApiError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the JSON body is not an ImageRequest (image as base64): {exc}",
            ) from None
    if content_type in FORM_TYPES:
        form = await read_form(request, limit)
        message = matcher_pb2.ImageRequest(image=form.file("image"))
        options = form.fields
    elif content_type.startswith("image/") or content_type == "application/octet-stream":
        message = matcher_pb2.ImageRequest(image=await request.read())
        options = {}
    else:
        raise ApiError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"unsupported Content-Type {content_type!r}: send multipart/form-data with the file "
            'field "image", application/json with a base64 "image", or the image itself',
            415,
        )
    _set_options(message, {**request.query, **options})
    return message


def _set_options(message: matcher_pb2.ImageRequest, options: dict[str, str]) -> None:
    """Form fields or query parameters onto the request, with the messages gRPC would give."""
    for key, value in options.items():
        field = OPTION_FIELDS.get(key)
        if field is None:
            continue
        value = value.strip()
        try:
            if field == "top_k":
                top_k = int(value)
                if top_k < 0:
                    raise ValueError
                message.top_k = top_k
            elif field == "no_match_threshold":
                message.no_match_threshold = float(value)
            elif field == "min_inliers":
                inliers = int(value)
                if inliers < 0:
                    raise ValueError
                message.min_inliers = inliers
            else:
                message.views = _views(value)
        except ValueError:
            expected = {
                "top_k": "a whole number >= 0",
                "no_match_threshold": "a number in [-1, 1]",
                "min_inliers": "a whole number >= 0",
                "views": "whole, crops or crops_rotations",
            }[field]
            raise ApiError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{key} must be {expected}, not {value[:50]!r}",
            ) from None


def _views(value: str) -> matcher_pb2.Views:
    short = value.lower().removeprefix("views_")
    if short in converters.VIEWS:
        return converters.VIEWS[short]
    raise ValueError(value)


def save_feedback(
    folder: Path, label: str, image: bytes, image_format: str, answer: dict[str, str]
) -> str:
    """Write the photo as `<folder>/<label>/<sha256 prefix><suffix>` (whole or not at all),
    log the choice in `<folder>/feedback.jsonl`; the saved view's name, `<label>/<file>`."""
    name = hashlib.sha256(image).hexdigest()[:16] + SUFFIX_OF_FORMAT.get(image_format, ".img")
    target = folder / label / name
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{name}.partial")
    partial.write_bytes(image)
    os.replace(partial, target)
    entry = {
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "photo": f"{label}/{name}",
        "label": label,
        "request_id": logs.REQUEST_ID.get(),
        **answer,
    }
    with (folder / FEEDBACK_LOG).open("a", encoding="utf-8") as lines:
        lines.write(json.dumps(entry, ensure_ascii=False) + "\n")
    log.info("feedback: saved %s", entry["photo"])
    return f"{label}/{name}"


def _sockets(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address of `host`, all on one port (0: the first address
    picks a free one), as gRPC binds "localhost" on both 127.0.0.1 and ::1. A port in use
    anywhere is an error; an address family the machine lacks (no IPv6) is skipped."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    last: OSError | None = None
    for family, kind, proto, _, address in dict.fromkeys(infos):
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            bound_port = sockets[0].getsockname()[1] if sockets else port
            sock.bind((address[0], bound_port, *address[2:]))
            sock.listen(128)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                for other in sockets:
                    other.close()
                raise
            last = exc
            continue
        sockets.append(sock)
    if not sockets:
        raise last or OSError(f"{host} has no address to listen on")
    return sockets


async def start_http(
    settings: Settings, core: MatcherCore, readiness: Callable[[], bool]
) -> HttpEndpoint | None:
    """Serve the HTTP API and the page on --host:--http-port; None when it is -1 (off)."""
    if settings.http_port < 0:
        return None
    api = HttpApi(core, settings, readiness)
    ssl_context = security.http_ssl_context(settings)
    # The access log is ours (observability.record_call), as for gRPC.
    runner = web.AppRunner(
        api.app, access_log=None, handle_signals=False, shutdown_timeout=settings.grace_s
    )
    await runner.setup()
    try:
        sockets = _sockets(settings.host, settings.http_port)
    except OSError as exc:
        await runner.cleanup()
        raise OSError(
            f"cannot serve HTTP on {settings.host}:{settings.http_port}: {exc.strerror or exc}"
        ) from exc
    for sock in sockets:
        await web.SockSite(runner, sock, ssl_context=ssl_context).start()
    port = int(sockets[0].getsockname()[1])
    scheme = "https" if ssl_context else "http"
    log.info("HTTP API and page on %s://%s:%d/", scheme, settings.host, port)
    return HttpEndpoint(runner, port, api)
