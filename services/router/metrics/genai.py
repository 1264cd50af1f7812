"""The OpenTelemetry GenAI figures of the requests the router serves.

Metrics, through the meter `roundhouse.router`: `gen_ai.server.request.duration`,
`gen_ai.server.time_to_first_token`, `gen_ai.server.time_per_output_token` (seconds) and
`gen_ai.client.token.usage` (tokens, by `gen_ai.token.type` input or output), with
`gen_ai.operation.name`, `gen_ai.request.model`, `gen_ai.response.model`,
`gen_ai.provider.name` and, on failures, `error.type`. The conventions still call them in
development, so a router records them only when `OTEL_SEMCONV_STABILITY_OPT_IN` lists
`gen_ai_latest_experimental` (`GenAIMetrics.if_asked`).

Span attributes (`annotate`) go on the request's front span whenever it is recorded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from opentelemetry import metrics
from opentelemetry.trace import Span

from services.common.tracing import genai_semconv

if TYPE_CHECKING:
    from services.router.usage.ticket import UsageTicket

Operation = Literal["chat", "embeddings"]
METER = "roundhouse.router"
PROVIDER = "roundhouse"
# Bucket boundaries the GenAI conventions advise for each figure.
DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92]
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0]
TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5]
TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                 16777216, 67108864]


def _attributes(ticket: UsageTicket, operation: Operation, *, any_name: bool) -> dict[str, str]:
    """What the GenAI conventions say of a request: its operation, the model it named, the
    one that answered (or was last tried), and its failure. The name the client sent is
    left out of metrics unless it named a model or route (`any_name` False): made-up names
    would each open series of their own."""
    attributes = {"gen_ai.operation.name": operation, "gen_ai.provider.name": PROVIDER}
    if any_name or ticket.reached or ticket.route_id:
        attributes["gen_ai.request.model"] = ticket.route
    if ticket.reached and ticket.asset is not None:
        attributes["gen_ai.response.model"] = ticket.asset.spec.asset_id
    if ticket.status != "ok":
        attributes["error.type"] = ticket.status
    return attributes


class GenAIMetrics:
    """The GenAI histograms, on `meter_provider`'s meter `roundhouse.router` (the process's
    global provider when None)."""

    def __init__(self, meter_provider: metrics.MeterProvider | None = None) -> None:
        meter = (meter_provider or metrics.get_meter_provider()).get_meter(METER)
        self.duration = meter.create_histogram(
            "gen_ai.server.request.duration", unit="s",
            description="Time from a request's arrival at the router to its end.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        self.ttft = meter.create_histogram(
            "gen_ai.server.time_to_first_token", unit="s",
            description="Time from a chat's arrival to its first chunk.",
            explicit_bucket_boundaries_advisory=TTFT_BUCKETS)
        self.tpot = meter.create_histogram(
            "gen_ai.server.time_per_output_token", unit="s",
            description="Time per generated token after the first.",
            explicit_bucket_boundaries_advisory=TPOT_BUCKETS)
        self.token_usage = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}",
            description="Tokens read (input) and generated (output) per request.",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS)

    @classmethod
    def if_asked(cls, meter_provider: metrics.MeterProvider | None = None) -> GenAIMetrics | None:
        """The metrics when `OTEL_SEMCONV_STABILITY_OPT_IN` asks for them; else None."""
        return cls(meter_provider) if genai_semconv() else None

    def finished(self, ticket: UsageTicket, operation: Operation) -> None:
        """Record a request that ended."""
        attributes = _attributes(ticket, operation, any_name=False)
        self.duration.record(ticket.latency_s, attributes)
        if operation == "chat" and ticket.first_token_s is not None:
            self.ttft.record(ticket.first_token_s, attributes)
            if ticket.completion_tokens > 1:
                self.tpot.record((ticket.latency_s - ticket.first_token_s)
                                 / (ticket.completion_tokens - 1), attributes)
        if ticket.prompt_tokens:
            self.token_usage.record(ticket.prompt_tokens,
                                    {**attributes, "gen_ai.token.type": "input"})
        if ticket.completion_tokens:
            self.token_usage.record(ticket.completion_tokens,
                                    {**attributes, "gen_ai.token.type": "output"})


def annotate(span: Span, ticket: UsageTicket, operation: Operation, *,
             max_tokens: int | None = None, temperature: float | None = None) -> None:
    """Put the GenAI attributes of a request that ended on its front span: the model named
    and the one that answered, the tokens read and generated, and the sampling asked for."""
    if not span.is_recording():
        return
    attributes: dict[str, str | int | float] = {
        **_attributes(ticket, operation, any_name=True),
        "gen_ai.usage.input_tokens": ticket.prompt_tokens,
        "gen_ai.usage.output_tokens": ticket.completion_tokens,
    }
    if max_tokens is not None:
        attributes["gen_ai.request.max_tokens"] = max_tokens
    if temperature is not None:
        attributes["gen_ai.request.temperature"] = temperature
    span.set_attributes(attributes)
