"""Prometheus series of the requests the router serves, per model and route.

Per-model series carry `asset_id`, `interface` (the asset's interfaces, as the worker writes
them) and `model_type` (its runtime), as `services.common.model_labels` names them; request
series also `route` (the route the client named; empty when it named a model). A request is
counted once, as it ends (`RequestMetrics.finished`, from the usage ticket the gateway filled
in); a wake as it ends, and a wait in the admission queue as it ends (with a slot or without:
refused, or given up). A model's labelled series are resolved once and kept, so recording a
request costs a dict lookup and a few `inc`/`observe`. The in-flight and queued gauges are
read from the admission gates at each scrape: they cost serving nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from services.common.model_labels import MODEL_LABELS, ModelLabels, StatusCounters, model_labels
from services.common.telemetry import LATENCY_BUCKETS
from services.router.metrics.genai import GenAIMetrics, Operation

if TYPE_CHECKING:  # the admission records its span through this package: no import cycle
    from services.common.asset_proto import AssetRecord
    from services.router.admission import Admission, AssetGate
    from services.router.usage.ticket import UsageTicket


class _ModelSeries:
    """One model's (and route's) request series, each resolved at its first use (a chat
    model shows no embedding inputs, an embedding model no time to first token)."""

    __slots__ = ("labels", "requests", "_children")

    def __init__(self, metrics: RequestMetrics, labels: ModelLabels, route: str) -> None:
        self.labels = (*labels, route)
        self.requests = StatusCounters(metrics.requests, self.labels)
        """The request counter by status."""
        self._children: dict[MetricWrapperBase, Any] = {}

    def of(self, metric: MetricWrapperBase) -> Any:
        """The series of `metric` (a per-route one) for this model and route."""
        child = self._children.get(metric)
        if child is None:
            child = self._children[metric] = metric.labels(*self.labels)
        return child


class RequestMetrics:
    """Every per-request figure of a router, in `registry` (the HTTP app's, served on
    `/metrics`); with `genai`, each finished request is also recorded there."""

    def __init__(self, registry: CollectorRegistry | None = None,
                 genai: GenAIMetrics | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.genai = genai
        model, per_route, r = list(MODEL_LABELS), [*MODEL_LABELS, "route"], self.registry
        self.requests = Counter(
            "roundhouse_requests", "Requests served (HTTP API and gRPC front), by the model "
            "that answered or was last tried (empty: none was reached), the route named, and "
            "status: ok, cancelled, or the failure as the usage ledger writes it.",
            [*per_route, "status"], registry=r)
        self.duration = Histogram(
            "roundhouse_request_duration_seconds", "Time from a request's arrival to its end "
            "(a stream's last chunk), queue wait and wake included.", per_route,
            buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(
            "roundhouse_time_to_first_token_seconds", "Time from a chat's arrival to its first "
            "chunk.", per_route, buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(
            "roundhouse_time_per_output_token_seconds", "Time per generated token after the "
            "first, of chats that generated more than one.", per_route,
            buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram(
            "roundhouse_queue_wait_seconds", "Time requests waited in the router's admission "
            "queue for a slot of their model (those refused or given up too).", model,
            buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(
            "roundhouse_prompt_tokens", "Prompt tokens read (embedding inputs included).",
            per_route, registry=r)
        self.generated_tokens = Counter(
            "roundhouse_generated_tokens", "Tokens generated.", per_route, registry=r)
        self.embedding_inputs = Counter(
            "roundhouse_embedding_inputs", "Inputs embedded.", per_route, registry=r)
        self.wakes = Counter(
            "roundhouse_wakes", "Requests that had to wait for their model to be loaded.",
            model, registry=r)
        self.wake_delay = Histogram(
            "roundhouse_wake_delay_seconds", "How long requests waited for their model to be "
            "loaded.", model, buckets=LATENCY_BUCKETS, registry=r)
        self.route_attempts = Counter(
            "roundhouse_route_attempts", "Targets tried by requests to a route, by outcome (as "
            "the x-roundhouse-attempts header spells it: ok, overloaded, cache, ...).",
            ["route", "target", "outcome"], registry=r)
        self._series: dict[tuple[object, ...], _ModelSeries] = {}
        self._model: dict[ModelLabels, tuple[Counter, Histogram, Histogram]] = {}
        self._attempts: dict[tuple[str, str, str], Counter] = {}
        self._watched: set[int] = set()

    def watch(self, admission: Admission) -> None:
        """Export the in-flight and queued gauges of `admission`'s gates, and observe every
        request's wait at them (once per admission)."""
        if id(admission) not in self._watched:
            self._watched.add(id(admission))
            self.registry.register(AdmissionGauges(admission))
            admission.on_wait(self._waited)

    def _series_of(self, record: AssetRecord | None, interface: str, route: str) -> _ModelSeries:
        key = ((record.spec.asset_id, record.spec.runtime, tuple(record.spec.interface), route)
               if record is not None else ("", "", interface, route))
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _ModelSeries(self, model_labels(record, interface), route)
        return series

    def _model_series(self, labels: ModelLabels) -> tuple[Counter, Histogram, Histogram]:
        """The model's wake counter, wake delay and queue wait series."""
        series = self._model.get(labels)
        if series is None:
            series = self._model[labels] = (self.wakes.labels(*labels), self.wake_delay.labels(*labels),
                                            self.queue_wait.labels(*labels))
        return series

    def finished(self, ticket: UsageTicket, operation: Operation,
                 attempts: Sequence[tuple[str, str]] = ()) -> None:
        """Count a request that ended (`ticket.finish` was called), with the route `attempts`
        it made (target, outcome)."""
        series = self._series_of(ticket.asset if ticket.reached else None, ticket.interface,
                                 ticket.route_id)
        series.requests.of(ticket.status).inc()
        series.of(self.duration).observe(ticket.latency_s)
        if operation == "chat" and ticket.first_token_s is not None:
            series.of(self.ttft).observe(ticket.first_token_s)
            if ticket.completion_tokens > 1:
                series.of(self.tpot).observe((ticket.latency_s - ticket.first_token_s)
                                             / (ticket.completion_tokens - 1))
        if ticket.prompt_tokens:
            series.of(self.prompt_tokens).inc(ticket.prompt_tokens)
        if ticket.completion_tokens:
            series.of(self.generated_tokens).inc(ticket.completion_tokens)
        if ticket.inputs and ticket.status == "ok":
            series.of(self.embedding_inputs).inc(ticket.inputs)
        if ticket.route_id:
            for target, outcome in attempts:
                self._attempt(ticket.route_id, target, outcome).inc()
        if self.genai is not None:
            self.genai.finished(ticket, operation)

    def _attempt(self, route: str, target: str, outcome: str) -> Counter:
        key = (route, target, outcome)
        counter = self._attempts.get(key)
        if counter is None:
            counter = self._attempts[key] = self.route_attempts.labels(*key)
        return counter

    def woke(self, record: AssetRecord, seconds: float) -> None:
        """A request waited `seconds` for `record`'s model to be loaded."""
        wakes, delay, _ = self._model_series(model_labels(record))
        wakes.inc()
        delay.observe(seconds)

    def _waited(self, gate: AssetGate, seconds: float) -> None:
        """A request waited `seconds` at `gate`, served or not."""
        self._model_series((gate.asset_id, gate.interface, gate.model_type))[2].observe(seconds)


class AdmissionGauges(Collector):
    """`roundhouse_requests_in_flight` and `roundhouse_requests_queued` per model, read from
    the admission gates at each scrape."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission

    def describe(self) -> Iterable[Metric]:
        """The two gauges, without samples (so that registering reads no gate)."""
        return self._families()

    def collect(self) -> Iterable[Metric]:
        """The gauges with one sample per gate."""
        in_flight, queued = self._families()
        for gate in self._admission.gates():
            labels = [gate.asset_id, gate.interface, gate.model_type]
            stats = gate.stats
            in_flight.add_metric(labels, stats.in_flight)
            queued.add_metric(labels, stats.waiting)
        return [in_flight, queued]

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (GaugeMetricFamily("roundhouse_requests_in_flight", "Requests of the model this "
                                  "router has sent to its workers and not seen end.",
                                  labels=MODEL_LABELS),
                GaugeMetricFamily("roundhouse_requests_queued", "Requests of the model waiting "
                                  "in this router's admission queue.", labels=MODEL_LABELS))
