"""Observability: request ids, structured logs and Prometheus metrics."""

from __future__ import annotations

import grpc


def interceptors() -> list[grpc.aio.ServerInterceptor]:
    """Server interceptors that give each call a request id and count it."""
    return []
