"""Prometheus metrics of the matcher, and the HTTP endpoint that serves them.

The metrics live in prometheus_client's default registry: one server per process in
production, and the process and Python collectors come with it. Tests read deltas.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import Counter, Gauge, Histogram

log = logging.getLogger(__name__)

#: 5 ms (health checks fall below) .. 10 s (a large batch on a slow or busy backend).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Powers of two up to 64, the sizes TF Serving's allowed_batch_sizes use.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

#: The two transports of the one core: gRPC calls, and HTTP/JSON requests (counted under the
#: RPC they stand for, with the gRPC code of their answer, so one query covers both).
TRANSPORTS = ("grpc", "http")
REQUESTS = Counter(
    "matcher_requests",
    "Calls finished, by full method name, status code and transport (grpc, http).",
    ["method", "code", "transport"],
)
REQUEST_DURATION = Histogram(
    "matcher_request_duration_seconds",
    "Time from the call reaching the server to its status, by full method name and transport.",
    ["method", "transport"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "matcher_batch_size", "Images in each model call of the dynamic batcher.", buckets=BATCH_BUCKETS
)
QUEUE_DEPTH = Gauge("matcher_queue_depth", "Images waiting for the next model call.")
BACKEND_DURATION = Histogram(
    "matcher_backend_duration_seconds",
    "Time of each feature backend call on a batch, by backend kind (embedded, tfserving).",
    ["backend"],
    buckets=LATENCY_BUCKETS,
)
MODELS_LOADED = Gauge(
    "matcher_models_loaded",
    "1 for the backbone, its SavedModel version and the classifier file being served.",
    ["backbone", "version", "classifier_sha256"],
)
ENGINE = Gauge(
    "matcher_engine",
    "1 for what runs the network (openvino, tensorflow; empty for TF Serving) and the "
    "precision it computes in (fp32, bf16; empty where the backend does not tell).",
    ["engine", "precision"],
)
DECODE_PIXELS_IN_FLIGHT = Gauge(
    "matcher_decode_pixels_in_flight",
    "Pixels of the images being decoded or matched now, held in the decode budget "
    "(--decode-pixel-budget).",
)
DECODE_BUDGET_REFUSED = Counter(
    "matcher_decode_budget_refused",
    "Requests refused with RESOURCE_EXHAUSTED because too many were waiting for the decode budget.",
)
RELOAD_FAILURES = Counter(
    "matcher_reload_failures", "Hot reloads refused, by model (classifier, backbone).", ["model"]
)
for _model in ("classifier", "backbone"):
    RELOAD_FAILURES.labels(_model)  # exported as 0 from the start, so rate() has a baseline

_models_lock = threading.Lock()


def record_models_loaded(backbone: str, backbone_version: int, classifier_sha256: str) -> None:
    """Show these models as the ones served, replacing whatever was shown before."""
    with _models_lock:
        MODELS_LOADED.clear()
        MODELS_LOADED.labels(backbone, str(backbone_version), classifier_sha256).set(1)


def record_engine(engine: str, precision: str) -> None:
    """Show the engine and precision of the backbone being served (after a load or reload)."""
    with _models_lock:
        ENGINE.clear()
        ENGINE.labels(engine, precision).set(1)


def record_reload_failure(model: str, reason: str) -> None:
    """Count a refused hot reload of `model` ("classifier" or "backbone").

    The reason is not a label (free text would make a series per message); the caller logs
    it at WARNING, so here it only goes to the debug log.
    """
    RELOAD_FAILURES.labels(model).inc()
    log.debug("reload failure counted for the %s: %s", model, reason)


@dataclass
class MetricsEndpoint:
    """The /metrics HTTP server, serving from a daemon thread."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        """Stop serving and release the port (blocking, up to half a second)."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def start_endpoint(host: str, port: int) -> MetricsEndpoint | None:
    """Serve /metrics on host:port (0 picks a free port); None when port is -1 (off)."""
    if port < 0:
        return None
    # The `_created` series would double what is scraped, and nothing here reads them.
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped
    try:
        server, thread = prometheus_client.start_http_server(port, host)
    except OSError as exc:
        raise OSError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from exc
    return MetricsEndpoint(server, thread)
