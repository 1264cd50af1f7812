"""A route's shadow traffic as callers and operators see it: real workers and tiny models behind
a router that checks keys, the official `openai` client, `GET /admin/v1/routes/{id}/shadow`,
`/metrics`, the usage ledger and the key's limits.

A shadow that is stuck is a remote (`runtime: openai`) asset whose upstream, served by this
module, holds every request until the test releases it: its copies stay in flight for as long
as the test needs, with no timing involved.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from limits_harness import clear_of_minute_boundary, new_key
from openai.types.chat import ChatCompletionMessageParam
from polling import wait_until
from prometheus_client.parser import text_string_to_metric_families
from stack_harness import TINY_CHAT, TINY_EMBED, Stack, running_router, running_stack, tiny_documents

from roundhouse.v1 import asset_pb2, worker_pb2
from services.common.events import EventBus

TWIN, SLEEPER, STUCK, EMBED_TWIN = "tiny-chat-twin", "tiny-chat-sleeper", "stuck-remote", "tiny-embed-twin"
TARGET_HEADER = "x-roundhouse-target"
SHADOW_REQUESTS = "roundhouse_shadow_requests_total"
MAX_TOKENS = 4


class HeldUpstream:
    """An OpenAI-compatible upstream that holds every chat until `release`; it then answers."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.answered = 0
        self._release = asyncio.Event()
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self._chat)

    def hold(self) -> None:
        """Hold the requests that come from now on."""
        self._release = asyncio.Event()

    def release(self) -> None:
        """Answer the held requests and those that come next."""
        self._release.set()

    async def _chat(self, request: Request) -> Any:
        body = await request.json()
        self.received.append(body)
        await self._release.wait()
        self.answered += 1
        usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
        if not body.get("stream"):
            return {"object": "chat.completion", "usage": usage, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "held up"},
                 "finish_reason": "length"}]}

        async def events() -> AsyncIterator[str]:
            for chunk in ({"choices": [{"index": 0, "delta": {"content": "held up"}}]},
                          {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]},
                          {"choices": [], "usage": usage}):
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture(scope="module")
async def upstream() -> AsyncIterator[tuple[HeldUpstream, str]]:
    """The held upstream on a free loopback port, on the tests' event loop; its /v1 URL."""
    held = HeldUpstream()
    held.release()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(held.app, log_level="warning", lifespan="off"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    await wait_until(lambda: server.started or serving.done(), timeout=10)
    assert server.started, "the held upstream did not start"
    try:
        yield held, f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        held.release()
        server.should_exit = True
        await serving
        sock.close()


@contextmanager
def holding(upstream: HeldUpstream) -> Iterator[HeldUpstream]:
    """The upstream holds requests while the block runs, and answers them at its end."""
    upstream.hold()
    try:
        yield upstream
    finally:
        upstream.release()


def same_weights(sources: Path, asset_id: str, model: str, interface: str) -> dict[str, Any]:
    """An asset of the tiny model `model` under another id: a shadow with the same weights."""
    return {"asset_id": asset_id, "interface": interface,
            "source": {"kind": "path", "path": str(sources / model)}}


def route(asset_id: str, shadow: str, *, wake: bool = False, target: str = TINY_CHAT,
          interface: str = "llm-runtime") -> dict[str, Any]:
    return {"asset_id": asset_id, "class": "route", "interface": interface,
            "targets": [{"asset": target}], "shadow": [{"asset": shadow, "sample": 1.0, "wake": wake}]}


@pytest.fixture(scope="module")
async def stack(own_db: str, nats_url: str, sources: Path, upstream: tuple[HeldUpstream, str],
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    _, url = upstream
    async with running_stack(own_db, nats_url, sources, tmp_path_factory.mktemp("store"),
                             auth=True) as running:
        await running.apply(
            *tiny_documents(sources),
            same_weights(sources, TWIN, TINY_CHAT, "llm-runtime"),
            same_weights(sources, SLEEPER, TINY_CHAT, "llm-runtime"),
            same_weights(sources, EMBED_TWIN, TINY_EMBED, "embedding-runtime"),
            {"asset_id": STUCK, "interface": "llm-runtime", "runtime": "openai",
             "source": {"kind": "url", "url": url, "upstream_model": "up-stuck"}},
        )
        await running.apply(
            route("mirrored", TWIN),
            route("mirrored-billing", TWIN),
            route("mirror-asleep", SLEEPER),
            route("mirror-wakes", SLEEPER, wake=True),
            route("mirror-stuck", STUCK, wake=True),
            route("mirror-embed", EMBED_TWIN, wake=True, target=TINY_EMBED,
                  interface="embedding-runtime"),
        )
        yield running


@pytest.fixture
async def admin_api(stack: Stack) -> AsyncIterator[openai.AsyncOpenAI]:
    assert stack.admin_key is not None
    async with api(stack.http_url, stack.admin_key) as client:
        yield client


def api(url: str, secret: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0, timeout=60)


def ask(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": f"hello {text}"}]


async def answer(client: openai.AsyncOpenAI, model: str, text: str) -> str:
    """Ask `model` (an asset or a route) greedily; the answer's text, after checking that the
    asset that answered is the primary target."""
    raw = await client.chat.completions.with_raw_response.create(
        model=model, messages=ask(text), max_tokens=MAX_TOKENS, temperature=0)
    reply = raw.parse()
    expected = model if model in (TWIN, SLEEPER) else TINY_CHAT
    assert reply.model == expected and raw.headers[TARGET_HEADER] == expected
    assert reply.usage is not None and reply.usage.completion_tokens == MAX_TOKENS
    content = reply.choices[0].message.content
    assert content
    return content


async def summary(url: str, headers: dict[str, str], route_id: str, asset: str) -> dict[str, Any]:
    """The shadow summary of `route_id` for `asset` on the router at `url` ({} before any)."""
    async with httpx.AsyncClient(base_url=url, timeout=30, headers=headers) as http:
        reply = await http.get(f"/admin/v1/routes/{route_id}/shadow")
    assert reply.status_code == 200, reply.text
    assert reply.json()["route"] == route_id
    return next((t for t in reply.json()["shadow"] if t["asset"] == asset), {})


async def summary_when(stack: Stack, route_id: str, asset: str, *, url: str | None = None,
                       **at_least: int) -> dict[str, Any]:
    """The summary once each of its counts in `at_least` (`copies=3`, `running=1`) reached
    that number; `dropped_<reason>` names a drop count."""
    found: dict[str, Any] = {}

    async def reached() -> bool:
        nonlocal found
        found = await summary(url or stack.http_url, stack.admin_headers, route_id, asset)
        if not found:
            return False
        counts = {**found, **{f"dropped_{k}": v for k, v in found["dropped"].items()}}
        return all(counts.get(name, 0) >= n for name, n in at_least.items())

    await wait_until(reached, timeout=15, interval=0.05)
    return found


async def metric(url: str, name: str, **labels: str) -> float:
    """One sample of the router's `/metrics` at `url` (0 when absent)."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        text = (await http.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


async def last_used(stack: Stack, asset_id: str) -> datetime:
    """When a request last started or finished on the asset, as the worker holding it says."""
    for worker in stack.workers:
        info = await worker.control.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest())
        for model in info.models:
            if model.asset_id == asset_id:
                return model.last_used_at.ToDatetime()
    raise AssertionError(f"no worker holds {asset_id}")


async def holds(stack: Stack, asset_id: str) -> bool:
    """Whether a worker holds the asset loaded now."""
    for worker in stack.workers:
        info = await worker.control.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest())
        if any(m.asset_id == asset_id for m in info.models):
            return True
    return False


async def test_the_primary_answers_unchanged_and_each_copy_is_compared(
        stack: Stack, admin_api: openai.AsyncOpenAI) -> None:
    direct = await answer(admin_api, TINY_CHAT, "mirror")
    assert await answer(admin_api, TWIN, "mirror") == direct  # same weights: loads the twin too
    twin_used = await last_used(stack, TWIN)
    n = 3
    for _ in range(n):
        assert await answer(admin_api, "mirrored", "mirror") == direct

    found = await summary_when(stack, "mirrored", TWIN, copies=n)
    assert (found["copies"], found["running"], found["errors"], found["dropped"]) == (n, 0, 0, {})
    assert found["agreement"] == {"kind": "exact_match", "compared": n, "not_compared": 0, "value": 1.0}
    for side in ("primary", "shadow"):
        latency = found[side]["latency_ms"]
        assert 0 < latency["p50"] <= latency["p95"]
        assert found[side]["completion_tokens"] == n * MAX_TOKENS
    assert found["primary"]["prompt_tokens"] == found["shadow"]["prompt_tokens"] > 0
    # The twin itself answered the copies (no error: an answer by another asset is one), and
    # they did not count as use of it: its idle clock stands.
    assert await last_used(stack, TWIN) == twin_used
    labels = {"route": "mirrored", "shadow": TWIN}
    assert await metric(stack.http_url, SHADOW_REQUESTS, **labels, result="ok") == n
    assert await metric(stack.http_url, "roundhouse_shadow_agreement", **labels) == 1.0
    assert await metric(stack.http_url, "roundhouse_shadow_tokens_total", **labels, side="shadow",
                        type="completion") == n * MAX_TOKENS


async def test_copies_are_never_billed_to_the_caller_nor_spend_its_limits(
        stack: Stack, admin: httpx.AsyncClient, admin_api: openai.AsyncOpenAI, own_db: str) -> None:
    await answer(admin_api, TWIN, "billing")  # the twin loaded: every request is copied
    await clear_of_minute_boundary()
    n = 3
    secret, name = await new_key(admin, "shadow", rpm=n + 1)
    conn = await asyncpg.connect(own_db)
    try:
        async def key_rows() -> list[asyncpg.Record]:
            return await conn.fetch(
                "SELECT r.* FROM usage_records r JOIN api_keys k ON k.key_id = r.key_id "
                "WHERE k.name = $1 ORDER BY r.at", name)

        async def ledger_size() -> int:
            return int(await conn.fetchval("SELECT count(*) FROM usage_records"))

        ledger = stack.router.gateway.usage
        await ledger.flush()  # what earlier tests left in the router's buffer
        before = await ledger_size()
        async with api(stack.http_url, secret) as client:
            for _ in range(n):
                await answer(client, "mirrored-billing", "billing")
            await summary_when(stack, "mirrored-billing", TWIN, copies=n)
            # The copies spent none of the key's requests: one more is allowed, then none.
            await answer(client, "mirrored-billing", "billing")
            with pytest.raises(openai.RateLimitError):
                await answer(client, "mirrored-billing", "billing")
        await summary_when(stack, "mirrored-billing", TWIN, copies=n + 1)

        async def written() -> bool:
            return len(await key_rows()) >= n + 2

        await wait_until(written, timeout=10, interval=0.1)
        await ledger.flush()
        mine = await key_rows()
        assert [(r["route"], r["asset_id"], r["status"]) for r in mine] == (
            [("mirrored-billing", TINY_CHAT, "ok")] * (n + 1)
            + [("mirrored-billing", TINY_CHAT, "rate_limited")])
        assert all(r["completion_tokens"] == MAX_TOKENS for r in mine[:n + 1])
        # Nobody else's rows either: the ledger grew by the primaries alone.
        assert await ledger_size() - before == n + 2
    finally:
        await conn.close()


async def test_an_asleep_shadow_is_never_woken_unless_the_route_says_wake(
        stack: Stack, admin: httpx.AsyncClient, admin_api: openai.AsyncOpenAI) -> None:
    n = 3
    direct = await answer(admin_api, TINY_CHAT, "asleep")
    for _ in range(n):
        assert await answer(admin_api, "mirror-asleep", "asleep") == direct
    found = await summary_when(stack, "mirror-asleep", SLEEPER, dropped_asleep=n)
    assert (found["copies"], found["running"], found["dropped"]) == (0, 0, {"asleep": n})
    assert await metric(stack.http_url, SHADOW_REQUESTS, route="mirror-asleep", shadow=SLEEPER,
                        result="dropped_asleep") == n
    assert not await holds(stack, SLEEPER)
    asset = await stack.registry_asset(SLEEPER)
    assert asset.status.state not in (asset_pb2.ASSET_STATE_LOADING, asset_pb2.ASSET_STATE_LOADED)
    operations = (await admin.get("/operations", params={"asset_id": SLEEPER})).json()
    assert operations["operations"] == []

    assert await answer(admin_api, "mirror-wakes", "asleep") == direct
    await wait_until(lambda: holds(stack, SLEEPER), timeout=30, interval=0.1)
    woken = await summary_when(stack, "mirror-wakes", SLEEPER, copies=1)
    assert (woken["errors"], woken["dropped"], woken["agreement"]["value"]) == (0, {}, 1.0)


async def test_a_stuck_shadow_never_delays_the_primary(
        stack: Stack, upstream: tuple[HeldUpstream, str], admin_api: openai.AsyncOpenAI) -> None:
    held, _ = upstream
    direct = await answer(admin_api, TINY_CHAT, "stuck")
    with holding(held):
        before = len(held.received)
        assert await answer(admin_api, "mirror-stuck", "stuck") == direct
        await wait_until(lambda: len(held.received) > before, timeout=15)  # the copy is held there
        # While that copy is held, primaries still answer, whole and streamed.
        assert await answer(admin_api, "mirror-stuck", "stuck") == direct
        stream = await admin_api.chat.completions.create(
            model="mirror-stuck", messages=ask("stuck"), max_tokens=MAX_TOKENS, temperature=0,
            stream=True)
        streamed = [chunk async for chunk in stream]
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == direct
        assert all(c.model == TINY_CHAT for c in streamed)
        pending = await summary_when(stack, "mirror-stuck", STUCK, running=1)
        assert pending["copies"] == 0 and held.answered == 0
    done = await summary_when(stack, "mirror-stuck", STUCK, copies=3)
    assert (done["running"], done["errors"]) == (0, 0)
    # The shadow answered something else: the primary's answers were still what the target says.
    assert done["agreement"]["kind"] == "exact_match" and done["agreement"]["value"] == 0.0


async def test_copies_beyond_the_bound_are_dropped_as_saturated(
        stack: Stack, upstream: tuple[HeldUpstream, str], admin_api: openai.AsyncOpenAI,
        nats_url: str) -> None:
    assert stack.router_settings is not None
    held, _ = upstream
    settings = stack.router_settings.model_copy(update={"shadow_max_in_flight": 1})
    direct = await answer(admin_api, TINY_CHAT, "bounded")
    bus = await EventBus.connect(nats_url, name="bounded-shadow-router", ensure_stream=False)
    try:
        async with running_router(settings, bus) as (bounded, _):
            url = f"http://127.0.0.1:{bounded.http_port}"
            assert stack.admin_key is not None
            async with api(url, stack.admin_key) as client:
                with holding(held):
                    before = len(held.received)
                    assert await answer(client, "mirror-stuck", "bounded") == direct
                    await wait_until(lambda: len(held.received) > before, timeout=15)
                    n = 4
                    replies = await asyncio.gather(
                        *(answer(client, "mirror-stuck", "bounded") for _ in range(n)))
                    assert replies == [direct] * n
                    found = await summary_when(stack, "mirror-stuck", STUCK, url=url,
                                               dropped_saturated=n)
                    assert (found["running"], found["copies"], found["dropped"]) == (
                        1, 0, {"saturated": n})
                    assert await metric(url, SHADOW_REQUESTS, route="mirror-stuck", shadow=STUCK,
                                        result="dropped_saturated") == n
                    assert len(held.received) == before + 1  # only the one copy reached it
                done = await summary_when(stack, "mirror-stuck", STUCK, url=url, copies=1)
                assert (done["running"], done["errors"], done["dropped"]) == (0, 0, {"saturated": n})
    finally:
        await bus.close()


async def test_an_embedding_shadow_with_the_same_weights_agrees_by_cosine(
        stack: Stack, admin_api: openai.AsyncOpenAI) -> None:
    batches = [["hello"], ["w1 w2 w3", "hello w7", "w9"]]
    for inputs in batches:
        raw = await admin_api.embeddings.with_raw_response.create(model="mirror-embed", input=inputs)
        assert raw.headers[TARGET_HEADER] == TINY_EMBED
        direct = await admin_api.embeddings.create(model=TINY_EMBED, input=inputs)
        routed = [v for d in raw.parse().data for v in d.embedding]
        assert routed == pytest.approx([v for d in direct.data for v in d.embedding], abs=1e-6)
    found = await summary_when(stack, "mirror-embed", EMBED_TWIN, copies=len(batches))
    assert (found["errors"], found["dropped"]) == (0, {})
    agreement = found["agreement"]
    assert (agreement["kind"], agreement["compared"]) == ("cosine", len(batches))
    assert agreement["value"] == pytest.approx(1.0, abs=1e-6)
    assert found["primary"]["prompt_tokens"] == found["shadow"]["prompt_tokens"] > 0
