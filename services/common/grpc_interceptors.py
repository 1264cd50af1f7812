"""The interceptors every gRPC server runs, and the metadata keys services exchange.

`ErrorMappingInterceptor` turns domain errors into statuses in one place (an undecodable
request into INVALID_ARGUMENT, an unexpected error into INTERNAL with a logged trace);
`InternalTokenInterceptor` refuses calls without the internal token. The error mapping also
runs each call in a server span joined to the caller's trace, as part of its request id.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.common import errors
from services.common.db.unavailable import as_domain_error
from services.common.drain import Drain
from services.common.tracing import (
    context_from,
    recording,
    request_id_from,
    reset_request_id,
    set_request_id,
    tracer,
)

log = logging.getLogger(__name__)

ERROR_CLASS_KEY = "roundhouse-error"
RETRY_AFTER_KEY = "retry-after"
INTERNAL_TOKEN_KEY = "x-roundhouse-internal-token"
"""Metadata key that carries the internal token (see `CommonSettings.internal_token`)."""
QUEUE_TIMEOUT_KEY = "x-roundhouse-queue-timeout-s"
"""Metadata key of a router's call to a worker: seconds the request may still wait there for a
slot of its model (what is left of the asset's `queue_timeout_s`)."""
SHADOW_COPY_KEY = "x-roundhouse-shadow-copy"
"""Metadata key of a router's call to a worker that is a route's shadow copy: it does not count
as use of the model (its idle clock and eviction order stay as they were)."""
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
"""Method prefixes callable without the internal token: probes and tooling."""

_CODES: list[tuple[type[errors.RoundhouseError], grpc.StatusCode]] = [
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.Conflict, grpc.StatusCode.ABORTED),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.QuotaExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.RateLimited, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.BudgetExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.LimitsUnavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.ModelNotReady, grpc.StatusCode.UNAVAILABLE),
    (errors.UpstreamError, grpc.StatusCode.UNAVAILABLE),
    (errors.Cancelled, grpc.StatusCode.CANCELLED),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.ShuttingDown, grpc.StatusCode.UNAVAILABLE),
    (errors.DatabaseUnavailable, grpc.StatusCode.UNAVAILABLE),
]


def status_code_for(exc: errors.RoundhouseError) -> grpc.StatusCode:
    """The gRPC status code a domain error maps to."""
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


MAX_STATUS_MESSAGE_CHARS = 4096
"""A status message longer than this is cut: status and trailers together must stay within
gRPC's 16 KiB header limit, or the client gets "Stream removed" instead of the error."""


class _Undecodable:
    """Stands in for a request that does not parse, so the handler can refuse it in words."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _lenient(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserialize` that hands back an `_Undecodable` instead of raising (grpc would answer
    UNKNOWN with no reason)."""
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as exc:
            return _Undecodable(str(exc) or "cannot be decoded")

    return parse


def _admit(request: Any, drain: Drain | None) -> None:
    """Refuse a call before its handler runs: a request that did not parse, or any call once
    the service drains."""
    if isinstance(request, _Undecodable):
        raise errors.InvalidArgument(f"request: not a valid message: {request.reason}")
    if drain is not None:
        drain.refuse_new_work()


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    exc = as_domain_error(exc)
    if isinstance(exc, errors.RoundhouseError):
        # The class name lets a caller one hop up re-raise the same domain error.
        metadata = [(ERROR_CLASS_KEY, type(exc).__name__)]
        retry_after = getattr(exc, "retry_after_s", None)
        if retry_after is not None:
            metadata.append((RETRY_AFTER_KEY, f"{retry_after:.3f}"))
        context.set_trailing_metadata(tuple(metadata))
        message = exc.message
        if len(message) > MAX_STATUS_MESSAGE_CHARS:
            message = message[:MAX_STATUS_MESSAGE_CHARS] + " [...]"
        await context.abort(status_code_for(exc), message)
    log.exception("unhandled error in %s", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the service log")


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Turns domain errors into gRPC statuses in one place; anything else becomes INTERNAL.
    Also runs every call (health and reflection aside) in its trace: a server span named after
    its method, a child of the trace context the caller sent, with the caller's request id in
    scope (log records name it, calls made on its behalf carry it on); where no span is
    recorded (no exporter) the caller's context is only passed on. One wrapper does both: each
    layer of handler wrapping costs every call about 0.1 ms of CPU.

    With `drain`, once it has begun every new call (health and reflection aside) fails with
    `ShuttingDown` (UNAVAILABLE, with a retry hint); calls already running go on.
    """

    def __init__(self, drain: Drain | None = None) -> None:
        self._drain = drain
        self._tracer = tracer(__name__)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        open_service = method.startswith(OPEN_SERVICES)
        drain = None if open_service else self._drain
        metadata = tuple(handler_call_details.invocation_metadata or ())
        name = method.lstrip("/")
        tracer_ = None if open_service else self._tracer
        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                scope = _ServerScope(tracer_, metadata, name) if tracer_ is not None else None
                try:
                    _admit(request, drain)
                    return await inner_uu(request, context)  # type: ignore[arg-type]  # aio handler
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception as exc:  # noqa: BLE001 - mapped or logged as INTERNAL
                    if scope is not None:
                        scope.failed(exc)
                    await _abort(context, exc, method)
                finally:
                    if scope is not None:
                        scope.end(context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, _lenient(handler.request_deserializer), handler.response_serializer
            )
        if handler.unary_stream:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                scope = _ServerScope(tracer_, metadata, name) if tracer_ is not None else None
                try:
                    _admit(request, drain)
                    async for item in inner_us(request, context):  # type: ignore[attr-defined,arg-type]
                        yield item
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception as exc:  # noqa: BLE001
                    if scope is not None:
                        scope.failed(exc)
                    await _abort(context, exc, method)
                finally:
                    if scope is not None:
                        scope.end(context)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, _lenient(handler.request_deserializer), handler.response_serializer
            )
        return handler


class InternalTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses (UNAUTHENTICATED) every call that does not carry the internal token, except
    health and reflection."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_SERVICES) \
                or self._carries_token(handler_call_details):
            return handler
        return _refusing(handler)

    def _carries_token(self, details: grpc.HandlerCallDetails) -> bool:
        sent = next((v for k, v in details.invocation_metadata or () if k == INTERNAL_TOKEN_KEY), "")
        sent_bytes = sent.encode() if isinstance(sent, str) else bytes(sent)
        return hmac.compare_digest(sent_bytes, self._token)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only answers UNAUTHENTICATED."""
    async def refuse(_: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong internal token")

    async def refuse_stream(_: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong internal token")
        yield  # unreachable: makes this an async generator, as a streaming handler must be

    wire = (handler.request_deserializer, handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, *wire)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, *wire)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, *wire)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, *wire)


class _ServerScope:
    """One call's trace context and request id, current from its start to `end`, and its server
    span when spans are recorded. A class, not a generator's context manager: it is on every
    call's path."""

    __slots__ = ("_context_token", "_request_token", "_span")

    def __init__(self, tracer_: trace.Tracer, metadata: tuple[Any, ...], name: str) -> None:
        self._request_token = set_request_id(request_id_from(metadata))
        parent = context_from(metadata) if any(k == "traceparent" for k, _ in metadata) else None
        self._span: trace.Span | None = None
        if recording():
            self._span = tracer_.start_span(name, context=parent, kind=SpanKind.SERVER,
                                            attributes=_rpc_attributes(name))
            parent = trace.set_span_in_context(self._span, parent)
        self._context_token = otel_context.attach(parent) if parent is not None else None

    def failed(self, exc: BaseException) -> None:
        """Record why the call failed on its span (its status follows the call's code)."""
        if self._span is not None:
            self._span.record_exception(exc)
            self._span.set_status(Status(StatusCode.ERROR, type(exc).__name__))

    def end(self, context: grpc.aio.ServicerContext) -> None:
        """End the span (failed when the call's status is not OK) and leave the call's scope."""
        if self._span is not None:
            _end_status(self._span, context)
            self._span.end()
        if self._context_token is not None:
            otel_context.detach(self._context_token)
        reset_request_id(self._request_token)


def _rpc_attributes(name: str) -> dict[str, str]:
    service, _, method = name.partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}


def _end_status(span: trace.Span, context: grpc.aio.ServicerContext) -> None:
    """Mark the span failed when the call ends with a status other than OK."""
    code = context.code() if hasattr(context, "code") else None
    if code is not None and code != grpc.StatusCode.OK:
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        span.set_status(Status(StatusCode.ERROR, str(code.name)))
