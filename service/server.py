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
import threadpoolctl

# `health.aio` of grpc_health, imported by its own name: grpc-stubs do not cover it.
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from matcher import metrics
from matcher.core import MatcherCore
from matcher.errors import BackendUnavailableError, MatcherError
from matcher.factory import make_core
from matcher.reload import ModelWatcher
from matcher.v1 import matcher_pb2, matcher_pb2_grpc
from service import http_api, observability, security
from service.config import Settings
from service.servicer import MatcherServicer

log = logging.getLogger(__name__)

SERVICE_NAME = matcher_pb2.DESCRIPTOR.services_by_name["Matcher"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class RunningServer:
    """A started server, the port it bound and its health service."""

    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer
    core: MatcherCore
    #: Hot reload; None when it is turned off.
    watcher: ModelWatcher | None = None
    reload_interval_s: float = 0.0
    #: The Prometheus /metrics endpoint; None when --metrics-port is -1.
    metrics_endpoint: metrics.MetricsEndpoint | None = None
    #: The HTTP/JSON API and page; None when --http-port is -1.
    http_endpoint: http_api.HttpEndpoint | None = None
    #: Whether health says SERVING (models loaded, backend reachable): HTTP's /readyz.
    serving: bool = False

    @property
    def http_port(self) -> int | None:
        """The port of the HTTP API and page, or None when HTTP is off."""
        return self.http_endpoint.port if self.http_endpoint else None

    @property
    def metrics_port(self) -> int | None:
        """The port /metrics is served on, or None when metrics are off."""
        return self.metrics_endpoint.port if self.metrics_endpoint else None

    async def run(self, check_interval_s: float) -> None:
        """Load the models, then keep health in step with the feature backend and follow new
        models, forever."""
        await self.load_models()
        tasks = [self.watch_backend(check_interval_s)]
        if self.watcher is not None:
            tasks.append(self.watcher.run(self.reload_interval_s))
        await asyncio.gather(*tasks)

    async def load_models(self, first_delay_s: float = 0.5, max_delay_s: float = 5.0) -> None:
        """Load the models off the event loop, then report SERVING.

        While the backend is unreachable (TF Serving still starting) this retries with
        backoff; a model that does not fit raises ModelLoadError at once.
        """
        delay = first_delay_s
        while True:
            try:
                await asyncio.to_thread(self.core.load)
                break
            except BackendUnavailableError as exc:
                log.warning("%s; retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, max_delay_s)
        model = self.core.identity()
        metrics.record_models_loaded(model.backbone, model.model_version, model.classifier_sha256)
        engine = self.core.describe().backbone
        metrics.record_engine(engine.engine, engine.precision)
        await self._set_health(SERVING)
        log.info("serving %s on port %d", SERVICE_NAME, self.port)

    async def watch_backend(self, interval_s: float) -> None:
        """Report NOT_SERVING while the backend is unreachable, SERVING when it is back."""
        serving = True
        while True:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.to_thread(self.core.check_backend)
                problem = None
            except MatcherError as exc:
                problem = str(exc)
            if (problem is None) != serving:
                serving = problem is None
                await self._set_health(SERVING if serving else NOT_SERVING)
                if serving:
                    log.info("feature backend is back: SERVING")
                else:
                    log.warning("feature backend lost (%s): NOT_SERVING", problem)

    async def stop(self, grace_s: float) -> None:
        """Report NOT_SERVING to every watcher, then let in-flight calls finish."""
        self.serving = False
        await self.health.enter_graceful_shutdown()
        if self.http_endpoint is not None:
            await asyncio.gather(self.server.stop(grace_s), self.http_endpoint.close())
        else:
            await self.server.stop(grace_s)
        await self.core.close()
        if self.metrics_endpoint is not None:
            await asyncio.to_thread(self.metrics_endpoint.close)

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        self.serving = status == SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)


async def start_server(settings: Settings, core: MatcherCore) -> RunningServer:
    """Bind and start the server with health NOT_SERVING; models are not loaded yet."""
    server = grpc.aio.server(
        # Ids and metrics first, so that calls refused for their credentials are counted too.
        interceptors=[*observability.interceptors(), *security.interceptors(settings)],
        options=[
            ("grpc.max_receive_message_length", settings.max_receive_bytes),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    servicer = MatcherServicer(core)
    # The generated _grpc module has no type stub.
    matcher_pb2_grpc.add_MatcherServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    port = security.add_port(server, f"{settings.host}:{settings.port}", settings)
    if port == 0:
        raise OSError(f"cannot listen on {settings.host}:{settings.port}")
    await server.start()
    try:
        endpoint = metrics.start_endpoint(settings.host, settings.metrics_port)
    except OSError:
        await server.stop(0)
        raise
    # Read at scrape time, so the gauge is never stale; the last server started wins.
    metrics.QUEUE_DEPTH.set_function(lambda: core.batcher.queued)
    running = RunningServer(server, port, health_servicer, core, metrics_endpoint=endpoint)
    try:
        running.http_endpoint = await http_api.start_http(settings, core, lambda: running.serving)
    except (OSError, MatcherError):
        await server.stop(0)
        if endpoint is not None:
            await asyncio.to_thread(endpoint.close)
        raise
    if settings.reload_interval_s > 0:
        running.watcher = ModelWatcher(core, settings.classifier)
        running.reload_interval_s = settings.reload_interval_s
    await running._set_health(NOT_SERVING)
    return running


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT."""
    # The classifier's matrix products are tiny; OpenBLAS threads for them only wait for a
    # core that TensorFlow is using (90 ms stalls measured on 2 busy cores, 0.1 ms without).
    threadpoolctl.threadpool_limits(1, user_api="blas")
    running = await start_server(settings, make_core(settings))
    log.info("listening on %s:%d; loading models", settings.host, running.port)
    if running.metrics_port is not None:
        log.info("metrics on http://%s:%d/metrics", settings.host, running.metrics_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Without hot reload, SIGHUP would end the process (its default action): say so instead.
    loop.add_signal_handler(
        signal.SIGHUP,
        running.watcher.poke
        if running.watcher is not None
        else functools.partial(log.warning, "SIGHUP ignored: hot reload is off"),
    )
    lifecycle = asyncio.create_task(running.run(settings.health_check_interval_s))
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({lifecycle, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if lifecycle in done:  # it only ends when the models cannot be loaded
        stopper.cancel()
        await running.stop(0)
        raise lifecycle.exception()  # type: ignore[misc]
    log.info("shutting down; in-flight calls have %.1f s", settings.grace_s)
    lifecycle.cancel()
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
