"""The layers around the HTTP API: outermost request ids, the request's span, errors and
metrics; then the drain; innermost (after authentication, see `auth`) the body size limit.

Plain ASGI middlewares (not Starlette's `BaseHTTPMiddleware`) so that streamed responses
pass through untouched and the client's disconnect still reaches the endpoint.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.routing import get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.drain import Drain
from services.common.tracing import accept_request_id, context_from, request_id_scope, tracer
from services.router.http.errors import HTTPProblem, error_response
from services.router.http.metrics import HttpMetrics
from services.router.http.ratelimit import ratelimit_headers
from services.router.limits import open_report

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
ErrorRenderer = Callable[[BaseException, str | None], Response]
"""An API's error response for an exception and the request id (see `error_response`)."""
ALWAYS_SERVED = frozenset({"/healthz", "/readyz", "/metrics"})
"""Paths served while the router drains: the probes and the metrics."""
_tracer = tracer(__name__)


def _front_span(scope: Scope, headers: Headers) -> Span:
    """The request's server span, a child of the trace the client's `traceparent` names (a new
    trace without one); named `<method> <route>` once the route is known (see `_ended`)."""
    parent = context_from(headers) if "traceparent" in headers else None
    return _tracer.start_span(scope["method"], context=parent, kind=SpanKind.SERVER, attributes={
        "http.request.method": scope["method"], "url.path": scope["path"]})


def _ended(span: Span, scope: Scope, route: str, status: int) -> None:
    if span.is_recording():
        if route != "unmatched":
            span.update_name(f"{scope['method']} {route}")
            span.set_attribute("http.route", route)
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
    span.end()


class RequestContextMiddleware:
    """Tags every request with an id, runs it in a span, renders every error and records it
    in `HttpMetrics`.

    The id is stored as `request.state.request_id`, is the request id in scope while it runs
    (log records name it, the gRPC calls made for it carry it) and is returned in
    `x-request-id` on every response, errors and streams included. The span (`POST
    /v1/chat/completions`...) joins the client's trace when it sends a `traceparent`; the
    steps of the request are its children. An exception raised inside (a refused key, a body
    over the limit, a domain error) becomes OpenAI's error shape here.
    A request whose key has rate limits gets the `x-ratelimit-*` headers, refused or served.
    """

    def __init__(self, app: ASGIApp, *, metrics: HttpMetrics,
                 error_dialects: Sequence[tuple[str, ErrorRenderer]] = ()) -> None:
        self.app = app
        self.metrics = metrics
        self.error_dialects = tuple(error_dialects)
        """(path prefix, renderer): errors on paths under a prefix take that API's shape."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        request_id = accept_request_id(headers.get(REQUEST_ID_HEADER))
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        span = _front_span(scope, headers)
        # Without a recorded span or a trace from the client there is no context to pass on.
        token = (otel_context.attach(trace.set_span_in_context(span))
                 if span.get_span_context().is_valid else None)
        response: MutableMapping[str, Any] = {"started": False, "status": 500}
        limits = open_report()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                response.update(started=True, status=message["status"])
                headers = [(k, v) for k, v in message.get("headers", [])
                           if k.lower() != REQUEST_ID_HEADER.encode()]
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode("ascii")))
                if limits.status is not None:
                    headers += ratelimit_headers(limits.status)
                message = {**message, "headers": headers}
            await send(message)

        try:
            with request_id_scope(request_id):
                try:
                    await self.app(scope, receive, send_with_id)
                except Exception as exc:
                    if response["started"]:
                        log.error("request %s failed after its response started", request_id,
                                  exc_info=exc)
                        raise
                    path = get_route_path(scope)
                    render = next((r for prefix, r in self.error_dialects if path.startswith(prefix)),
                                  error_response)
                    await render(exc, request_id)(scope, receive, send_with_id)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe_request(route, scope["method"], response["status"],
                                         time.perf_counter() - started)
            _ended(span, scope, route, response["status"])
            if token is not None:
                otel_context.detach(token)


class DrainMiddleware:
    """Once the drain has begun, refuses every new request (but `ALWAYS_SERVED`) with
    `ShuttingDown`: 503 `shutting_down` with a Retry-After, shaped by `RequestContextMiddleware`.
    Requests already running, streams included, go on."""

    def __init__(self, app: ASGIApp, *, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in ALWAYS_SERVED:
            self.drain.refuse_new_work()
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Bounds every request body: larger than `max_body_bytes` is refused with 413, by its
    Content-Length or, without one, once the bytes read pass the limit. The body the app
    reads is the one read here, so it is never read unbounded. Inside `auth`: a request
    without a valid key is refused before a byte of its body is read."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.app(scope, await self._read_body(scope, receive), send)

    async def _read_body(self, scope: Scope, receive: Receive) -> Receive:
        """Read the whole body, refusing it past the limit; return a receive that replays it."""
        declared = Headers(scope=scope).get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise HTTPProblem(400, "The Content-Length header is not a number.",
                                  "invalid_request")
            if int(declared) > self.max_body_bytes:
                raise self._too_large()
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return _replay([], message, receive)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        return _replay([{"type": "http.request", "body": body, "more_body": False}], None, receive)

    def _too_large(self) -> HTTPProblem:
        return HTTPProblem(413, f"The request body is larger than the limit of "
                                f"{self.max_body_bytes} bytes.", "request_too_large")


def _replay(messages: list[Message], last: Message | None, receive: Receive) -> Receive:
    """A receive that yields `messages`, then `last` (if any), then defers to `receive`."""
    pending = [*messages, *([last] if last is not None else [])]

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
