"""The gRPC server: Matcher, health and reflection on one port, models loaded after start.

The port answers health checks at once (NOT_SERVING); models load in a worker thread and
health turns SERVING only when both are loaded. SIGTERM starts a graceful shutdown.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from matcher.v1 import matcher_pb2, matcher_pb2_grpc
from service.backends.base import FeatureBackend
from service.classifier import Classifier
from service.config import Settings
from service.core import MatcherCore
from service.errors import MatcherError
from service.images import ImageLimits
from service.servicer import MatcherServicer

log = logging.getLogger(__name__)

SERVICE_NAME = matcher_pb2.DESCRIPTOR.services_by_name["Matcher"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def make_backend(settings: Settings) -> FeatureBackend:
    """The feature backend the settings ask for."""
    if settings.backend == "tfserving":
        from service.backends.tfserving import TFServingBackend

        return TFServingBackend(
            settings.tfserving_target,
            settings.model_name,
            settings.model_version,
            settings.tfserving_timeout_s,
        )
    from service.backends.embedded import EmbeddedBackend

    return EmbeddedBackend(settings.model_dir, settings.model_version)


def make_core(settings: Settings, backend: FeatureBackend | None = None) -> MatcherCore:
    """The matcher core over the configured backend and classifier (not loaded yet)."""
    return MatcherCore(
        backend or make_backend(settings),
        functools.partial(Classifier.load, settings.classifier, settings.classifier_sha256),
        ImageLimits(min_side=settings.min_image_side, max_side=settings.max_image_side),
    )


@dataclass
class RunningServer:
    """A started server, the port it bound and its health service."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    core: MatcherCore

    async def load_models(self) -> None:
        """Load the models off the event loop, then report SERVING."""
        await asyncio.to_thread(self.core.load)
        await self._set_health(SERVING)
        log.info("serving %s on port %d", SERVICE_NAME, self.port)

    async def stop(self, grace_s: float) -> None:
        """Report NOT_SERVING to every watcher, then let in-flight calls finish."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)


async def start_server(settings: Settings, core: MatcherCore) -> RunningServer:
    """Bind and start the server with health NOT_SERVING; models are not loaded yet."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_receive_bytes),
            ("grpc.so_reuseport", 0),
        ]
    )
    matcher_pb2_grpc.add_MatcherServicer_to_server(MatcherServicer(core), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    if port == 0:
        raise OSError(f"cannot listen on {settings.host}:{settings.port}")
    await server.start()
    running = RunningServer(server, port, health_servicer, core)
    await running._set_health(NOT_SERVING)
    return running


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT."""
    running = await start_server(settings, make_core(settings))
    log.info("listening on %s:%d; loading models", settings.host, running.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loader = asyncio.create_task(running.load_models())
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({loader, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if loader in done and loader.exception() is not None:
        await running.stop(0)
        raise loader.exception()  # type: ignore[misc]
    await stopper
    log.info("shutting down; in-flight calls have %.1f s", settings.grace_s)
    loader.cancel()
    await running.stop(settings.grace_s)


def run(settings: Settings) -> int:
    """Serve; returns the process exit status."""
    try:
        asyncio.run(serve(settings))
    except MatcherError as exc:
        log.error("cannot serve: %s", exc)
        return 1
    except OSError as exc:
        log.error("cannot serve: %s", exc)
        return 1
    return 0
