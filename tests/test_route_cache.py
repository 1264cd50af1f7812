"""A route's response cache as callers see it: real workers and tiny models behind a router that
checks keys, the official `openai` client, real Postgres for the ledger and a real NATS
JetStream bucket for the entries.

An answer is kept in the background once it is whole; a test that needs it kept waits for the
router's writes (`RouteCaching.flush`) instead of sleeping. Prompts carry a token of this run:
the bucket may outlive the run (an external NATS), and an old entry must never make a miss look
like a hit.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import pytest
from limits_harness import ledger_rows, new_key
from openai.types.chat import ChatCompletionMessageParam
from polling import wait_until
from prometheus_client.parser import text_string_to_metric_families
from stack_harness import TINY_CHAT, TINY_EMBED, Stack, running_router, running_stack, tiny_documents

from roundhouse.v1 import worker_pb2
from services.common.events import EventBus
from services.router.server import RouterParts

RUN = uuid.uuid4().hex[:8]
REV_CHAT = "rev-chat"
CACHE_HEADER, TARGET_HEADER, ATTEMPTS_HEADER = (
    "x-roundhouse-cache", "x-roundhouse-target", "x-roundhouse-attempts")
LOOKUPS = "roundhouse_response_cache_lookups_total"


def chat_route(asset_id: str, target: str = TINY_CHAT, **cache: Any) -> dict[str, Any]:
    return {"asset_id": asset_id, "class": "route", "interface": "llm-runtime",
            "targets": [{"asset": target}], "cache": {"ttl_s": 600, **cache}}


def rev_chat(sources: Path, **labels: str) -> dict[str, Any]:
    """A chat asset of its own for the revision test (re-applying it changes no other test)."""
    return {"asset_id": REV_CHAT, "interface": "llm-runtime", "labels": labels,
            "source": {"kind": "path", "path": str(sources / TINY_CHAT)}}


@pytest.fixture(scope="module")
async def stack(own_db: str, nats_url: str, sources: Path,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with running_stack(own_db, nats_url, sources, tmp_path_factory.mktemp("store"),
                             auth=True) as running:
        await running.apply(*tiny_documents(sources), rev_chat(sources))
        await running.apply(
            chat_route("cached"),
            chat_route("cached-shared", scope="shared"),
            chat_route("cached-sampled", nondeterministic=True),
            chat_route("cached-rev", REV_CHAT),
            {"asset_id": "cached-embed", "class": "route", "interface": "embedding-runtime",
             "targets": [{"asset": TINY_EMBED}], "cache": {"ttl_s": 600}},
        )
        yield running


def api(url: str, secret: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0, timeout=60)


@pytest.fixture
async def caller(stack: Stack, admin: httpx.AsyncClient) -> AsyncIterator[tuple[openai.AsyncOpenAI, str]]:
    """The openai client of a fresh key, and the key's name."""
    secret, name = await new_key(admin, "cache")
    async with api(stack.http_url, secret) as client:
        yield client, name


def ask(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": f"hello {RUN} {text}"}]


async def chat(client: openai.AsyncOpenAI, route: str, text: str, *, temperature: float = 0,
               **extra: Any) -> tuple[httpx.Headers, str]:
    """Ask `route` whole; the response's headers and its text (after checking the shape)."""
    raw = await client.chat.completions.with_raw_response.create(
        model=route, messages=ask(text), max_tokens=5, temperature=temperature, **extra)
    reply = raw.parse()
    assert reply.object == "chat.completion" and reply.choices[0].finish_reason == "length"
    content = reply.choices[0].message.content
    assert content
    return raw.headers, content


async def kept(router: RouterParts) -> None:
    """Wait until the answers `router` gave so far are in the cache (each is written in the
    background once it is whole)."""
    await router.gateway.caching.flush()


async def rows_when(dsn: str, key_name: str, count: int) -> list[asyncpg.Record]:
    """The key's ledger rows once there are `count` (the ledger writes in batches)."""
    async def written() -> bool:
        return len(await ledger_rows(dsn, key_name)) >= count

    await wait_until(written, timeout=10, interval=0.1)
    rows = await ledger_rows(dsn, key_name)
    assert len(rows) == count
    return rows


async def lookups(url: str, route: str) -> dict[str, float]:
    """`roundhouse_response_cache_lookups_total` of `route` on the router at `url`, by result."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as plain:
        text = (await plain.get("/metrics")).text
    counts = {"hit": 0.0, "miss": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == LOOKUPS and sample.labels.get("route") == route:
                counts[sample.labels["result"]] = sample.value
    return counts


def sse_events(body: str) -> list[str]:
    """The `data:` payloads of an event stream, in order."""
    return [line.removeprefix("data: ") for line in body.split("\n\n") if line.startswith("data: ")]


def streamed_text(events: list[str]) -> str:
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == TINY_CHAT for c in chunks)
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


async def test_a_repeated_request_is_a_hit_that_costs_no_tokens(
        stack: Stack, caller: tuple[openai.AsyncOpenAI, str], own_db: str) -> None:
    client, name = caller
    before = await lookups(stack.http_url, "cached")
    miss_headers, miss_text = await chat(client, "cached", "repeat")
    assert miss_headers[CACHE_HEADER] == "miss"
    assert (miss_headers[TARGET_HEADER], miss_headers[ATTEMPTS_HEADER]) == (TINY_CHAT, f"{TINY_CHAT}:ok")
    await kept(stack.router)

    raw = await client.chat.completions.with_raw_response.create(
        model="cached", messages=ask("repeat"), max_tokens=5, temperature=0)
    hit = raw.parse()
    assert raw.headers[CACHE_HEADER] == "hit"
    assert (raw.headers[TARGET_HEADER], raw.headers[ATTEMPTS_HEADER]) == (TINY_CHAT, f"{TINY_CHAT}:cache")
    assert hit.model == TINY_CHAT and hit.choices[0].message.content == miss_text
    assert hit.choices[0].finish_reason == "length"

    miss_row, hit_row = await rows_when(own_db, name, 2)
    assert [(r["route"], r["asset_id"], r["status"], r["cache"]) for r in (miss_row, hit_row)] == [
        ("cached", TINY_CHAT, "ok", "miss"), ("cached", TINY_CHAT, "ok", "hit")]
    assert miss_row["prompt_tokens"] > 0 and miss_row["completion_tokens"] == 5
    assert (hit_row["prompt_tokens"], hit_row["completion_tokens"], hit_row["cost_usd"]) == (0, 0, 0)

    after = await lookups(stack.http_url, "cached")
    assert (after["hit"] - before["hit"], after["miss"] - before["miss"]) == (1, 1)


async def test_a_streamed_miss_fills_the_cache_and_a_streamed_hit_is_a_stream(
        stack: Stack, caller: tuple[openai.AsyncOpenAI, str]) -> None:
    client, _ = caller
    body = {"model": "cached", "messages": ask("streamed"), "max_tokens": 5, "temperature": 0,
            "stream": True}
    async with httpx.AsyncClient(base_url=stack.http_url, timeout=60,
                                 headers={"Authorization": f"Bearer {client.api_key}"}) as http:
        first = await http.post("/v1/chat/completions", json=body)
        assert first.status_code == 200
        assert first.headers["content-type"].startswith("text/event-stream")
        assert first.headers[CACHE_HEADER] == "miss"
        text = streamed_text(sse_events(first.text))
        assert text
        await kept(stack.router)

        headers, whole = await chat(client, "cached", "streamed")
        assert headers[CACHE_HEADER] == "hit" and whole == text

        again = await http.post("/v1/chat/completions", json=body)
        assert again.status_code == 200
        assert again.headers["content-type"].startswith("text/event-stream")
        assert again.headers[CACHE_HEADER] == "hit"
        assert streamed_text(sse_events(again.text)) == text
    # The official client reads a stream from the cache as any other.
    stream = await client.chat.completions.create(
        model="cached", messages=ask("streamed"), max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage is not None


async def held_revision(stack: Stack, asset_id: str) -> int:
    """The revision of the asset the worker holds (0: none)."""
    info = await stack.workers[0].control.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest())
    return next((m.revision for m in info.models if m.asset_id == asset_id), 0)


async def test_a_new_revision_is_never_answered_from_the_old_ones_entries(
        stack: Stack, caller: tuple[openai.AsyncOpenAI, str], admin: httpx.AsyncClient) -> None:
    client, _ = caller
    first, text = await chat(client, "cached-rev", "revision")
    assert first[CACHE_HEADER] == "miss"
    await kept(stack.router)
    assert (await chat(client, "cached-rev", "revision"))[0][CACHE_HEADER] == "hit"

    old = (await stack.registry_asset(REV_CHAT)).revision
    await stack.apply(rev_chat(stack.sources, round="2"))
    new = (await stack.registry_asset(REV_CHAT)).revision
    assert new > old

    async def router_sees_new_revision() -> bool:
        record = await stack.router.gateway.catalog.resolve(REV_CHAT, "")
        return getattr(record, "revision", None) == new

    await wait_until(router_sees_new_revision, timeout=10, interval=0.05)
    headers, fresh = await chat(client, "cached-rev", "revision")
    assert headers[CACHE_HEADER] == "miss" and headers[TARGET_HEADER] == REV_CHAT
    assert fresh == text  # the same weights: only the label changed
    # The worker still holds the old revision: what it answered is not kept as the new one's.
    assert await held_revision(stack, REV_CHAT) == old
    await kept(stack.router)
    assert (await chat(client, "cached-rev", "revision"))[0][CACHE_HEADER] == "miss"

    reply = await admin.post(f"/models/{REV_CHAT}/load")  # the worker swaps the new one in
    assert reply.status_code == 202, reply.text

    async def new_revision_held() -> bool:
        return await held_revision(stack, REV_CHAT) == new

    await wait_until(new_revision_held, timeout=30, interval=0.05)
    assert (await chat(client, "cached-rev", "revision"))[0][CACHE_HEADER] == "miss"
    await kept(stack.router)
    assert (await chat(client, "cached-rev", "revision"))[0][CACHE_HEADER] == "hit"


async def test_cache_control_no_cache_is_a_miss_even_with_an_entry(
        stack: Stack, caller: tuple[openai.AsyncOpenAI, str]) -> None:
    client, _ = caller
    await chat(client, "cached", "no-cache")
    await kept(stack.router)
    assert (await chat(client, "cached", "no-cache"))[0][CACHE_HEADER] == "hit"
    for directive in ("no-cache", "no-store"):
        headers, _ = await chat(client, "cached", "no-cache", extra_headers={"Cache-Control": directive})
        assert headers[CACHE_HEADER] == "miss" and headers[ATTEMPTS_HEADER] == f"{TINY_CHAT}:ok"
    await kept(stack.router)
    assert (await chat(client, "cached", "no-cache"))[0][CACHE_HEADER] == "hit"


async def test_sampled_requests_are_cached_only_when_the_route_opts_in(
        stack: Stack, caller: tuple[openai.AsyncOpenAI, str]) -> None:
    client, _ = caller
    before = await lookups(stack.http_url, "cached")
    for _ in range(2):
        headers, _ = await chat(client, "cached", "sampled", temperature=0.8)
        assert headers.get(CACHE_HEADER) != "hit" and headers[ATTEMPTS_HEADER] == f"{TINY_CHAT}:ok"
        await kept(stack.router)
    assert await lookups(stack.http_url, "cached") == before  # never even looked up

    first, text = await chat(client, "cached-sampled", "sampled", temperature=0.8)
    assert first[CACHE_HEADER] == "miss"
    await kept(stack.router)
    for _ in range(2):
        headers, again = await chat(client, "cached-sampled", "sampled", temperature=0.8)
        assert headers[CACHE_HEADER] == "hit" and again == text


async def test_entries_are_per_key_unless_the_route_shares_them(
        stack: Stack, admin: httpx.AsyncClient) -> None:
    (secret_a, _), (secret_b, _) = await new_key(admin, "cache"), await new_key(admin, "cache")
    async with api(stack.http_url, secret_a) as a, api(stack.http_url, secret_b) as b:
        assert (await chat(a, "cached", "scoped"))[0][CACHE_HEADER] == "miss"
        await kept(stack.router)
        assert (await chat(a, "cached", "scoped"))[0][CACHE_HEADER] == "hit"
        assert (await chat(b, "cached", "scoped"))[0][CACHE_HEADER] == "miss"

        shared, text = await chat(a, "cached-shared", "scoped")
        assert shared[CACHE_HEADER] == "miss"
        await kept(stack.router)
        headers, seen_by_b = await chat(b, "cached-shared", "scoped")
        assert headers[CACHE_HEADER] == "hit" and seen_by_b == text


async def test_embeddings_hit_returns_the_same_vectors(
        stack: Stack, caller: tuple[openai.AsyncOpenAI, str], own_db: str) -> None:
    client, name = caller
    inputs = [f"hello {RUN}", f"w1 w2 w3 {RUN}"]
    first = await client.embeddings.with_raw_response.create(model="cached-embed", input=inputs)
    assert first.headers[CACHE_HEADER] == "miss" and first.headers[TARGET_HEADER] == TINY_EMBED
    await kept(stack.router)
    second = await client.embeddings.with_raw_response.create(model="cached-embed", input=inputs)
    assert second.headers[CACHE_HEADER] == "hit"
    missed, hit = first.parse(), second.parse()
    assert hit.model == TINY_EMBED
    assert [d.embedding for d in hit.data] == [d.embedding for d in missed.data]
    assert [d.index for d in hit.data] == [0, 1]
    miss_row, hit_row = await rows_when(own_db, name, 2)
    assert (miss_row["cache"], hit_row["cache"]) == ("miss", "hit")
    assert miss_row["prompt_tokens"] > 0 and hit_row["prompt_tokens"] == 0


async def test_two_routers_share_the_cache(
        stack: Stack, caller: tuple[openai.AsyncOpenAI, str], nats_url: str) -> None:
    client, _ = caller
    assert stack.router_settings is not None
    bus = await EventBus.connect(nats_url, name="second-router-cache", ensure_stream=False)
    try:
        async with running_router(stack.router_settings, bus) as (second, _):
            url = f"http://127.0.0.1:{second.http_port}"
            headers, text = await chat(client, "cached", "two routers")
            assert headers[CACHE_HEADER] == "miss"
            await kept(stack.router)
            async with api(url, str(client.api_key)) as other:
                headers, seen = await chat(other, "cached", "two routers")
                assert headers[CACHE_HEADER] == "hit" and seen == text
                # And the other way round: what the second router keeps, the first serves.
                assert (await chat(other, "cached", "two routers, b first"))[0][CACHE_HEADER] == "miss"
                await kept(second)
            assert (await chat(client, "cached", "two routers, b first"))[0][CACHE_HEADER] == "hit"
            assert (await lookups(url, "cached")) == {"hit": 1, "miss": 1}
    finally:
        await bus.close()
