"""A worker's Prometheus metrics, scraped over HTTP from its metrics port as Prometheus would.

One worker serves the module, started with `ROUNDHOUSE_WORKER_METRICS_PORT=0` (a free port).
Each test reads what its own traffic added (a scrape before, one after), so the tests do not
depend on their order.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import grpc
import httpx
import pytest
from polling import wait_until
from prometheus_client.parser import text_string_to_metric_families
from stack_harness import TINY_CHAT, TINY_EMBED, RunningWorker, asset_message, not_installed, running_worker, tiny_spec

from roundhouse.v1 import inference_pb2, worker_pb2
from services.common.assetspec import AssetSpec
from services.common.grpc_interceptors import QUEUE_TIMEOUT_KEY
from services.common.modelstore.store import ModelStore

MIB = 1024 * 1024
CHAT_LABELS = {"asset_id": TINY_CHAT, "interface": "llm-runtime", "model_type": "transformers"}
EMBED_LABELS = {"asset_id": TINY_EMBED, "interface": "embedding-runtime", "model_type": "transformers"}


class Scrape:
    """One scrape of `/metrics`: every sample by name and labels."""

    def __init__(self, text: str) -> None:
        self.samples = {(s.name, frozenset(s.labels.items())): s.value
                        for family in text_string_to_metric_families(text) for s in family.samples}

    def value(self, name: str, **labels: str) -> float:
        """The sample's value; 0 when there is none (a series not created yet)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def has(self, name: str, **labels: str) -> bool:
        return (name, frozenset(labels.items())) in self.samples


Scraper = Callable[[], Awaitable[Scrape]]


@pytest.fixture(scope="module")
async def worker(store: ModelStore) -> AsyncIterator[RunningWorker]:
    patch = pytest.MonkeyPatch()
    patch.setenv("ROUNDHOUSE_WORKER_METRICS_PORT", "0")  # read as the harness builds the worker's settings
    try:
        async with running_worker(store) as running:
            patch.undo()
            yield running
    finally:
        patch.undo()


@pytest.fixture(scope="module")
async def scrape(worker: RunningWorker) -> AsyncIterator[Scraper]:
    port = worker.server.metrics_port
    assert port, "the worker serves /metrics on the free port it was given"
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        async def scraped() -> Scrape:
            reply = await http.get("/metrics")
            assert reply.status_code == 200
            return Scrape(reply.text)

        yield scraped


async def load(worker: RunningWorker, spec: AssetSpec) -> worker_pb2.LoadedModel:
    reply = await worker.control.LoadModel(worker_pb2.LoadModelRequest(asset=asset_message(spec)), timeout=60)
    return reply.model


def chat(model: str = TINY_CHAT, max_tokens: int = 12) -> inference_pb2.ChatRequest:
    return inference_pb2.ChatRequest(model=model, max_tokens=max_tokens, temperature=0,
                                     messages=[inference_pb2.ChatMessage(role="user", content="hello w1 w2")])


def grew(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


async def test_a_chat_and_an_embedding_are_counted_under_their_model(
    worker: RunningWorker, scrape: Scraper, sources: Path,
) -> None:
    await load(worker, tiny_spec(sources, TINY_CHAT))
    await load(worker, tiny_spec(sources, TINY_EMBED))
    before = await scrape()
    chunks = [c async for c in worker.inference.Chat(chat(max_tokens=12), timeout=60)]
    usage = chunks[-1].usage
    assert usage.completion_tokens == 12
    texts = ["hello w1", "hi w2 w3", "hello w1 w2 w3"]
    embedded = await worker.inference.Embed(inference_pb2.EmbedRequest(
        model=TINY_EMBED, inputs=[inference_pb2.EmbedInput(text=t) for t in texts]), timeout=60)
    after = await scrape()

    assert grew(before, after, "roundhouse_worker_requests_total", **CHAT_LABELS, status="ok") == 1
    assert grew(before, after, "roundhouse_worker_requests_total", **EMBED_LABELS, status="ok") == 1
    assert grew(before, after, "roundhouse_worker_prompt_tokens_total", **CHAT_LABELS) == usage.prompt_tokens
    assert grew(before, after, "roundhouse_worker_generated_tokens_total", **CHAT_LABELS) == 12
    assert grew(before, after, "roundhouse_worker_prompt_tokens_total", **EMBED_LABELS) \
        == embedded.usage.prompt_tokens
    assert grew(before, after, "roundhouse_worker_embedding_inputs_total", **EMBED_LABELS) == 3
    # Every input goes through one forward pass: the passes' sizes add up to the inputs.
    assert grew(before, after, "roundhouse_embedding_batch_size_sum", **EMBED_LABELS) == 3
    assert grew(before, after, "roundhouse_embedding_batch_size_count", **EMBED_LABELS) >= 1
    for labels in (CHAT_LABELS, EMBED_LABELS):
        for histogram in ("roundhouse_worker_request_duration_seconds", "roundhouse_worker_queue_wait_seconds"):
            assert grew(before, after, f"{histogram}_count", **labels) == 1, (histogram, labels)
    duration = grew(before, after, "roundhouse_worker_request_duration_seconds_sum", **CHAT_LABELS)
    first_token = grew(before, after, "roundhouse_worker_time_to_first_token_seconds_sum", **CHAT_LABELS)
    per_token = grew(before, after, "roundhouse_worker_time_per_output_token_seconds_sum", **CHAT_LABELS)
    assert grew(before, after, "roundhouse_worker_time_to_first_token_seconds_count", **CHAT_LABELS) == 1
    assert grew(before, after, "roundhouse_worker_time_per_output_token_seconds_count", **CHAT_LABELS) == 1
    assert 0 < first_token < duration
    assert 0 < per_token * 11 < duration
    # The finest bucket is half a millisecond.
    assert after.has("roundhouse_worker_queue_wait_seconds_bucket", **CHAT_LABELS, le="0.0005")


async def test_held_models_their_memory_and_the_budget_are_gauges(
    worker: RunningWorker, scrape: Scraper, sources: Path,
) -> None:
    chat_model = await load(worker, tiny_spec(sources, TINY_CHAT))
    embed_model = await load(worker, tiny_spec(sources, TINY_EMBED))
    state = await worker.control.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest(), timeout=10)
    now = await scrape()
    assert now.value("roundhouse_models_loaded", interface="llm-runtime", model_type="transformers") == 1
    assert now.value("roundhouse_models_loaded", interface="embedding-runtime", model_type="transformers") == 1
    assert now.value("roundhouse_model_memory_bytes", **CHAT_LABELS) == chat_model.memory_bytes > 0
    assert now.value("roundhouse_model_memory_bytes", **EMBED_LABELS) == embed_model.memory_bytes > 0
    assert now.value("roundhouse_worker_memory_used_bytes", worker_id=state.worker_id) \
        == state.memory_used_bytes > 0
    assert now.value("roundhouse_worker_memory_budget_bytes", worker_id=state.worker_id) == 4096 * MIB
    assert now.value("roundhouse_model_load_duration_seconds_count", **CHAT_LABELS, outcome="ok") >= 1
    assert now.value("roundhouse_model_load_duration_seconds_sum", **CHAT_LABELS, outcome="ok") > 0


async def test_requests_in_flight_and_queued_show_while_they_are(
    worker: RunningWorker, scrape: Scraper, sources: Path,
) -> None:
    busy = tiny_spec(sources, TINY_CHAT, asset_id="busy-chat",
                     policy={"max_concurrency": 1, "max_queue": 4, "queue_timeout_s": 60})
    labels = {**CHAT_LABELS, "asset_id": "busy-chat"}
    await load(worker, busy)

    async def answered(request: inference_pb2.ChatRequest) -> list[inference_pb2.ChatChunk]:
        return [c async for c in worker.inference.Chat(request, timeout=60)]

    before = await scrape()
    async with AsyncExitStack() as slot:
        await slot.enter_async_context(worker.server.host.use("busy-chat"))  # a request holding the slot
        waiting = asyncio.create_task(answered(chat("busy-chat", max_tokens=4)))

        async def one_running_one_queued() -> bool:
            now = await scrape()
            return (now.value("roundhouse_worker_requests_in_flight", **labels),
                    now.value("roundhouse_worker_requests_queued", **labels)) == (1, 1)

        await wait_until(one_running_one_queued)
    assert (await waiting)[-1].usage.completion_tokens == 4
    after = await scrape()
    assert after.value("roundhouse_worker_requests_in_flight", **labels) == 0
    assert after.value("roundhouse_worker_requests_queued", **labels) == 0
    assert grew(before, after, "roundhouse_worker_queue_wait_seconds_count", **labels) == 2
    assert grew(before, after, "roundhouse_worker_queue_wait_seconds_sum", **labels) > 0
    assert grew(before, after, "roundhouse_worker_requests_total", **labels, status="ok") == 2


async def test_a_wait_for_a_slot_that_runs_out_is_counted_as_a_queue_wait(
    worker: RunningWorker, scrape: Scraper, sources: Path,
) -> None:
    hasty = tiny_spec(sources, TINY_CHAT, asset_id="hasty-chat",
                      policy={"max_concurrency": 1, "max_queue": 4, "queue_timeout_s": 60})
    labels = {**CHAT_LABELS, "asset_id": "hasty-chat"}
    await load(worker, hasty)
    before = await scrape()
    async with worker.server.host.use("hasty-chat"):  # a request holding the only slot
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await anext(aiter(worker.inference.Chat(chat("hasty-chat", max_tokens=4), timeout=60,
                                                    metadata=((QUEUE_TIMEOUT_KEY, "0.2"),))))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    after = await scrape()
    assert grew(before, after, "roundhouse_worker_requests_total", **labels, status="overloaded") == 1
    # Both waited for a slot: the holder (at once) and the request refused after its budget ran out.
    assert grew(before, after, "roundhouse_worker_queue_wait_seconds_count", **labels) == 2
    assert grew(before, after, "roundhouse_worker_queue_wait_seconds_sum", **labels) > 0


async def test_unloads_are_counted_by_reason_with_the_idle_age_and_failures_by_name(
    worker: RunningWorker, scrape: Scraper, sources: Path,
) -> None:
    spare = tiny_spec(sources, TINY_EMBED, asset_id="spare-embed")
    labels = {**EMBED_LABELS, "asset_id": "spare-embed"}
    await load(worker, spare)
    before = await scrape()
    assert before.has("roundhouse_model_memory_bytes", **labels)
    await worker.control.UnloadModel(worker_pb2.UnloadModelRequest(asset_id="spare-embed", reason="evict",
                                                                   evicted_for=TINY_CHAT), timeout=30)
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await worker.inference.Embed(inference_pb2.EmbedRequest(
            model="spare-embed", inputs=[inference_pb2.EmbedInput(text="hi")]), timeout=30)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    stranger = not_installed(sources)
    with pytest.raises(grpc.aio.AioRpcError):
        await load(worker, stranger)
    after = await scrape()

    assert grew(before, after, "roundhouse_evictions_total", **labels, reason="evict") == 1
    assert grew(before, after, "roundhouse_eviction_idle_age_seconds_count", reason="evict") == 1
    assert grew(before, after, "roundhouse_eviction_idle_age_seconds_sum", reason="evict") > 0
    assert not after.has("roundhouse_model_memory_bytes", **labels), "no longer held, no longer shown"
    # Not held: counted by the error's name, without the name the caller gave (so made-up names
    # open no series of their own).
    assert grew(before, after, "roundhouse_worker_requests_total", asset_id="", interface="",
                model_type="", status="not_found") == 1
    assert not [key for key in after.samples if ("asset_id", "spare-embed") in key[1]
                and key[0].startswith("roundhouse_worker_requests_total")]
    assert grew(before, after, "roundhouse_model_load_duration_seconds_count", asset_id=stranger.asset_id,
                interface="llm-runtime", model_type="transformers", outcome="failed") == 1


async def test_a_worker_without_a_metrics_port_serves_none(store: ModelStore) -> None:
    async with running_worker(store) as plain:
        assert plain.server.metrics_port is None
        assert plain.server.serve_metrics() is None
