"""Per-key limits, the usage ledger and revocation across two real `roundhouse router`
processes that share one Postgres and one NATS, as the official `openai` client sees them.

A registry, a jobs service and one worker run in the test process; the two routers are real
processes started from the CLI. Every burst is split between the two routers, so only what they
share (the counters in Postgres, the `key.revoked` event on NATS) can keep a key to its limits.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from polling import wait_until
from process_harness import router_fleet
from stack_harness import TINY_CHAT, TINY_EMBED, tiny_documents

from services.common.keys.tokens import new_secret

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]


@dataclass
class Fleet:
    """Two router processes in front of one registry, jobs service and worker."""

    urls: list[str]
    """The routers' HTTP base URLs: router A, router B."""
    admin_key: str
    dsn: str


@dataclass
class Seen:
    """What the clients of one burst saw, by the request id each sent (`x-request-id`)."""

    served: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Prompt and completion tokens of each answered request."""
    refused: dict[str, openai.APIStatusError] = field(default_factory=dict)


@pytest.fixture(scope="module")
async def fleet(own_db: str, nats_url: str, sources: Path,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Fleet]:
    root = tmp_path_factory.mktemp("two-routers")
    admin_key = new_secret()
    # A queue deep enough for every burst: only the key's limits may refuse a request.
    documents = tiny_documents(sources, max_queue=64)
    async with router_fleet(own_db, nats_url, sources, root, documents, {
        "ROUNDHOUSE_ADMIN_KEY": admin_key, "ROUNDHOUSE_AUTH": "enabled",
        # Only the `key.revoked` event can stop a revoked key within the test.
        "ROUNDHOUSE_KEY_CACHE_S": "600",
    }) as (urls, _):
        fleet = Fleet(urls, admin_key, own_db)
        async with client(fleet.urls[0], admin_key) as api:  # wake both models once
            await api.chat.completions.create(model=TINY_CHAT, messages=HELLO, max_tokens=2)
            await api.embeddings.create(model=TINY_EMBED, input="wake")
        yield fleet


def client(url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


async def new_key(fleet: Fleet, **limits: Any) -> tuple[str, str]:
    """A fresh key with `limits`, made on router A: its secret and its name."""
    name = f"two-{uuid.uuid4().hex[:8]}"
    async with httpx.AsyncClient(timeout=30) as http:
        reply = await http.post(f"{fleet.urls[0]}/admin/v1/keys", json={"name": name, **limits},
                                headers={"Authorization": f"Bearer {fleet.admin_key}"})
    assert reply.status_code == 201, reply.text
    return reply.json()["key"], name


async def clear_of_minute_boundary() -> None:
    """Rate windows renew at the minute: a burst straddling it would be two windows."""
    into_minute = time.time() % 60
    if into_minute > 52:
        await asyncio.sleep(60.5 - into_minute)


async def split_burst(
    fleet: Fleet, key: str, n: int, call: Callable[[openai.AsyncOpenAI, str], Awaitable[tuple[int, int]]]
) -> Seen:
    """`n` concurrent calls of `key`, alternately on router A and router B; each sends its own
    request id and returns the prompt and completion tokens its answer reported."""
    seen = Seen()
    apis = [client(url, key) for url in fleet.urls]

    async def one(i: int) -> None:
        request_id = f"burst-{uuid.uuid4().hex}"
        try:
            seen.served[request_id] = await call(apis[i % 2], request_id)
        except openai.APIStatusError as refused:
            seen.refused[request_id] = refused

    try:
        await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        for api in apis:
            await api.close()
    return seen


async def embed(api: openai.AsyncOpenAI, request_id: str) -> tuple[int, int]:
    answer = await api.embeddings.create(model=TINY_EMBED, input="a short input",
                                         extra_headers={"x-request-id": request_id})
    return answer.usage.prompt_tokens, 0


async def chat(api: openai.AsyncOpenAI, request_id: str, max_tokens: int = 8) -> tuple[int, int]:
    answer = await api.chat.completions.create(model=TINY_CHAT, messages=HELLO, max_tokens=max_tokens,
                                               extra_headers={"x-request-id": request_id})
    assert answer.usage is not None
    return answer.usage.prompt_tokens, answer.usage.completion_tokens


async def assert_ledger_matches(fleet: Fleet, seen: Seen, refused_status: str) -> None:
    """Postgres has one usage row per request of the burst, written by whichever router took it,
    with the tokens its client saw (answered) or the refusal and no tokens (refused)."""
    ids = [*seen.served, *seen.refused]

    async def rows() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(fleet.dsn)
        try:
            return await conn.fetch("SELECT * FROM usage_records WHERE request_id = ANY($1::text[])", ids)
        finally:
            await conn.close()

    async def all_written() -> bool:
        return len(await rows()) >= len(ids)

    await wait_until(all_written, timeout=10, interval=0.1)
    written = {r["request_id"]: r for r in await rows()}
    assert len(written) == len(ids) == len(await rows())
    assert {i: (written[i]["status"], written[i]["prompt_tokens"], written[i]["completion_tokens"])
            for i in seen.served} == {i: ("ok", *tokens) for i, tokens in seen.served.items()}
    assert {written[i]["status"] for i in seen.refused} <= {refused_status}
    assert all(written[i]["completion_tokens"] == 0 for i in seen.refused)


async def test_rpm_is_exact_across_both_routers(fleet: Fleet) -> None:
    await clear_of_minute_boundary()
    key, _ = await new_key(fleet, rpm=5)
    seen = await split_burst(fleet, key, 16, embed)
    assert len(seen.served) == 5
    assert len(seen.refused) == 11
    for refused in seen.refused.values():
        assert isinstance(refused, openai.RateLimitError)
        assert refused.code == "rate_limit_exceeded"
        assert 1 <= int(refused.response.headers["retry-after"]) <= 60
    await assert_ledger_matches(fleet, seen, "rate_limited")


async def test_never_more_than_max_parallel_in_flight_across_both_routers(fleet: Fleet) -> None:
    key, _ = await new_key(fleet, max_parallel=2)
    spans: list[tuple[float, float]] = []

    async def slow_stream(api: openai.AsyncOpenAI, request_id: str) -> tuple[int, int]:
        stream = await api.chat.completions.create(
            model=TINY_CHAT, messages=HELLO, max_tokens=48, stream=True,
            stream_options={"include_usage": True}, extra_headers={"x-request-id": request_id})
        first: float | None = None
        usage = None
        async for chunk in stream:
            first = first or time.monotonic()
            usage = chunk.usage or usage
        assert first is not None and usage is not None
        spans.append((first, time.monotonic()))
        return usage.prompt_tokens, usage.completion_tokens

    seen = Seen()
    for _ in range(3):
        wave = await split_burst(fleet, key, 8, slow_stream)
        seen.served.update(wave.served)
        seen.refused.update(wave.refused)
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    in_flight, peak = 0, 0
    for _, step in edges:  # at equal times an end sorts before a start
        in_flight += step
        peak = max(peak, in_flight)
    assert 1 <= peak <= 2
    assert seen.served and seen.refused
    for refused in seen.refused.values():
        assert isinstance(refused, openai.RateLimitError)
        assert refused.code == "rate_limit_exceeded" and "in flight" in refused.message
        assert "retry-after" in refused.response.headers
    await assert_ledger_matches(fleet, seen, "rate_limited")


async def test_tokens_per_minute_and_token_budget_are_never_overshot(fleet: Fleet) -> None:
    await clear_of_minute_boundary()
    tpm_key, _ = await new_key(fleet, tpm=150)
    budget_key, _ = await new_key(fleet, budget_tokens=150)
    per_minute, budget = await asyncio.gather(split_burst(fleet, tpm_key, 12, chat),
                                              split_burst(fleet, budget_key, 12, chat))
    for seen, code in ((per_minute, "rate_limit_exceeded"), (budget, "insufficient_quota")):
        assert seen.served and seen.refused
        assert sum(p + c for p, c in seen.served.values()) <= 150
        assert {r.code for r in seen.refused.values()} == {code}
    await assert_ledger_matches(fleet, per_minute, "rate_limited")
    await assert_ledger_matches(fleet, budget, "budget_exhausted")


async def test_a_key_revoked_on_one_router_stops_at_once_on_the_other(fleet: Fleet) -> None:
    key, name = await new_key(fleet)
    a, b = (client(url, key) for url in fleet.urls)
    try:
        for api in (a, b):  # both routers now hold the key in their ten-minute cache
            assert (await api.embeddings.create(model=TINY_EMBED, input="before")).data
        async with httpx.AsyncClient(timeout=30) as http:
            reply = await http.delete(f"{fleet.urls[0]}/admin/v1/keys/{name}",
                                      headers={"Authorization": f"Bearer {fleet.admin_key}"})
        assert reply.status_code == 200, reply.text
        with pytest.raises(openai.AuthenticationError):
            await a.embeddings.create(model=TINY_EMBED, input="after")

        async def refused_by_b() -> bool:
            try:
                await b.embeddings.create(model=TINY_EMBED, input="after")
            except openai.AuthenticationError:
                return True
            return False

        await wait_until(refused_by_b, timeout=2, interval=0.05)
    finally:
        await a.close()
        await b.close()
