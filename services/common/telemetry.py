"""Process-wide telemetry: OpenTelemetry tracing and metrics providers, and logging.

Every service calls `setup_telemetry` once at start-up. Spans and metrics are recorded
through the global OpenTelemetry API and exported as the standard `OTEL_*` variables say:
over OTLP (HTTP/protobuf) when `OTEL_EXPORTER_OTLP_ENDPOINT` (or a signal's own endpoint) is
set, unless `OTEL_TRACES_EXPORTER` / `OTEL_METRICS_EXPORTER` is `none` or `OTEL_SDK_DISABLED`
is true; to the console when asked (`ROUNDHOUSE_OTEL_CONSOLE`). With neither, no span is
recorded at all. Prometheus metrics for the `/metrics` endpoints are separate.
Every log record is scrubbed of secrets (`services.common.secrets.SecretFilter`) and names
the request it was written for (`services.common.tracing.RequestIdLogFilter`).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

from services.common.secrets import DEFAULT_UPSTREAM_KEY_ENVS, SecretFilter
from services.common.tracing import RequestIdLogFilter

LOG_FORMAT = "%(asctime)s %(levelname)s {service} %(name)s%(request_tag)s: %(message)s"
OWN_HANDLER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
"""Loggers that log through handlers of their own (uvicorn's), not the root's: a filter on
the root handler never sees their records, so they get the secret filter themselves."""

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25,
                   0.5, 0.75, 1, 2.5, 5, 10, 30, 60, 120, 300)
"""Histogram buckets (seconds) of the latencies Prometheus metrics keep: fine enough at the
low end to see half a millisecond (a router's overhead, a decode step)."""


@dataclass(frozen=True)
class Telemetry:
    """The providers installed for this process, and the service they name."""

    service_name: str
    tracer_provider: TracerProvider
    meter_provider: MeterProvider

    def shutdown(self) -> None:
        """Flush and stop the exporters (at process exit)."""
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


_lock = threading.Lock()
_installed: Telemetry | None = None


class _ServiceLogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The one stderr handler `setup_telemetry` installs on the root logger."""


def setup_telemetry(
    service_name: str, console: bool = False, level: str | int = "INFO",
    key_envs: Iterable[str] = DEFAULT_UPSTREAM_KEY_ENVS,
) -> Telemetry:
    """Install tracing and metrics providers for `service_name` and configure logging.

    Idempotent: OpenTelemetry's global providers can be set once per process, so the first
    call installs them and later calls return the same `Telemetry`; each call (re)applies
    the log level, format and secret filter (`key_envs`: the upstream key variables whose
    values it scrubs). `console` prints spans and metrics to stderr.
    """
    global _installed
    configure_logging(service_name, level, key_envs)
    with _lock:
        if _installed is not None:
            return _installed
        resource = Resource.create({SERVICE_NAME: service_name})
        tracer_provider = TracerProvider(resource=resource)
        readers: list[PeriodicExportingMetricReader] = []
        exporting = _otlp_exporters(tracer_provider, readers)
        if console:
            tracer_provider.add_span_processor(
                BatchSpanProcessor(ConsoleSpanExporter(out=sys.stderr))
            )
            readers.append(
                PeriodicExportingMetricReader(ConsoleMetricExporter(out=sys.stderr))
            )
        meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        if console or exporting:  # else the API's no-op tracer: nothing recorded, context passed on
            trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(meter_provider)
        _installed = Telemetry(service_name, tracer_provider, meter_provider)
        return _installed


def _otlp_exporters(tracer_provider: TracerProvider,
                    readers: list[PeriodicExportingMetricReader]) -> bool:
    """Add the OTLP span exporter and metric reader the `OTEL_*` variables ask for; whether
    spans are exported. `OTEL_TRACES_EXPORTER` / `OTEL_METRICS_EXPORTER` are lists (`otlp`,
    `console`, `none`); unset, `otlp` when an endpoint is set. OTLP goes over HTTP/protobuf (the
    exporters read their endpoint, headers and timeouts themselves); `OTEL_EXPORTER_OTLP_PROTOCOL`
    other than `http/protobuf` is refused at start rather than silently not honoured."""
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")

    def chosen(variable: str, signal_endpoint: str) -> set[str]:
        default = "otlp" if endpoint or env.get(signal_endpoint) else "none"
        return {part.strip() for part in env.get(variable, default).split(",") if part.strip()}

    traces = chosen("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    metric_exporters = chosen("OTEL_METRICS_EXPORTER", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
    if "otlp" in traces | metric_exporters:
        protocol = env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        if protocol != "http/protobuf":
            raise RuntimeError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol}: only http/protobuf is supported")
    if "otlp" in metric_exporters:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    if "console" in metric_exporters:
        readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter(out=sys.stderr)))
    if "console" in traces:
        tracer_provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
    if "otlp" in traces:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return bool(traces & {"otlp", "console"})


def configure_logging(
    service_name: str, level: str | int = "INFO", key_envs: Iterable[str] = DEFAULT_UPSTREAM_KEY_ENVS
) -> None:
    """One-line log records on stderr naming the service, scrubbed of secrets; replaces its
    own earlier setup."""
    root = logging.getLogger()
    root.setLevel(level.upper() if isinstance(level, str) else level)
    handler = next((h for h in root.handlers if isinstance(h, _ServiceLogHandler)), None)
    if handler is None:
        handler = _ServiceLogHandler(sys.stderr)
        root.addHandler(handler)
    service = service_name.replace("%", "%%")
    handler.setFormatter(logging.Formatter(LOG_FORMAT.format(service=service)))
    if not any(isinstance(f, RequestIdLogFilter) for f in handler.filters):
        handler.addFilter(RequestIdLogFilter())
    secret_filter = SecretFilter(key_envs)
    for target in [handler, *(logging.getLogger(name) for name in OWN_HANDLER_LOGGERS)]:
        for old in [f for f in target.filters if isinstance(f, SecretFilter)]:
            target.removeFilter(old)
        target.addFilter(secret_filter)
