"""gRPC server interceptors: typed errors -> status codes, and bearer-token auth.

Wrapped handlers are cached per method, so the per-call cost is one dict lookup.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any

import grpc
from grpc import aio

from router.errors import SidecarError, status_of
from router.metrics import SidecarMetrics

logger = logging.getLogger(__name__)

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]]


def _rebuild(handler: grpc.RpcMethodHandler, unary: Any = None, stream: Any = None) -> Any:
    """The same handler with its unary-unary or unary-stream behaviour replaced."""
    if handler.unary_unary is not None and unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None and stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            stream,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler


class ErrorInterceptor(aio.ServerInterceptor):
    """Maps :class:`SidecarError` subclasses to gRPC status codes; counts errors by code."""

    def __init__(self, metrics: SidecarMetrics | None = None) -> None:
        self._metrics = metrics
        self._cache: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        cached = self._cache.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        wrapped = self._wrap(handler)
        self._cache[method] = wrapped
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        abort = self._abort
        inner_unary = handler.unary_unary
        inner_stream = handler.unary_stream

        async def unary(request: Any, context: aio.ServicerContext) -> Any:
            try:
                return await inner_unary(request, context)
            except SidecarError as error:
                await abort(context, error)

        async def stream(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for response in inner_stream(request, context):
                    yield response
            except SidecarError as error:
                await abort(context, error)

        return _rebuild(handler, unary, stream)  # type: ignore[no-any-return]

    async def _abort(self, context: aio.ServicerContext, error: SidecarError) -> None:
        code = status_of(error).grpc_code
        if self._metrics is not None:
            self._metrics.errors.labels(code=code.name).inc()
        logger.debug("request refused with %s: %s", code.name, error)
        await context.abort(code, str(error))


def _bearer(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


class AuthInterceptor(aio.ServerInterceptor):
    """Bearer tokens: admin methods need the admin token; data methods the data token, if set.

    No token or a wrong one is UNAUTHENTICATED; the data token on an admin method is
    PERMISSION_DENIED. The admin token is accepted on data methods too. Without a
    configured admin token, admin methods are closed (UNAUTHENTICATED for every caller),
    never open.
    """

    def __init__(
        self,
        admin_methods: Collection[str],
        admin_token: str | None,
        data_token: str | None = None,
        metrics: SidecarMetrics | None = None,
    ) -> None:
        self._admin_methods = frozenset(admin_methods)
        self._admin_token = admin_token
        self._data_token = data_token
        self._metrics = metrics

    def _needs_token(self, method: str) -> bool:
        return method in self._admin_methods or self._data_token is not None

    def _verdict(self, method: str, token: str | None) -> tuple[grpc.StatusCode, str] | None:
        admin = method in self._admin_methods
        if admin and self._admin_token is None:
            return (
                grpc.StatusCode.UNAUTHENTICATED,
                "admin RPCs are disabled: the sidecar has no admin_token "
                "(set SPECROUTE_ADMIN_TOKEN or admin_token in the config file)",
            )
        if token is None:
            return grpc.StatusCode.UNAUTHENTICATED, "missing bearer token (authorization metadata)"
        if self._admin_token is not None and _same(token, self._admin_token):
            return None
        if not admin and self._data_token is not None and _same(token, self._data_token):
            return None
        if admin and self._data_token is not None and _same(token, self._data_token):
            return grpc.StatusCode.PERMISSION_DENIED, "the data-plane token cannot call admin RPCs"
        return grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token"

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if not self._needs_token(method):  # the open data plane: no metadata parsing
            return await continuation(handler_call_details)
        verdict = self._verdict(method, _bearer(handler_call_details.invocation_metadata))
        handler = await continuation(handler_call_details)
        if verdict is None or handler is None:
            return handler
        code, message = verdict
        if self._metrics is not None:
            self._metrics.errors.labels(code=code.name).inc()

        async def refuse_unary(request: Any, context: aio.ServicerContext) -> Any:
            await context.abort(code, message)

        async def refuse_stream(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            await context.abort(code, message)
            yield None  # pragma: no cover - abort raises

        return _rebuild(handler, refuse_unary, refuse_stream)  # type: ignore[no-any-return]
