"""The gRPC server interceptor: bearer-token auth, unreadable requests, and typed errors ->
status codes.

One interceptor, not a chain: grpc.aio awaits every interceptor on every call. Wrapped
handlers are cached per method, so the per-call cost is one dict lookup.
"""

from __future__ import annotations

import contextlib
import hmac
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc import aio

from router.errors import SidecarError, sidecar_error_of, status_of
from router.metrics import SidecarMetrics

logger = logging.getLogger(__name__)

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]]
# Answered without a token even when the sidecar has a data token: load balancers and
# Kubernetes' gRPC probes send no metadata, and SERVING or not tells nothing of the data.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


@dataclass(frozen=True, slots=True)
class Unreadable:
    """What a request's bytes decoded to when they are not the method's message."""

    reason: str


def tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserializer`` answering ``Unreadable`` instead of raising: grpc.aio turns a
    deserializer's exception into UNKNOWN and an ERROR traceback, where a malformed request
    is the caller's INVALID_ARGUMENT."""
    if deserializer is None:
        return None

    def read(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as error:
            return Unreadable(str(error))

    return read


def _rebuild(handler: grpc.RpcMethodHandler, unary: Any = None, stream: Any = None) -> Any:
    """The same handler with its unary-unary or unary-stream behaviour replaced and its
    request deserializer ``tolerant``."""
    if handler.unary_unary is not None and unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            unary,
            request_deserializer=tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None and stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            stream,
            request_deserializer=tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
    if handler.stream_stream is not None and stream is not None:  # server reflection
        return grpc.stream_stream_rpc_method_handler(
            stream,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler


#: The longest status message sent, in UTF-8 bytes (about 6 KB once percent-encoded in
#: the grpc-message trailer, under the clients' 8 KiB metadata limit).
MAX_STATUS_MESSAGE_BYTES = 2048


def status_message(message: str) -> str:
    """``message`` cut to ``MAX_STATUS_MESSAGE_BYTES``: an error that echoes a long value
    the caller sent (a 20,000-character task_hint) went over the client's metadata limit,
    and the client saw RESOURCE_EXHAUSTED instead of the status the server sent."""
    encoded = message.encode()
    if len(encoded) <= MAX_STATUS_MESSAGE_BYTES:
        return message
    kept = encoded[:MAX_STATUS_MESSAGE_BYTES].decode(errors="ignore")
    return f"{kept}... ({len(encoded) - len(kept.encode())} more bytes)"


def _bearer(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


class BearerAuth:
    """Bearer tokens: admin methods need the admin token; data methods the data token, if set.

    No token or a wrong one is UNAUTHENTICATED; the data token on an admin method is
    PERMISSION_DENIED. The admin token is accepted on data methods too. Without a
    configured admin token, admin methods are closed (UNAUTHENTICATED for every caller),
    never open. Health checks (``OPEN_METHOD_PREFIXES``) are always open.
    """

    def __init__(
        self,
        admin_methods: Collection[str],
        admin_token: str | None,
        data_token: str | None = None,
    ) -> None:
        self._admin_methods = frozenset(admin_methods)
        self._admin_token = admin_token
        self._data_token = data_token

    def needs_token(self, method: str) -> bool:
        """Whether calls to ``method`` are checked at all (the open data plane and health
        checks are not)."""
        if method in self._admin_methods:
            return True
        return self._data_token is not None and not method.startswith(OPEN_METHOD_PREFIXES)

    def verdict(self, method: str, metadata: Any) -> tuple[grpc.StatusCode, str] | None:
        """None when the call may proceed, else the status code and message to refuse with."""
        admin = method in self._admin_methods
        if admin and self._admin_token is None:
            return (
                grpc.StatusCode.UNAUTHENTICATED,
                "admin RPCs are disabled: the sidecar has no admin_token "
                "(set SPECROUTE_ADMIN_TOKEN or admin_token in the config file)",
            )
        token = _bearer(metadata)
        if token is None:
            return grpc.StatusCode.UNAUTHENTICATED, "missing bearer token (authorization metadata)"
        if self._admin_token is not None and _same(token, self._admin_token):
            return None
        if not admin and self._data_token is not None and _same(token, self._data_token):
            return None
        if admin and self._data_token is not None and _same(token, self._data_token):
            return grpc.StatusCode.PERMISSION_DENIED, "the data-plane token cannot call admin RPCs"
        return grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token"


class EdgeInterceptor(aio.ServerInterceptor):
    """The server's one interceptor: bearer-token auth, then unreadable requests and typed
    errors -> status codes.

    Each method's wrapped handler is built once and cached, so a call costs one dict
    lookup here; token checks run inside the wrapper only for methods that need a token.
    :class:`SidecarError` subclasses become their status code, a request whose bytes are
    not the method's message INVALID_ARGUMENT, and anything else INTERNAL with its
    traceback logged (grpc.aio's own answer would be UNKNOWN); refusals and errors are
    counted by code.
    """

    def __init__(self, auth: BearerAuth, metrics: SidecarMetrics | None = None) -> None:
        self._auth = auth
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
        wrapped = self._wrap(method, handler)
        self._cache[method] = wrapped
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        inner_unary = handler.unary_unary
        inner_stream = handler.unary_stream or handler.stream_stream
        admit = self._admitter(method)
        refusals = self._refusals

        async def unary(request: Any, context: aio.ServicerContext) -> Any:
            await admit(request, context)
            async with refusals(method, context):
                return await inner_unary(request, context)

        async def stream(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            await admit(request, context)
            async with refusals(method, context):
                async for response in inner_stream(request, context):
                    yield response

        async def written(request: Any, context: aio.ServicerContext) -> None:
            # A streaming handler that sends with context.write() (grpc_health's Watch)
            # is a coroutine, not an async generator: iterated, it failed with INTERNAL.
            await admit(request, context)
            async with refusals(method, context):
                await inner_stream(request, context)

        streaming = written if inspect.iscoroutinefunction(inner_stream) else stream
        return _rebuild(handler, unary, streaming)  # type: ignore[no-any-return]

    def _admitter(self, method: str) -> Callable[[Any, aio.ServicerContext], Awaitable[None]]:
        """The checks before a call of ``method`` runs: its token, when it needs one, and
        a request that could not be read as its message."""
        check = self._check if self._auth.needs_token(method) else None

        async def admit(request: Any, context: aio.ServicerContext) -> None:
            if check is not None:
                await check(method, context)
            if isinstance(request, Unreadable):
                await self._refuse_unreadable(method, request, context)

        return admit

    @contextlib.asynccontextmanager
    async def _refusals(self, method: str, context: aio.ServicerContext) -> AsyncIterator[None]:
        """A call's errors as its status: a SidecarError's own, INTERNAL (logged) for any
        other exception."""
        try:
            yield
        except SidecarError as error:
            await self._fail(context, status_of(error).grpc_code, str(error))
        except aio.AbortError:
            raise
        except Exception as error:  # the caller gets INTERNAL, the log the rest
            await self._unexpected(method, error, context)

    async def _check(self, method: str, context: aio.ServicerContext) -> None:
        verdict = self._auth.verdict(method, context.invocation_metadata())
        if verdict is not None:
            await self._fail(context, *verdict)

    async def _refuse_unreadable(
        self, method: str, request: Unreadable, context: aio.ServicerContext
    ) -> None:
        message = f"the request to {method} is not its message: {request.reason}"
        await self._fail(context, grpc.StatusCode.INVALID_ARGUMENT, message)

    async def _unexpected(
        self, method: str, error: Exception, context: aio.ServicerContext
    ) -> None:
        await self._fail(context, grpc.StatusCode.INTERNAL, str(sidecar_error_of(error, method)))

    async def _fail(
        self, context: aio.ServicerContext, code: grpc.StatusCode, message: str
    ) -> None:
        if self._metrics is not None:
            self._metrics.errors.labels(code=code.name).inc()
        logger.debug("request refused with %s: %s", code.name, message)
        await context.abort(code, status_message(message))
