"""What an operator sees of the router's requests: per-model Prometheus series on `/metrics`,
the OpenTelemetry GenAI metrics when asked for, and the request id on the logs written for it.

A router of the module's stack is started with a meter provider the test reads
(`InMemoryMetricReader`) and `OTEL_SEMCONV_STABILITY_OPT_IN=gen_ai_latest_experimental`. One
round of traffic through it (a chat and an embedding that wake their models, a chat through a
route, a streamed chat, an embedding over the gRPC front, a request for an unknown model)
must leave every router series with exactly its labels and a non-zero count.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import openai
import pytest
from limits_harness import new_key
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from polling import wait_until
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from stack_harness import TINY_CHAT, TINY_EMBED, Stack

from roundhouse.v1 import inference_pb2, inference_pb2_grpc
from services.common.assetspec import Policy
from services.common.errors import Overloaded
from services.common.tracing import RequestIdLogFilter
from services.router.admission import Admission
from services.router.metrics import RequestMetrics
from services.router.server import RouterParts, start_router

M = {"asset_id", "interface", "model_type"}
PER_ROUTE = M | {"route"}
CHAT = {"asset_id": TINY_CHAT, "interface": "llm-runtime", "model_type": "transformers"}
EMBED = {"asset_id": TINY_EMBED, "interface": "embedding-runtime", "model_type": "transformers"}
ROUTE = "rt-metrics"
HELLO: list[Any] = [{"role": "user", "content": "hello there"}]
LONG = 4000
"""Tokens that keep the tiny model generating for several seconds."""


class KeptRecords(logging.Handler):
    """Every log record while attached, with the request it was written for."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.addFilter(RequestIdLogFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def loggers_for(self, request_id: str) -> set[str]:
        """The loggers that wrote records naming `request_id` as their request."""
        tag = f" [request {request_id}]"
        return {r.name for r in self.records if getattr(r, "request_tag", "") == tag}


@dataclass
class Observed:
    """The router under observation, its GenAI reader, and what the traffic left."""

    router: RouterParts
    grpc_address: str
    reader: InMemoryMetricReader
    logs: KeptRecords
    chat_request_id: str
    embed_request_id: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.router.http_port}"


@pytest.fixture(scope="module")
async def observed(stack: Stack) -> AsyncIterator[Observed]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    await stack.apply({"asset_id": ROUTE, "class": "route", "interface": "llm-runtime",
                       "targets": [{"asset": TINY_CHAT, "weight": 1}]})
    assert stack.router_settings is not None
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", "gen_ai_latest_experimental")
        router = await start_router(stack.router_settings, stack.bus, meter_provider=provider)
    port = await router.grpc_server.start()
    logs, root = KeptRecords(), logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(logs)
    try:
        chat_id, embed_id = f"chat-{uuid.uuid4().hex[:8]}", f"embed-{uuid.uuid4().hex[:8]}"
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{router.http_port}/v1",
                                      api_key="unused", max_retries=0, timeout=60) as api:
            # Nothing holds the models yet: the first chat and embedding wake them.
            await api.chat.completions.create(model=TINY_CHAT, messages=HELLO, max_tokens=5,
                                              extra_headers={"x-request-id": chat_id})
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await inference_pb2_grpc.InferenceStub(channel).Embed(inference_pb2.EmbedRequest(
                    model=TINY_EMBED, inputs=[inference_pb2.EmbedInput(text="one")],
                    request_id=embed_id), timeout=60)
            await api.embeddings.create(model=TINY_EMBED, input=["one", "two", "three"])
            await api.chat.completions.create(model=ROUTE, messages=HELLO, max_tokens=5)
            stream = await api.chat.completions.create(model=TINY_CHAT, messages=HELLO,
                                                       max_tokens=5, stream=True)
            assert [c async for c in stream]
            with pytest.raises(openai.NotFoundError):
                await api.chat.completions.create(model="no-such-model", messages=HELLO)
        yield Observed(router, f"127.0.0.1:{port}", reader, logs, chat_id, embed_id)
    finally:
        root.removeHandler(logs)
        root.setLevel(level)
        await router.grpc_server.stop(0.5)
        for cleanup in router.cleanups:
            await cleanup()
        provider.shutdown()


async def scrape(url: str) -> list[Sample]:
    async with httpx.AsyncClient() as http:
        reply = await http.get(f"{url}/metrics")
    assert reply.status_code == 200
    return [s for family in text_string_to_metric_families(reply.text) for s in family.samples]


def counted(samples: list[Sample], name: str, labels: set[str], **values: str) -> list[Sample]:
    """The samples of `name` matching `values`, each of which has exactly `labels`; fails
    unless one of them counts more than zero."""
    of_name = [s for s in samples if s.name == name]
    assert of_name, f"{name} is not exported"
    for sample in of_name:
        assert set(sample.labels) - {"le"} == labels, f"{name}: labels {sorted(sample.labels)}"
    hits = [s for s in of_name if values.items() <= s.labels.items() and s.value > 0]
    assert hits, f"{name}{values}: nothing counted in {[(s.labels, s.value) for s in of_name]}"
    return hits


async def test_requests_tokens_and_latencies_are_counted_per_model_route_and_status(
    observed: Observed,
) -> None:
    page = await scrape(observed.url)
    status = PER_ROUTE | {"status"}
    direct = counted(page, "roundhouse_requests_total", status, **CHAT, route="", status="ok")
    assert direct[0].value == 2  # the first chat and the stream
    counted(page, "roundhouse_requests_total", status, **CHAT, route=ROUTE, status="ok")
    embedded = counted(page, "roundhouse_requests_total", status, **EMBED, route="", status="ok")
    assert embedded[0].value == 2  # one over the gRPC front, one over HTTP
    counted(page, "roundhouse_requests_total", status, asset_id="", model_type="",
            interface="llm-runtime", route="", status="asset_not_found")
    for name in ("roundhouse_request_duration_seconds_count",
                 "roundhouse_time_to_first_token_seconds_count",
                 "roundhouse_time_per_output_token_seconds_count",
                 "roundhouse_prompt_tokens_total", "roundhouse_generated_tokens_total"):
        counted(page, name, PER_ROUTE, **CHAT, route="")
        counted(page, name, PER_ROUTE, **CHAT, route=ROUTE)
    counted(page, "roundhouse_request_duration_seconds_count", PER_ROUTE, **EMBED)
    counted(page, "roundhouse_prompt_tokens_total", PER_ROUTE, **EMBED)
    inputs = counted(page, "roundhouse_embedding_inputs_total", PER_ROUTE, **EMBED)
    assert inputs[0].value == 4
    assert not [s for s in page if s.name.startswith("roundhouse_time_to_first_token")
                and s.labels.get("asset_id") == TINY_EMBED and s.value > 0]
    counted(page, "roundhouse_route_attempts_total", {"route", "target", "outcome"},
            route=ROUTE, target=TINY_CHAT, outcome="ok")
    buckets = {s.labels["le"] for s in page if s.name == "roundhouse_request_duration_seconds_bucket"}
    assert "0.0005" in buckets
    assert not [s for s in page if "endpoint" in s.labels], "the old token series are gone"


async def test_wakes_and_queue_waits_are_counted_per_model(observed: Observed) -> None:
    page = await scrape(observed.url)
    for model in (CHAT, EMBED):
        woke = counted(page, "roundhouse_wakes_total", M, **model)
        assert woke[0].value == 1, "only the first request of each model waited for its load"
        counted(page, "roundhouse_wake_delay_seconds_count", M, **model)
        counted(page, "roundhouse_queue_wait_seconds_count", M, **model)
    delays = {s.labels["asset_id"]: s.value for s in page if s.name == "roundhouse_wake_delay_seconds_sum"}
    assert delays[TINY_CHAT] > 0 and delays[TINY_EMBED] > 0


async def test_in_flight_and_queued_gauges_show_the_requests_at_the_gate(observed: Observed) -> None:
    gate = observed.router.gateway.admission.stats
    assert (gate(TINY_CHAT).in_flight, gate(TINY_CHAT).waiting) == (0, 0)

    async with openai.AsyncOpenAI(base_url=f"{observed.url}/v1", api_key="unused",
                                  max_retries=0, timeout=60) as api:
        async def long_stream() -> Any:
            return await api.chat.completions.create(model=TINY_CHAT, messages=HELLO,
                                                     max_tokens=LONG, stream=True)

        async def gauges() -> tuple[float, float]:
            page = await scrape(observed.url)
            values = {s.name: s.value for s in page if s.labels.get("asset_id") == TINY_CHAT
                      and s.name in ("roundhouse_requests_in_flight", "roundhouse_requests_queued")}
            return values.get("roundhouse_requests_in_flight", 0), values.get("roundhouse_requests_queued", 0)

        # The chat model takes two at once (its policy); a third waits at the router's gate.
        streams = [asyncio.create_task(long_stream()) for _ in range(3)]
        try:
            async def held() -> bool:
                return await gauges() == (2, 1)

            await wait_until(held, timeout=20, interval=0.05)
        finally:
            for task in streams:
                task.cancel()
            for task in streams:
                try:
                    await (await task).close()
                except (asyncio.CancelledError, openai.APIError):
                    pass
    page = await scrape(observed.url)
    in_flight = [s for s in page if s.name == "roundhouse_requests_in_flight"]
    assert in_flight and all(set(s.labels) == M for s in in_flight)
    await wait_until(lambda: gate(TINY_CHAT).in_flight == 0, timeout=10)
    assert await gauges() == (0, 0)


async def test_waits_that_end_without_a_slot_are_queue_waits_too() -> None:
    metrics, admission = RequestMetrics(), Admission()
    metrics.watch(admission)
    labels = {"asset_id": "busy", "interface": "llm-runtime", "model_type": "transformers"}
    gate = admission.gate("busy", Policy(max_concurrency=1, max_queue=1, queue_timeout_s=0.2),
                          interface="llm-runtime", model_type="transformers")

    def waits(figure: str = "count") -> float | None:
        return metrics.registry.get_sample_value(f"roundhouse_queue_wait_seconds_{figure}", labels)

    async with gate.slot():
        assert waits() == 1 and waits("sum") == 0  # served at once: a wait of 0
        with pytest.raises(Overloaded, match="stayed at capacity"):  # its queue budget ran out
            await gate.slot().__aenter__()
        assert waits() == 2 and (waits("sum") or 0) > 0
        waiting = asyncio.create_task(gate.slot().__aenter__())
        await wait_until(lambda: gate.stats.waiting == 1)
        with pytest.raises(Overloaded, match="queued"):  # the queue is full
            await gate.slot().__aenter__()
        waiting.cancel()  # and this one gives up
        await asyncio.wait([waiting])
    assert waits() == 4


async def test_the_routers_outbox_relay_is_measured(observed: Observed) -> None:
    async with httpx.AsyncClient(base_url=f"{observed.url}/admin/v1", timeout=30) as admin:
        async def revoked_and_published() -> bool:  # the relays of other services may be first
            _, name = await new_key(admin, "relayed")
            assert (await admin.delete(f"/keys/{name}")).status_code == 200
            return any(s.name == "roundhouse_events_published_total" and s.labels == {"type": "key.revoked"}
                       and s.value > 0 for s in await scrape(observed.url))

        await wait_until(revoked_and_published, timeout=30, interval=0.2)
    backlog = [s for s in await scrape(observed.url) if s.name == "roundhouse_outbox_backlog"]
    assert len(backlog) == 1 and backlog[0].labels == {}, backlog


@dataclass
class Point:
    """One GenAI histogram's figures for one set of attributes."""

    attributes: dict[str, Any]
    count: int
    sum: float


def genai_points(reader: InMemoryMetricReader) -> dict[str, list[Point]]:
    """The router's GenAI histograms as the reader has them now."""
    data = reader.get_metrics_data()
    assert data is not None
    return {metric.name: [Point(dict(p.attributes or {}), p.count, p.sum)
                          for p in metric.data.data_points if isinstance(p, HistogramDataPoint)]
            for resource in data.resource_metrics for scope in resource.scope_metrics
            if scope.scope.name == "roundhouse.router" for metric in scope.metrics}


async def test_genai_metrics_are_recorded_under_their_convention_names(observed: Observed) -> None:
    points = genai_points(observed.reader)
    for name in ("gen_ai.server.request.duration", "gen_ai.server.time_to_first_token",
                 "gen_ai.server.time_per_output_token", "gen_ai.client.token.usage"):
        chats = [p for p in points.get(name, []) if p.attributes.get("gen_ai.operation.name") == "chat"
                 and p.attributes.get("gen_ai.response.model") == TINY_CHAT and p.count > 0]
        assert chats, f"{name}: {points.get(name)}"
        assert all(p.attributes["gen_ai.provider.name"] == "roundhouse" for p in chats)
    usage = {p.attributes["gen_ai.token.type"]: p.sum for p in points["gen_ai.client.token.usage"]
             if p.attributes.get("gen_ai.request.model") == TINY_CHAT}
    assert usage["input"] > 0 and usage["output"] > 0
    embeds = [p for p in points["gen_ai.server.request.duration"]
              if p.attributes.get("gen_ai.operation.name") == "embeddings"]
    assert sum(p.count for p in embeds) == 2
    failed = [p for p in points["gen_ai.server.request.duration"]
              if p.attributes.get("error.type") == "asset_not_found"]
    # A made-up model name opens no series of its own.
    assert failed and "gen_ai.request.model" not in failed[0].attributes


async def test_no_genai_metrics_unless_asked_for(stack: Stack, observed: Observed) -> None:
    assert observed.router.gateway.metrics.genai is not None
    assert stack.router.gateway.metrics.genai is None


async def test_the_request_id_names_the_logs_of_the_router_and_the_worker(observed: Observed) -> None:
    chat = observed.logs.loggers_for(observed.chat_request_id)
    assert "services.router.waking" in chat, chat
    assert any(name.startswith("services.worker") for name in chat), chat
    embed = observed.logs.loggers_for(observed.embed_request_id)
    assert "services.router.waking" in embed, embed
