"""Bearer-token authentication as one server interceptor.

Every call except the standard health check must carry `authorization: Bearer <token>`.
Tokens are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from typing import Any

import grpc

__all__ = ["TokenAuthInterceptor", "UNAUTHENTICATED_PREFIXES_ALLOWED"]

log = logging.getLogger(__name__)

# Health must answer probes (grpc_health_probe, orchestrators) that carry no credentials.
UNAUTHENTICATED_PREFIXES_ALLOWED = ("/grpc.health.v1.Health/",)


def _abort_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    def abort(request: Any, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    # The refusal must have the same streaming shape as the method it replaces.
    factories: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    factory = factories[(handler.request_streaming, handler.response_streaming)]
    return factory(
        abort,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class TokenAuthInterceptor(grpc.ServerInterceptor):
    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("an empty token would accept every caller")
        self._expected = f"Bearer {token}".encode()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        handler = continuation(handler_call_details)
        if handler is None or method.startswith(UNAUTHENTICATED_PREFIXES_ALLOWED):
            return handler
        presented = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                presented = value.encode() if isinstance(value, str) else value
                break
        if hmac.compare_digest(presented, self._expected):
            return handler
        log.warning("refused %s: %s", method, "no token" if not presented else "wrong token")
        message = (
            "missing bearer token: send metadata 'authorization: Bearer <token>'"
            if not presented
            else "invalid bearer token"
        )
        return _abort_handler(handler, message)
