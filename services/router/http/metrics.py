"""Prometheus metrics of the HTTP API, kept in a registry of their own per app instance.

The same registry holds the gateway's per-model request figures (`services.router.metrics`),
so `GET /metrics` shows both.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics import MetricWrapperBase

from roundhouse.v1 import events_pb2
from services.common.telemetry import LATENCY_BUCKETS

THRASHING_EVENTS = "roundhouse.events.model.thrashing.>"
"""Where the jobs service announces thrashing (one event per model per episode)."""


class HttpMetrics:
    """Request counts and latency of one app's routes; rendered by `GET /metrics`.

    The labelled series a request touches are looked up once per label set and kept: finding
    them again through `labels()` costs more than counting."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "roundhouse_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "roundhouse_http_request_duration_seconds",
            "Time from request to the end of the response (a stream's last byte).",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.thrashing = Counter(
            "roundhouse_model_thrashing",
            "Thrashing episodes (models evicting each other on a worker), by model, as "
            "announced by the jobs service; every router counts every episode.",
            ["asset_id"],
            registry=self.registry,
        )
        self._series: dict[tuple[object, ...], MetricWrapperBase] = {}

    def _child(self, metric: MetricWrapperBase, *labels: str) -> MetricWrapperBase:
        key = (metric, *labels)
        child = self._series.get(key)
        if child is None:
            child = self._series[key] = metric.labels(*labels)
        return child

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request and its duration."""
        self._child(self.requests, route, method, str(status)).inc()  # type: ignore[attr-defined]
        self._child(self.latency, route, method).observe(seconds)  # type: ignore[attr-defined]

    async def observe_thrashing(self, event: events_pb2.Event) -> None:
        """Count a `model.thrashing` event (a handler for `THRASHING_EVENTS` on the event bus)."""
        if event.type == "model.thrashing" and event.asset_id:
            self._child(self.thrashing, event.asset_id).inc()  # type: ignore[attr-defined]

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
