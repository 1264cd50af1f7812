"""The spans of a request's steps at the router: `resolve`, `key check`, `admission`, `wake`,
`dispatch`, children of the request's front span (the HTTP API's, or the gRPC front's server
span).

With no exporter (see `services.common.telemetry`) no span is recorded and a step costs about
a microsecond; the trace context the request came with still reaches the calls made for it.
A step's span is made current only where the block calls another service, so that call joins
the trace (`current=True`); that attaches a context, which must be detached in the same task,
so only a coroutine's block may ask for it, never one that spans a generator's `yield`.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.util.types import Attributes

from services.common.tracing import tracer

_tracer = tracer(__name__)


class _Step:
    """The context manager `step` returns (a class: cheaper to enter than a generator's)."""

    __slots__ = ("_span", "_token")

    def __init__(self, span: Span, current: bool) -> None:
        self._span = span
        self._token = (otel_context.attach(trace.set_span_in_context(span))
                       if current and span.is_recording() else None)

    def __enter__(self) -> Span:
        return self._span

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 _: TracebackType | None) -> None:
        if exc is not None:
            failed(self._span, exc)
        if self._token is not None:
            otel_context.detach(self._token)
        self._span.end()


def step(name: str, attributes: Attributes = None, *, kind: SpanKind = SpanKind.INTERNAL,
         current: bool = False) -> _Step:
    """A span named `name` around a `with` block, a child of the current span, marked failed
    when the block raises (see `failed`); with `current`, calls made in the block are its
    children."""
    return _Step(start(name, attributes, kind=kind), current)


def start(name: str, attributes: Attributes = None, *,
          kind: SpanKind = SpanKind.INTERNAL) -> Span:
    """A span the caller ends (for a step whose end is not a block's: a stream's)."""
    return _tracer.start_span(name, kind=kind, attributes=attributes)


def failed(span: Span, exc: BaseException) -> None:
    """Mark `span` failed with `exc`'s type (`error.type`); a cancellation (the client went
    away, the request moved on) is not a failure."""
    if span.is_recording() and not isinstance(exc, asyncio.CancelledError | GeneratorExit):
        span.set_attribute("error.type", type(exc).__name__)
        span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
