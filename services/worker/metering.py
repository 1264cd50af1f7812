"""What a worker records of one request and of one load: metrics (`metrics.WorkerMetrics`) and
spans.

A request's spans are children of the worker's server span (the `ErrorMappingInterceptor` opened it,
joined to the router's call): `queue` (its wait for a slot of its model), then `prefill` and
`decode`, which the chat engine timed for this request alone, even as it shared forward passes
with others; the server span gets the OpenTelemetry GenAI attributes. A load is the span `load`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

from opentelemetry import trace

from services.common.asset_proto import AssetRecord
from services.common.assetspec import AssetSpec
from services.common.errors import status_of
from services.common.model_labels import model_labels
from services.common.tracing import tracer
from services.worker.metrics import ModelMeters, WorkerMetrics
from services.worker.models.types import ChatDelta, Phases, Usage

_tracer = tracer(__name__)
NS = 1e9


class RequestMeter:
    """One request at the worker, from its arrival to its end, counted once as it ends (`end`;
    as a context manager, with the status the body ended with).

    `model` names the model once it is found here (a request for a model the worker does not
    hold counts with empty labels, whatever name it gave), `queue` times the wait for a slot,
    `chat_ended` and `embedded` keep what the answer said. Nothing here runs per token.
    """

    __slots__ = ("_metrics", "_asset_id", "_meters", "_started_ns", "_usage", "_phases", "_inputs",
                 "_span")

    def __init__(self, metrics: WorkerMetrics, asset_id: str) -> None:
        self._metrics = metrics
        self._asset_id = asset_id
        self._meters: ModelMeters | None = None
        self._started_ns = time.time_ns()
        self._usage: Usage | None = None
        self._phases: Phases | None = None
        self._inputs = 0
        self._span = trace.get_current_span()
        if self._span.is_recording():
            self._span.set_attribute("gen_ai.request.model", asset_id)

    def __enter__(self) -> RequestMeter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.end(status_of(exc))

    def model(self, spec: AssetSpec) -> None:
        """The request is for `spec`'s model (held here)."""
        self._meters = self._metrics.model(spec)

    @contextmanager
    def queue(self) -> Iterator[None]:
        """Time the body as the request's wait for a slot (span `queue`), however the wait
        ends: with a slot, refused (queue full, timed out, the worker draining) or given up."""
        started = time.perf_counter()
        try:
            with _tracer.start_as_current_span("queue"):
                yield
        finally:
            if self._meters is not None:
                self._meters.queue_wait.observe(time.perf_counter() - started)

    def chat_ended(self, delta: ChatDelta) -> None:
        """Keep the usage and phases of a chat's last delta (or deltas: usage may come last)."""
        self._usage = delta.usage or self._usage
        self._phases = delta.phases or self._phases

    def embedded(self, inputs: int, prompt_tokens: int) -> None:
        """Keep the size of an embedding request's answer."""
        self._inputs = inputs
        self._usage = Usage(prompt_tokens=prompt_tokens)

    def end(self, status: str) -> None:
        """Count the request, ended with `status`, and its figures; record its phases' spans."""
        ended = time.time_ns()
        meters = self._meters or self._metrics.model(None)
        meters.requests.of(status).inc()
        meters.duration.observe((ended - self._started_ns) / NS)
        usage, phases = self._usage, self._phases
        if usage is not None:
            meters.prompt_tokens.inc(usage.prompt_tokens)
            meters.generated_tokens.inc(usage.completion_tokens)
        if self._inputs:
            meters.embedding_inputs.inc(self._inputs)
        if phases is not None and phases.first_token_ns:
            meters.ttft.observe(max(phases.first_token_ns - self._started_ns, 0) / NS)
            if usage is not None and usage.completion_tokens > 1 and phases.end_ns:
                meters.tpot.observe((phases.end_ns - phases.first_token_ns) / NS / (usage.completion_tokens - 1))
        if self._span.is_recording():
            self._record_spans(usage, phases)

    def _record_spans(self, usage: Usage | None, phases: Phases | None) -> None:
        span = self._span
        span.set_attribute("gen_ai.operation.name", "embeddings" if self._inputs else "chat")
        if self._meters is not None:
            span.set_attribute("gen_ai.response.model", self._asset_id)
        if usage is not None:
            span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
            if not self._inputs:
                span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)
        if phases is None or not (phases.prefill_start_ns and phases.first_token_ns):
            return
        parent = trace.set_span_in_context(span)
        prefill = _tracer.start_span("prefill", parent, start_time=phases.prefill_start_ns)
        if usage is not None:
            prefill.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
        prefill.end(end_time=phases.first_token_ns)
        if phases.end_ns:
            decode = _tracer.start_span("decode", parent, start_time=phases.first_token_ns)
            if usage is not None:
                decode.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)
            decode.end(end_time=phases.end_ns)


@contextmanager
def loading(metrics: WorkerMetrics, record: AssetRecord, worker_id: str) -> Iterator[None]:
    """Time the body as a load of `record` (span `load`, and the load duration by outcome)."""
    asset_id, interface, model_type = model_labels(record.spec)
    attributes: dict[str, str | int] = {
        "roundhouse.asset_id": asset_id, "roundhouse.asset.revision": record.revision,
        "roundhouse.interface": interface, "roundhouse.model_type": model_type,
        "roundhouse.worker_id": worker_id}
    started = time.perf_counter()
    ok = False
    with _tracer.start_as_current_span("load", attributes=attributes):
        try:
            yield
            ok = True
        finally:
            metrics.load_finished(record.spec, time.perf_counter() - started, ok)
