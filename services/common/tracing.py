"""Trace context and request ids across services.

W3C trace context (`traceparent`, `tracestate`) and the request id (`x-request-id`) travel
together in one carrier: gRPC metadata (`grpc_metadata`, read back by `ErrorMappingInterceptor`),
NATS headers (`carrier`, `context_from`) and stored rows (`traceparent`, so an operation or an
outbox event joins the trace of the request that caused it). The request id in flight is kept
in a context variable; `RequestIdLogFilter` puts it on every log record.

With no exporter configured (see `services.common.telemetry`) no span is recorded, but an
incoming trace context still passes through to the next hop.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from contextvars import ContextVar, Token
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context

from services.common.inference_requests import MAX_REQUEST_ID_CHARS

REQUEST_ID_KEY = "x-request-id"
"""Header and metadata key of the request id (HTTP, gRPC and NATS alike)."""
TRACE_KEYS = ("traceparent", "tracestate")
GENAI_OPT_IN = "gen_ai_latest_experimental"
"""The `OTEL_SEMCONV_STABILITY_OPT_IN` value that turns the GenAI metric names on."""

_request_id: ContextVar[str] = ContextVar("roundhouse_request_id", default="")
_SANE_REQUEST_ID = re.compile(rf"^[A-Za-z0-9._:/+=@-]{{1,{MAX_REQUEST_ID_CHARS}}}$")
"""A request id that may travel as a header or metadata value and be logged as it is."""


def sane_request_id(value: str | None) -> bool:
    """Whether `value` may travel as a request id: short, printable ASCII, no spaces."""
    return bool(value) and _SANE_REQUEST_ID.match(value or "") is not None


def accept_request_id(value: str | None) -> str:
    """The caller's request id when it is sane (see `sane_request_id`); else a new one."""
    return value if value and sane_request_id(value) else os.urandom(16).hex()


def tracer(name: str) -> trace.Tracer:
    """The tracer of module `name` (from the global provider `setup_telemetry` installs)."""
    return trace.get_tracer(name)


def genai_semconv() -> bool:
    """Whether the OpenTelemetry GenAI metrics (still in development) are asked for:
    `OTEL_SEMCONV_STABILITY_OPT_IN` lists `gen_ai_latest_experimental`."""
    chosen = os.environ.get("OTEL_SEMCONV_STABILITY_OPT_IN", "")
    return GENAI_OPT_IN in {part.strip() for part in chosen.split(",")}


def recording() -> bool:
    """Whether spans are recorded in this process (`setup_telemetry` installed an exporting
    provider); without, a span only carries its parent's context on."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def set_request_id(request_id: str) -> Token[str]:
    """`request_id_scope` for code that cannot use a `with` block: put the request id (when
    sane) in scope; `reset_request_id` with the token ends it."""
    return _request_id.set(request_id if sane_request_id(request_id) else "")


def reset_request_id(token: Token[str]) -> None:
    """End what `set_request_id` began (a token of another context, as an abandoned stream's
    cleanup may hold, ended with that context)."""
    with suppress(ValueError):
        _request_id.reset(token)


def current_request_id() -> str:
    """The id of the request this code runs for; empty outside one."""
    return _request_id.get()


@contextmanager
def request_id_scope(request_id: str) -> Iterator[None]:
    """Run the block as part of request `request_id` (log records name it, calls carry it); an
    id that is not sane (see `sane_request_id`) is left out."""
    token = set_request_id(request_id)
    try:
        yield
    finally:
        _request_id.reset(token)


def carrier(context: Context | None = None) -> dict[str, str]:
    """The current trace context (or `context`'s) and request id as header-style pairs."""
    pairs: dict[str, str] = {}
    propagate.inject(pairs, context=context)
    if request_id := _request_id.get():
        pairs[REQUEST_ID_KEY] = request_id
    return pairs


def grpc_metadata() -> list[tuple[str, str]]:
    """`carrier()` as gRPC metadata pairs."""
    return list(carrier().items())


def context_from(pairs: Mapping[str, str] | Iterable[tuple[str, Any]] | None) -> Context:
    """The trace context a carrier (headers, metadata pairs) names; the empty context when
    it names none."""
    if pairs is None:
        return Context()
    mapping = pairs if isinstance(pairs, Mapping) else {
        k: v for k, v in pairs if isinstance(v, str)}
    return propagate.extract(mapping, context=Context())


def request_id_from(pairs: Mapping[str, str] | Iterable[tuple[str, Any]] | None) -> str:
    """The request id a carrier names; empty when none."""
    if pairs is None:
        return ""
    if isinstance(pairs, Mapping):
        return str(pairs.get(REQUEST_ID_KEY, ""))
    return next((str(v) for k, v in pairs if k == REQUEST_ID_KEY), "")


def traceparent() -> str:
    """The current span's `traceparent` (to store beside work done later on its behalf); empty
    when no trace is being recorded."""
    return carrier().get("traceparent", "")


@contextmanager
def joined(traceparent_value: str, request_id: str = "") -> Iterator[None]:
    """Run the block inside the trace `traceparent_value` names (empty: as it is), as part of
    request `request_id` (empty: as it is)."""
    token = None
    if traceparent_value:
        token = otel_context.attach(context_from({"traceparent": traceparent_value}))
    try:
        if request_id:
            with request_id_scope(request_id):
                yield
        else:
            yield
    finally:
        if token is not None:
            otel_context.detach(token)


class RequestIdLogFilter(logging.Filter):
    """Adds `request_tag` to every record: ` [request <id>]` inside a request, else empty."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Tag the record (never drops one)."""
        request_id = _request_id.get()
        record.request_tag = f" [request {request_id}]" if request_id else ""
        return True
