"""Every Prometheus metric an operator is promised, scraped after real traffic.

Registry, jobs service, two workers and the router run as `roundhouse` processes, each worker
and the jobs service with a metrics port of its own. One round of traffic (a chat and a streamed
chat that wake their model, an embedding, a chat through a route, a failed request, a burst
that fills the admission queue, an install and an unload) must leave every metric of the
router's `/metrics`, the workers' and the jobs service's ports present, with exactly its labels
and a non-zero count or value.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from polling import wait_until
from process_harness import ProcessStack, process_stack
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from stack_harness import TINY_CHAT, TINY_EMBED, tiny_documents

from services.common.modelstore.store import ModelStore

M = {"asset_id", "interface", "model_type"}
CHAT = {"asset_id": TINY_CHAT, "interface": "llm-runtime", "model_type": "transformers"}
EMBED = {"asset_id": TINY_EMBED, "interface": "embedding-runtime", "model_type": "transformers"}
ROUTE = "rt-scrape"
EXTRA = "scrape-extra"
HELLO: list[Any] = [{"role": "user", "content": "hello there"}]


@dataclass
class Scrape:
    """The samples of one or more `/metrics` pages."""

    samples: list[Sample] = field(default_factory=list)

    def of(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.name == name]

    def check(self, name: str, labels: set[str], **values: str) -> list[Sample]:
        """Samples of `name` (a counter's `_total`, a histogram's `_count`): each has exactly
        `labels`, and one with `values` among them counts more than zero."""
        samples = self.of(name)
        assert samples, f"{name} is not exported"
        for sample in samples:
            assert set(sample.labels) - {"le"} == labels, f"{name}: labels {sorted(sample.labels)}"
        hits = [s for s in samples if values.items() <= s.labels.items() and s.value > 0]
        assert hits, f"{name}{values}: nothing counted in {[(s.labels, s.value) for s in samples]}"
        return hits


async def scrape(*urls: str) -> Scrape:
    """The samples of every page at `urls`, together."""
    page = Scrape()
    async with httpx.AsyncClient(timeout=10) as http:
        for url in urls:
            reply = await http.get(url)
            reply.raise_for_status()
            for family in text_string_to_metric_families(reply.text):
                page.samples.extend(family.samples)
    return page


@dataclass
class Busy:
    """Gauges seen above zero while a burst was in flight."""

    router_in_flight: bool = False
    router_queued: bool = False
    worker_in_flight: bool = False


@dataclass
class Pages:
    router: str
    workers: list[str]
    jobs: str
    busy: Busy
    worker_ids: list[str]


@pytest.fixture(scope="module")
async def stack(own_db: str, nats_url: str, store: ModelStore, sources: Path,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ProcessStack]:
    async with process_stack(own_db, nats_url, store.root, sources, tmp_path_factory.mktemp("scrape"),
                             {}, workers=2) as running:
        extra = shutil.copytree(sources / TINY_CHAT, sources / f"{EXTRA}-{uuid.uuid4().hex[:8]}")
        await running.apply(
            *tiny_documents(sources),
            {"asset_id": ROUTE, "class": "route", "interface": "llm-runtime",
             "targets": [{"asset": TINY_CHAT, "weight": 1}]},
            {"asset_id": EXTRA, "interface": "llm-runtime", "source": {"kind": "path", "path": str(extra)}})
        async with httpx.AsyncClient(base_url=running.http_url, headers=running.admin_headers) as http:
            async def listed() -> bool:
                reply = await http.get("/v1/models")
                return reply.status_code == 200 and {TINY_CHAT, TINY_EMBED, ROUTE} <= {
                    m["id"] for m in reply.json()["data"]}

            await wait_until(listed, timeout=30, interval=0.1)
        yield running


async def finished(http: httpx.AsyncClient, asset_id: str, kind: str) -> None:
    """Submit an operation over the admin API and wait for it to succeed."""
    reply = await http.post(f"/admin/v1/models/{asset_id}/{kind}")
    assert reply.status_code == 202, reply.text
    operation_id = reply.json()["operation_id"]

    async def done() -> bool:
        status = (await http.get(f"/admin/v1/operations/{operation_id}")).json()["status"]
        assert status not in ("failed", "cancelled"), f"{kind} {asset_id}: {status}"
        return status == "succeeded"

    await wait_until(done, timeout=60, interval=0.1)


async def burst(api: openai.AsyncOpenAI, stack: ProcessStack, urls: list[str]) -> Busy:
    """Streamed chats enough to fill the chat model's slots and queue (2 and 2), scraped while
    they run."""
    seen = Busy()

    async def chat() -> None:
        async for _ in await api.chat.completions.create(
                model=TINY_CHAT, messages=HELLO, max_tokens=64, stream=True):
            pass

    async def watch() -> None:
        while True:
            router = await scrape(f"{stack.http_url}/metrics")
            workers = await scrape(*urls)
            seen.router_in_flight |= any(s.value > 0 for s in router.of("roundhouse_requests_in_flight"))
            seen.router_queued |= any(s.value > 0 for s in router.of("roundhouse_requests_queued"))
            seen.worker_in_flight |= any(s.value > 0 for s in workers.of("roundhouse_worker_requests_in_flight"))

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.gather(*(chat() for _ in range(4)))
    finally:
        watcher.cancel()
    return seen


@pytest.fixture(scope="module")
async def pages(stack: ProcessStack) -> Pages:
    """The traffic, once; then a scrape of every metrics port."""
    workers = [f"http://127.0.0.1:{w.metrics_port}/metrics" for w in stack.workers]
    async with (openai.AsyncOpenAI(base_url=f"{stack.http_url}/v1", api_key=stack.admin_key,
                                   max_retries=0, timeout=120) as api,
                httpx.AsyncClient(base_url=stack.http_url, headers=stack.admin_headers, timeout=60) as http):
        await api.chat.completions.create(model=TINY_CHAT, messages=HELLO, max_tokens=8)
        async for _ in await api.chat.completions.create(model=TINY_CHAT, messages=HELLO, max_tokens=8,
                                                         stream=True):
            pass
        await api.embeddings.create(model=TINY_EMBED, input=["one", "two", "three"])
        await api.chat.completions.create(model=ROUTE, messages=HELLO, max_tokens=8)
        with pytest.raises(openai.NotFoundError):
            await api.chat.completions.create(model="no-such-model", messages=HELLO, max_tokens=8)
        busy = await burst(api, stack, workers)
        await finished(http, EXTRA, "install")
        await finished(http, TINY_CHAT, "unload")
        return Pages(f"{stack.http_url}/metrics", workers,
                     f"http://127.0.0.1:{stack.jobs_metrics_port}/metrics", busy,
                     [w.worker_id for w in stack.workers])


async def test_the_router_counts_requests_tokens_and_latencies_per_model_and_route(pages: Pages) -> None:
    page = await scrape(pages.router)
    with_route = M | {"route"}
    page.check("roundhouse_requests_total", with_route | {"status"}, **CHAT, route="", status="ok")
    page.check("roundhouse_requests_total", with_route | {"status"}, **CHAT, route=ROUTE, status="ok")
    page.check("roundhouse_requests_total", with_route | {"status"}, **EMBED, status="ok")
    failed = [s for s in page.of("roundhouse_requests_total") if s.labels["status"] not in ("ok", "cancelled")]
    assert any(s.value > 0 for s in failed), "the failed request is not counted"
    for name in ("roundhouse_request_duration_seconds_count", "roundhouse_time_to_first_token_seconds_count",
                 "roundhouse_time_per_output_token_seconds_count", "roundhouse_prompt_tokens_total",
                 "roundhouse_generated_tokens_total"):
        page.check(name, with_route, **CHAT, route="")
        page.check(name, with_route, **CHAT, route=ROUTE)
    page.check("roundhouse_request_duration_seconds_count", with_route, **EMBED)
    page.check("roundhouse_embedding_inputs_total", with_route, **EMBED)
    page.check("roundhouse_queue_wait_seconds_count", M, **CHAT)
    page.check("roundhouse_wakes_total", M, **CHAT)
    page.check("roundhouse_wakes_total", M, **EMBED)
    page.check("roundhouse_wake_delay_seconds_count", M, **CHAT)
    page.check("roundhouse_route_attempts_total", {"route", "target", "outcome"},
               route=ROUTE, target=TINY_CHAT, outcome="ok")
    for gauge in ("roundhouse_requests_in_flight", "roundhouse_requests_queued"):
        assert page.of(gauge), f"{gauge} is not exported"
        assert all(set(s.labels) == M for s in page.of(gauge)), gauge
    assert pages.busy.router_in_flight and pages.busy.router_queued, pages.busy
    buckets = {s.labels["le"] for s in page.of("roundhouse_request_duration_seconds_bucket")}
    assert "0.0005" in buckets, sorted(buckets)
    assert not page.of("roundhouse_prompt_tokens") and not page.of("roundhouse_generated_tokens"), \
        "the old token counters are gone"


async def test_each_worker_reports_its_models_memory_and_requests(pages: Pages) -> None:
    for url, worker_id in zip(pages.workers, pages.worker_ids, strict=True):
        own = await scrape(url)
        own.check("roundhouse_worker_memory_budget_bytes", {"worker_id"}, worker_id=worker_id)
        assert own.of("roundhouse_worker_memory_used_bytes"), f"{worker_id}: no memory used"
        assert all(s.labels == {"worker_id": worker_id} for s in own.of("roundhouse_worker_memory_used_bytes"))
    page = await scrape(*pages.workers)
    page.check("roundhouse_worker_memory_used_bytes", {"worker_id"})
    page.check("roundhouse_worker_requests_total", M | {"status"}, **CHAT, status="ok")
    page.check("roundhouse_worker_requests_total", M | {"status"}, **EMBED, status="ok")
    for name in ("roundhouse_worker_request_duration_seconds_count",
                 "roundhouse_worker_time_to_first_token_seconds_count",
                 "roundhouse_worker_time_per_output_token_seconds_count",
                 "roundhouse_worker_queue_wait_seconds_count", "roundhouse_worker_prompt_tokens_total",
                 "roundhouse_worker_generated_tokens_total"):
        page.check(name, M, **CHAT)
    page.check("roundhouse_worker_embedding_inputs_total", M, **EMBED)
    page.check("roundhouse_embedding_batch_size_count", M, **EMBED)
    page.check("roundhouse_embedding_batch_size_sum", M, **EMBED)
    page.check("roundhouse_models_loaded", {"interface", "model_type"}, interface="embedding-runtime",
               model_type="transformers")
    page.check("roundhouse_model_memory_bytes", M, **EMBED)
    page.check("roundhouse_model_load_duration_seconds_count", M | {"outcome"}, **CHAT, outcome="ok")
    # The worker names an eviction an operator asked for (the unload operation) `operator`.
    page.check("roundhouse_evictions_total", M | {"reason"}, **CHAT, reason="operator")
    page.check("roundhouse_eviction_idle_age_seconds_count", {"reason"}, reason="operator")
    for gauge in ("roundhouse_worker_requests_in_flight", "roundhouse_worker_requests_queued"):
        assert page.of(gauge), f"{gauge} is not exported"
        assert all(set(s.labels) == M for s in page.of(gauge)), gauge
    assert pages.busy.worker_in_flight, pages.busy


async def test_the_jobs_service_reports_operations_and_events(pages: Pages) -> None:
    page = await scrape(pages.jobs)
    for kind in ("install", "load", "unload"):
        page.check("roundhouse_operations_total", {"type", "status"}, type=kind, status="succeeded")
        page.check("roundhouse_operation_duration_seconds_count", {"type", "status"}, type=kind,
                   status="succeeded")
    assert page.of("roundhouse_operations_in_progress"), "roundhouse_operations_in_progress is not exported"
    assert all(set(s.labels) == {"type"} for s in page.of("roundhouse_operations_in_progress"))
    backlog = page.of("roundhouse_outbox_backlog")
    assert backlog and all(not s.labels for s in backlog), backlog
    page.check("roundhouse_events_published_total", {"type"})
