"""grpc's generic classes with their type parameters, spelt once for the whole transport.

grpc-stubs makes handlers, contexts and interceptors generic in the request and response types;
at run time they are plain classes, which cannot be subscripted, so the parameterised forms
exist for the type checker alone. Requests and responses here are any message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
    MethodHandler = grpc.RpcMethodHandler[Any, Any]
    Context = grpc.aio.ServicerContext[Any, Any]
else:
    ServerInterceptor = grpc.aio.ServerInterceptor
    MethodHandler = grpc.RpcMethodHandler
    Context = grpc.aio.ServicerContext
