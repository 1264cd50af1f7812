"""Routes end to end: a stack that checks keys, real workers with tiny models, the official
`openai` client, real Postgres and NATS.

Every target and fallback is its own asset over the same tiny chat model, so any of them
answers any request; what tells them apart is the asset that answered (`model`,
`x-roundhouse-target`) and the attempts the router made (`x-roundhouse-attempts`).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import openai
import pytest
from limits_harness import clear_of_minute_boundary, ledger_rows, new_key
from openai.types.chat import ChatCompletionMessageParam
from polling import wait_until
from stack_harness import TINY_CHAT, TINY_EMBED, RunningWorker, Stack, running_stack, tiny_documents

from roundhouse.v1 import inference_pb2, worker_pb2
from services.common.embedded import EmbeddedNats
from services.common.route_proto import RouteRecord

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
TARGET, ATTEMPTS = "x-roundhouse-target", "x-roundhouse-attempts"
LONG = 4000
"""Tokens that take the tiny model seconds to generate: a stream that holds its slot."""

B = "rt-b"
"""The second split target."""
OFF, OFF_2 = "rt-off", "rt-off-2"
"""Disabled assets."""
FB = "rt-fb"
"""The fallback most routes here share."""
ASLEEP = "rt-asleep"
"""A fallback nothing asks for by name: it stays asleep unless a route wakes it."""
SMALL = "rt-small"
"""A target that declares a 64-token context."""
SINGLE = "rt-single"
"""A target with one slot and no queue."""


def chat_model(sources: Path, asset_id: str, **fields: Any) -> dict[str, Any]:
    """A chat asset over the tiny chat model's weights."""
    return {"asset_id": asset_id, "interface": "llm-runtime",
            "source": {"kind": "path", "path": str(sources / TINY_CHAT)}, **fields}


def route(asset_id: str, *targets: tuple[str, float], interface: str = "llm-runtime",
          **fields: Any) -> dict[str, Any]:
    """A route document over weighted `targets`."""
    return {"asset_id": asset_id, "class": "route", "interface": interface,
            "targets": [{"asset": asset, "weight": weight} for asset, weight in targets], **fields}


ROOMY = {"max_concurrency": 4, "max_queue": 64, "queue_timeout_s": 60}
SPLIT = route("rt-split", (TINY_CHAT, 3), (B, 1))
BY_USER = route("rt-by-user", (TINY_CHAT, 1), (B, 1), sticky="user")
BY_KEY = route("rt-by-key", (TINY_CHAT, 1), (B, 1), sticky="key")
HALF_OFF = route("rt-half-off", (TINY_CHAT, 1), (OFF, 1))
ALL_OFF = route("rt-all-off", (OFF, 1), (OFF_2, 1), fallback=[FB])
QUEUE = route("rt-queue", (SINGLE, 1), fallback=[FB])
QUEUE_STRICT = route("rt-queue-strict", (SINGLE, 1), fallback=[FB], fallback_on=["unavailable"])
CONTEXT = route("rt-context", (SMALL, 1), fallback=[FB])
PREFER = route("rt-prefer", (OFF, 1), fallback=[ASLEEP, FB])
EMBED = route("rt-embed", (TINY_EMBED, 1), interface="embedding-runtime")


@pytest.fixture(scope="module")
async def stack(
    own_db: str, nats_url: str, sources: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    """A stack of the module's own database (its routes must not outlive it) that checks keys."""
    async with running_stack(own_db, nats_url, sources, tmp_path_factory.mktemp("store"),
                             auth=True) as running:
        await running.apply(
            *tiny_documents(sources, **ROOMY),
            chat_model(sources, B, policy=ROOMY),
            chat_model(sources, OFF, lifecycle={"desired": "disabled"}),
            chat_model(sources, OFF_2, lifecycle={"desired": "disabled"}),
            chat_model(sources, FB, policy=ROOMY),
            chat_model(sources, ASLEEP),
            chat_model(sources, SMALL, metadata={"context_length": 64}),
            chat_model(sources, SINGLE, policy={"max_concurrency": 1, "max_queue": 0}),
            SPLIT, BY_USER, BY_KEY, HALF_OFF, ALL_OFF, QUEUE, QUEUE_STRICT, CONTEXT, PREFER, EMBED,
        )
        yield running


def client(stack: Stack, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stack.http_url}/v1", api_key=key, max_retries=0,
                              timeout=60)


@pytest.fixture
async def api(stack: Stack) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official client with the admin key (no limits)."""
    assert stack.admin_key is not None
    async with client(stack, stack.admin_key) as admin_api:
        yield admin_api


async def ask(api: openai.AsyncOpenAI, model: str, *,
              messages: list[ChatCompletionMessageParam] = HELLO, **fields: Any,
              ) -> tuple[str, str | None]:
    """One whole chat answer to `model`: the asset that answered and the attempts made (None
    for a model named directly). The `model` field and the target header always agree."""
    raw = await api.chat.completions.with_raw_response.create(
        model=model, messages=messages, max_tokens=1, **fields)
    answered = raw.parse().model
    assert raw.headers[TARGET] == answered
    return answered, raw.headers.get(ATTEMPTS)


async def holders(stack: Stack, asset_id: str) -> list[RunningWorker]:
    """The stack's workers that hold `asset_id` now."""
    found = []
    for worker in stack.workers:
        info = await worker.control.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest())
        if any(m.asset_id == asset_id for m in info.models):
            found.append(worker)
    return found


@asynccontextmanager
async def busy(stack: Stack, api: openai.AsyncOpenAI, asset_id: str) -> AsyncIterator[None]:
    """`asset_id`'s slots held by a long stream for the block; free again after it."""
    stream = await api.chat.completions.create(model=asset_id, messages=HELLO, max_tokens=LONG,
                                               stream=True)
    try:
        await anext(aiter(stream))  # streaming: its slot is taken
        yield
    finally:
        await stream.close()
        await wait_until(lambda: stack.router.gateway.admission.stats(asset_id).in_flight == 0)


async def sees_weights(stack: Stack, route_id: str, weights: list[float]) -> None:
    """Wait until the router resolves `route_id` with these target weights."""
    async def current() -> bool:
        stored = await stack.router.gateway.catalog.resolve(route_id, "")
        return isinstance(stored, RouteRecord) and [t.weight for t in stored.spec.targets] == weights

    await wait_until(current)


# -- the split -------------------------------------------------------------------------------


async def test_shares_follow_the_weights_and_each_answer_names_its_asset(
    api: openai.AsyncOpenAI,
) -> None:
    n, batch = 400, 16
    answered: Counter[str] = Counter()
    for _ in range(n // batch):
        replies = await asyncio.gather(*(ask(api, "rt-split") for _ in range(batch)))
        assert all(attempts == f"{asset}:ok" for asset, attempts in replies)
        answered.update(asset for asset, _ in replies)
    assert set(answered) == {TINY_CHAT, B}
    # 3:1 is a share of 3/4: 300 of 400, binomial sd sqrt(400 * 3/4 * 1/4) = 8.7. Five sd (43)
    # either side is missed by chance fewer than once in a million runs; a 1:1 split (200)
    # or an ignored weight (400) is far outside.
    assert abs(answered[TINY_CHAT] - n * 0.75) <= 5 * math.sqrt(n * 0.75 * 0.25)


async def test_the_same_user_always_gets_the_same_target_and_a_raised_weight_only_draws_users_to_it(
    stack: Stack, api: openai.AsyncOpenAI,
) -> None:
    users = [f"user-{i}" for i in range(20)]

    async def targets_of(user: str, times: int) -> set[str]:
        replies = await asyncio.gather(*(ask(api, BY_USER["asset_id"], user=user) for _ in range(times)))
        return {asset for asset, _ in replies}

    before: dict[str, str] = {}
    for user in users:
        (before[user],) = await targets_of(user, 5)
    assert set(before.values()) == {TINY_CHAT, B}

    await stack.apply(route(BY_USER["asset_id"], (TINY_CHAT, 1), (B, 4), sticky="user"))
    await sees_weights(stack, BY_USER["asset_id"], [1, 4])
    after: dict[str, str] = {}
    for user in users:
        (after[user],) = await targets_of(user, 2)
    moved = {(before[u], after[u]) for u in users if before[u] != after[u]}
    assert moved == {(TINY_CHAT, B)}  # some users moved, and only to the raised target


async def test_the_same_key_always_gets_the_same_target(
    stack: Stack, admin: httpx.AsyncClient,
) -> None:
    keys = [key for key, _ in await asyncio.gather(*(new_key(admin, "routes") for _ in range(24)))]

    async def targets_of(key: str) -> set[str]:
        async with client(stack, key) as api:
            # A user of its own on each request: `sticky: key` ignores it.
            replies = await asyncio.gather(*(ask(api, BY_KEY["asset_id"], user=f"u{i}")
                                             for i in range(3)))
        return {asset for asset, _ in replies}

    seen = [await targets_of(key) for key in keys]
    assert all(len(targets) == 1 for targets in seen)
    # Keys are random: all 24 on one side of a 1:1 split happens once in eight million runs.
    assert set().union(*seen) == {TINY_CHAT, B}


# -- targets that cannot answer --------------------------------------------------------------


async def test_a_disabled_target_gets_no_share_and_with_all_disabled_the_fallback_answers(
    api: openai.AsyncOpenAI,
) -> None:
    # Were the disabled half ever picked, the request would fail: the route has no fallback.
    # 30 requests at 1:1 would miss it once in a billion runs.
    replies = await asyncio.gather(*(ask(api, HALF_OFF["asset_id"]) for _ in range(30)))
    assert {asset for asset, _ in replies} == {TINY_CHAT}
    assert {attempts for _, attempts in replies} == {f"{OFF}:unavailable,{TINY_CHAT}:ok"}

    assert await ask(api, ALL_OFF["asset_id"]) == (
        FB, f"{OFF}:unavailable,{OFF_2}:unavailable,{FB}:ok")


async def test_a_full_queue_falls_back_only_when_the_route_says_so(
    stack: Stack, api: openai.AsyncOpenAI,
) -> None:
    async with busy(stack, api, SINGLE):
        assert await ask(api, QUEUE["asset_id"]) == (FB, f"{SINGLE}:overloaded,{FB}:ok")
        with pytest.raises(openai.RateLimitError) as refused:
            await ask(api, QUEUE_STRICT["asset_id"])
    assert refused.value.code == "model_overloaded"
    assert refused.value.response.headers["retry-after"]
    # With the slot free again, the target answers itself.
    assert await ask(api, QUEUE["asset_id"]) == (SINGLE, f"{SINGLE}:ok")


async def test_a_prompt_over_the_targets_context_goes_to_the_fallback_without_calling_it(
    stack: Stack, api: openai.AsyncOpenAI,
) -> None:
    long_prompt: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": " ".join(["w1"] * 100)}]
    assert await ask(api, CONTEXT["asset_id"], messages=long_prompt) == (
        FB, f"{SMALL}:context_length,{FB}:ok")
    # Any call would have woken it: it is on demand and nothing else asks for it.
    assert await holders(stack, SMALL) == []
    # A short prompt fits its context: the target answers it.
    assert await ask(api, CONTEXT["asset_id"]) == (SMALL, f"{SMALL}:ok")


async def test_a_loaded_fallback_is_preferred_to_one_that_would_have_to_wake(
    stack: Stack, api: openai.AsyncOpenAI,
) -> None:
    assert await ask(api, FB) == (FB, None)
    await wait_until(lambda: stack.router.gateway.workers.pick(FB) is not None)
    assert await holders(stack, ASLEEP) == []
    # The route lists the asleep fallback first; the loaded one answers, and nothing woke.
    assert await ask(api, PREFER["asset_id"]) == (FB, f"{OFF}:unavailable,{FB}:ok")
    assert await holders(stack, ASLEEP) == []


# -- other fronts ----------------------------------------------------------------------------


async def test_the_grpc_front_streams_chunks_of_the_answering_asset(stack: Stack) -> None:
    metadata = (("authorization", f"Bearer {stack.admin_key}"),)

    async def chunks_of(model: str) -> list[inference_pb2.ChatChunk]:
        request = inference_pb2.ChatRequest(
            model=model, max_tokens=3, messages=[inference_pb2.ChatMessage(role="user", content="hi")])
        return [c async for c in stack.inference.Chat(request, timeout=60, metadata=metadata)]

    fell_back = await chunks_of(ALL_OFF["asset_id"])
    assert fell_back and {c.asset_id for c in fell_back} == {FB}
    split = await chunks_of(SPLIT["asset_id"])
    assert len({c.asset_id for c in split}) == 1 and split[0].asset_id in {TINY_CHAT, B}
    with pytest.raises(grpc.aio.AioRpcError) as wrong:
        await chunks_of(EMBED["asset_id"])  # an embedding route does not chat
    assert wrong.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not llm-runtime" in (wrong.value.details() or "")


async def test_embeddings_through_an_embedding_route(
    stack: Stack, api: openai.AsyncOpenAI,
) -> None:
    raw = await api.embeddings.with_raw_response.create(model=EMBED["asset_id"], input=["one", "two"])
    assert raw.headers[TARGET] == TINY_EMBED
    assert raw.headers[ATTEMPTS] == f"{TINY_EMBED}:ok"
    vectors = raw.parse()
    assert vectors.model == TINY_EMBED and len(vectors.data) == 2 and vectors.data[0].embedding
    metadata = (("authorization", f"Bearer {stack.admin_key}"),)
    reply = await stack.inference.Embed(inference_pb2.EmbedRequest(
        model=EMBED["asset_id"], inputs=[inference_pb2.EmbedInput(text="one")]),
        timeout=60, metadata=metadata)
    assert reply.asset_id == TINY_EMBED
    assert list(reply.embeddings[0].values) == pytest.approx(vectors.data[0].embedding, abs=1e-5)


async def test_the_models_list_shows_routes(stack: Stack) -> None:
    expected = {"targets": [{"asset": TINY_CHAT, "weight": 3.0}, {"asset": B, "weight": 1.0}],
                "sticky": "none", "fallback": []}
    async with httpx.AsyncClient(base_url=f"{stack.http_url}/v1", timeout=60,
                                 headers=stack.admin_headers) as http:
        listed = {card["id"]: card for card in (await http.get("/models")).json()["data"]}
        one = await http.get(f"/models/{SPLIT['asset_id']}")
    assert {r["asset_id"] for r in (SPLIT, ALL_OFF, EMBED)} <= set(listed)
    card = listed[SPLIT["asset_id"]]
    assert {k: card["route"][k] for k in expected} == expected
    assert card["interfaces"] == ["llm-runtime"]
    assert listed[EMBED["asset_id"]]["interfaces"] == ["embedding-runtime"]
    assert listed[TINY_CHAT]["route"] is None
    assert one.status_code == 200
    assert (one.json()["id"], one.json()["route"]) == (SPLIT["asset_id"], card["route"])


# -- limits and the ledger -------------------------------------------------------------------


async def test_limits_count_each_request_once_and_the_ledger_names_the_answering_asset(
    stack: Stack, api: openai.AsyncOpenAI, admin: httpx.AsyncClient, own_db: str,
) -> None:
    await clear_of_minute_boundary()
    key, name = await new_key(admin, "routes", rpm=2)
    async with busy(stack, api, SINGLE), client(stack, key) as limited:
        for left in ("1", "0"):
            raw = await limited.chat.completions.with_raw_response.create(
                model=QUEUE["asset_id"], messages=HELLO, max_tokens=1)
            assert raw.headers[ATTEMPTS] == f"{SINGLE}:overloaded,{FB}:ok"
            assert raw.headers["x-ratelimit-remaining-requests"] == left
        with pytest.raises(openai.RateLimitError) as refused:
            await limited.chat.completions.create(model=QUEUE["asset_id"], messages=HELLO,
                                                  max_tokens=1)
    assert refused.value.code == "rate_limit_exceeded"

    async def recorded() -> bool:
        return len(await ledger_rows(own_db, name)) >= 3

    await wait_until(recorded, timeout=10, interval=0.1)
    rows = await ledger_rows(own_db, name)
    assert [(r["status"], r["route"]) for r in rows] == [
        ("ok", QUEUE["asset_id"]), ("ok", QUEUE["asset_id"]), ("rate_limited", QUEUE["asset_id"])]
    assert [r["asset_id"] for r in rows[:2]] == [FB, FB]
    assert all(r["completion_tokens"] == 1 for r in rows[:2])


# -- after the first byte --------------------------------------------------------------------


@pytest.fixture
async def fragile(
    own_db: str, sources: Path, tmp_path: Path, nats_factory: Callable[[], EmbeddedNats],
) -> AsyncIterator[Stack]:
    """A stack of two workers, one of which the test stops; on a NATS server of its own, so
    the module's stack never learns of its workers."""
    nats = nats_factory()
    async with running_stack(own_db, nats.url, sources, tmp_path / "store", workers=2) as running:
        await running.apply(chat_model(sources, "ms-a"), chat_model(sources, "ms-b"),
                            route("ms-route", ("ms-a", 1), fallback=["ms-b"]))
        yield running


async def test_a_failure_after_the_first_chunk_ends_the_stream_with_an_error_and_no_retry(
    fragile: Stack, own_db: str,
) -> None:
    body = {"model": "ms-route", "messages": HELLO, "max_tokens": LONG, "stream": True,
            "stream_options": {"include_usage": True}}
    async with httpx.AsyncClient(base_url=fragile.http_url, timeout=60) as http, \
            http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers[ATTEMPTS] == "ms-a:ok"  # a single attempt
        lines = response.aiter_lines()
        first = await anext(line async for line in lines if line.startswith("data: "))
        assert json.loads(first.removeprefix("data: "))["model"] == "ms-a"
        (answering,) = await holders(fragile, "ms-a")
        await answering.server.stop(0)  # the worker goes away mid-stream
        rest = [line.removeprefix("data: ") async for line in lines if line.startswith("data: ")]
        request_id = response.headers["x-request-id"]
    assert "[DONE]" not in rest
    last = json.loads(rest[-1])
    assert set(last["error"]) >= {"message", "type", "code"}
    used = last["usage"]
    assert used["prompt_tokens"] > 0
    assert used["total_tokens"] == used["prompt_tokens"] + used["completion_tokens"]
    assert not any("error" in json.loads(event) for event in rest[:-1])
    # A retry would have woken the fallback on the worker left.
    (left,) = [w for w in fragile.workers if w is not answering]
    info = await left.control.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest())
    assert "ms-b" not in {m.asset_id for m in info.models}

    async def recorded() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(own_db)
        try:
            return await conn.fetch("SELECT * FROM usage_records WHERE request_id = $1", request_id)
        finally:
            await conn.close()

    await wait_until(recorded, timeout=10, interval=0.1)
    (row,) = await recorded()
    assert (row["route"], row["asset_id"]) == ("ms-route", "ms-a")
    assert row["status"] != "ok"
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        used["prompt_tokens"], used["completion_tokens"])



async def request_rows(dsn: str, request_id: str) -> list[asyncpg.Record]:
    """The usage ledger's rows of one request."""
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch("SELECT * FROM usage_records WHERE request_id = $1", request_id)
    finally:
        await conn.close()


async def test_a_whole_answer_falls_back_when_its_worker_fails_while_generating_it(
    fragile: Stack, own_db: str, sources: Path,
) -> None:
    # A copy to a shadow starts once the primary's first chunk reached the router: a shadow
    # that is asleep (and may not be woken) counts that moment as a dropped copy, which tells
    # generation apart from the wait before it (a failure then is retried on another worker).
    await fragile.apply(chat_model(sources, "ms-asleep"),
                        route("ms-whole", ("ms-a", 1), fallback=["ms-b"],
                              shadow=[{"asset": "ms-asleep", "sample": 1}]))
    async with client(fragile, "no-key") as api, \
            httpx.AsyncClient(base_url=fragile.http_url, timeout=60) as admin:  # no keys here
        # The fallback first: the target then loads on the worker with more room, the other one.
        await api.chat.completions.create(model="ms-b", messages=HELLO, max_tokens=1)
        (spare,) = await holders(fragile, "ms-b")
        asking = asyncio.ensure_future(api.chat.completions.with_raw_response.create(
            model="ms-whole", messages=HELLO, max_tokens=LONG // 4))

        async def relayed() -> bool:
            shadows = (await admin.get("/admin/v1/routes/ms-whole/shadow")).json()["shadow"]
            return any(s["dropped"].get("asleep", 0) > 0 for s in shadows)

        await wait_until(relayed, timeout=60, interval=0.05)
        (answering,) = await holders(fragile, "ms-a")
        info = await answering.control.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest())
        assert [m.in_flight for m in info.models if m.asset_id == "ms-a"] == [1]
        assert answering is not spare
        await answering.server.stop(0)  # the worker goes away before the answer is whole
        raw = await asking
    answer = raw.parse()
    assert raw.headers[ATTEMPTS] == "ms-a:unavailable,ms-b:ok"
    assert answer.model == raw.headers[TARGET] == "ms-b"
    assert answer.choices[0].message.content
    assert answer.usage is not None and answer.usage.completion_tokens > 0

    request_id = raw.headers["x-request-id"]
    await wait_until(lambda: request_rows(own_db, request_id), timeout=10, interval=0.1)
    (row,) = await request_rows(own_db, request_id)  # one line for the request, not per attempt
    assert (row["route"], row["asset_id"], row["status"]) == ("ms-whole", "ms-b", "ok")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        answer.usage.prompt_tokens, answer.usage.completion_tokens)
