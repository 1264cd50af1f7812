"""An OTLP/HTTP receiver for tests: what the services export, decoded and kept.

Services export with the standard OTLP/HTTP protobuf exporter when `OTEL_EXPORTER_OTLP_ENDPOINT`
points at `OtlpReceiver.endpoint`. The receiver decodes `/v1/traces` and `/v1/metrics` with
`opentelemetry.proto`, keeps every span and metric data point, and accepts `/v1/logs` without
keeping them. Tests wait for what they expect with a deadline (`polling.wait_until`).
"""

from __future__ import annotations

import gzip
import threading
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from polling import wait_until


@dataclass(frozen=True)
class ReceivedSpan:
    """One exported span, as the receiver keeps it (ids in hex; `parent_id` empty for a root)."""

    trace_id: str
    span_id: str
    parent_id: str
    name: str
    service: str
    kind: int
    attributes: dict[str, Any]
    start_ns: int
    end_ns: int


@dataclass(frozen=True)
class ReceivedPoint:
    """One data point of an exported metric: its attributes and its count (histograms) or value."""

    metric: str
    service: str
    attributes: dict[str, Any]
    value: float


@dataclass(frozen=True)
class Trace:
    """The spans of one trace received so far."""

    spans: list[ReceivedSpan]

    @property
    def services(self) -> set[str]:
        """The `service.name` of every span's resource."""
        return {s.service for s in self.spans}

    @property
    def names(self) -> set[str]:
        """Every span name in the trace."""
        return {s.name for s in self.spans}

    def roots(self) -> list[ReceivedSpan]:
        """Spans without a parent (one, in a whole trace)."""
        return [s for s in self.spans if not s.parent_id]

    def named(self, name: str, service: str = "") -> ReceivedSpan:
        """The span of that name (from that service); the test fails if there is none."""
        found = [s for s in self.spans if s.name == name and (not service or s.service == service)]
        assert found, f"no span {name!r} ({service or 'any service'}) in {sorted(self.names)}"
        return found[0]

    def parent(self, span: ReceivedSpan) -> ReceivedSpan | None:
        """The span's parent, when it is in the trace."""
        return next((s for s in self.spans if s.span_id == span.parent_id), None)

    def ancestors(self, span: ReceivedSpan) -> list[ReceivedSpan]:
        """The span's parent, its parent's parent... up to the root (as far as they arrived)."""
        chain: list[ReceivedSpan] = []
        while (up := self.parent(span)) is not None and up not in chain:
            chain.append(up)
            span = up
        return chain

    def shape(self) -> str:
        """The tree as text (service, name), for assertion messages."""
        children: dict[str, list[ReceivedSpan]] = defaultdict(list)
        for s in self.spans:
            children[s.parent_id].append(s)
        known = {s.span_id for s in self.spans}
        lines: list[str] = []

        def walk(span: ReceivedSpan, depth: int) -> None:
            lines.append(f"{'  ' * depth}{span.service}: {span.name}")
            for child in sorted(children[span.span_id], key=lambda c: c.start_ns):
                walk(child, depth + 1)

        for top in sorted((s for s in self.spans if s.parent_id not in known), key=lambda s: s.start_ns):
            walk(top, 0)
        return "\n".join(lines)


def _value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, kind) if kind else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


def _points(metric: Any) -> Iterator[tuple[Any, float]]:
    kind = metric.WhichOneof("data")
    if kind in ("gauge", "sum"):
        for point in getattr(metric, kind).data_points:
            yield point, point.as_double if point.WhichOneof("value") == "as_double" else point.as_int
    elif kind in ("histogram", "exponential_histogram", "summary"):
        for point in getattr(metric, kind).data_points:
            yield point, point.count


class OtlpReceiver:
    """An OTLP/HTTP (protobuf) endpoint on a free loopback port, serving from a thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[ReceivedSpan] = []
        self._points: list[ReceivedPoint] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        """The base URL for `OTEL_EXPORTER_OTLP_ENDPOINT`."""
        return f"http://127.0.0.1:{self._server.server_port}"

    def start(self) -> None:
        """Start serving."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()

    @property
    def spans(self) -> list[ReceivedSpan]:
        """Every span received so far, in arrival order."""
        with self._lock:
            return list(self._spans)

    @property
    def points(self) -> list[ReceivedPoint]:
        """Every metric data point received so far, in arrival order."""
        with self._lock:
            return list(self._points)

    def trace(self, trace_id: str) -> Trace:
        """The spans of trace `trace_id` received so far."""
        return Trace([s for s in self.spans if s.trace_id == trace_id])

    def traces_where(self, holds: Callable[[Trace], bool]) -> list[Trace]:
        """Every trace received so far for which `holds` is true."""
        by_id: dict[str, list[ReceivedSpan]] = defaultdict(list)
        for span in self.spans:
            by_id[span.trace_id].append(span)
        return [t for t in (Trace(spans) for spans in by_id.values()) if holds(t)]

    async def wait_for_trace(self, holds: Callable[[Trace], bool], timeout: float = 30) -> Trace:
        """The first trace for which `holds` is true, waiting for its spans to arrive."""
        found: list[Trace] = []

        def arrived() -> bool:
            found[:] = self.traces_where(holds)
            return bool(found)

        try:
            await wait_until(arrived, timeout=timeout, interval=0.05)
        except AssertionError:
            received = "\n---\n".join(t.shape() for t in self.traces_where(lambda t: True)[-6:])
            raise AssertionError(f"no such trace within {timeout} s; the last ones received:\n"
                                 f"{received or '(no span at all)'}") from None
        return found[0]

    async def wait_for_span(self, name: str, service: str = "", timeout: float = 30) -> ReceivedSpan:
        """The first span of that name (from that service), waiting for it to arrive."""
        def matching() -> list[ReceivedSpan]:
            return [s for s in self.spans if s.name == name and (not service or s.service == service)]

        await wait_until(matching, timeout=timeout, interval=0.05)
        return matching()[0]

    def metric(self, name: str) -> list[ReceivedPoint]:
        """Every data point received so far of the metric `name`."""
        return [p for p in self.points if p.metric == name]

    async def wait_for_metrics(self, names: set[str], timeout: float = 30) -> dict[str, list[ReceivedPoint]]:
        """Data points of each metric in `names`, waiting until every one has a non-zero one."""
        def complete() -> bool:
            return all(any(p.value for p in self.metric(n)) for n in names)

        try:
            await wait_until(complete, timeout=timeout, interval=0.05)
        except AssertionError:
            seen = {p.metric for p in self.points if p.value}
            raise AssertionError(f"metrics never exported (non-zero): {sorted(names - seen)}; "
                                 f"received: {sorted(seen)}") from None
        return {n: self.metric(n) for n in names}

    def _keep_traces(self, body: bytes) -> None:
        request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        spans: list[ReceivedSpan] = []
        for resource_spans in request.resource_spans:
            service = str(_attributes(resource_spans.resource.attributes).get("service.name", ""))
            for scope_spans in resource_spans.scope_spans:
                spans.extend(ReceivedSpan(
                    s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.name, service,
                    s.kind, _attributes(s.attributes), s.start_time_unix_nano, s.end_time_unix_nano,
                ) for s in scope_spans.spans)
        with self._lock:
            self._spans.extend(spans)

    def _keep_metrics(self, body: bytes) -> None:
        request = metrics_service_pb2.ExportMetricsServiceRequest.FromString(body)
        points: list[ReceivedPoint] = []
        for resource_metrics in request.resource_metrics:
            service = str(_attributes(resource_metrics.resource.attributes).get("service.name", ""))
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    points.extend(ReceivedPoint(metric.name, service, _attributes(p.attributes), v)
                                  for p, v in _points(metric))
        with self._lock:
            self._points.extend(points)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self
        keepers = {"/v1/traces": (receiver._keep_traces, trace_service_pb2.ExportTraceServiceResponse),
                   "/v1/metrics": (receiver._keep_metrics, metrics_service_pb2.ExportMetricsServiceResponse),
                   "/v1/logs": (lambda body: None, None)}

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                if self.path not in keepers:
                    self.send_error(404)
                    return
                keep, response = keepers[self.path]
                keep(body)
                payload = response().SerializeToString() if response else b""
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the exporters post every few hundred milliseconds."""

        return Handler


@contextmanager
def otlp_receiver() -> Iterator[OtlpReceiver]:
    """A started `OtlpReceiver`, stopped when the block ends."""
    receiver = OtlpReceiver()
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()
