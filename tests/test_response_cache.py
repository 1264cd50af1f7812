"""The response cache shared by routers: keys, what may be cached, and the NATS KV store."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import nats
import nats.js.errors
import pytest
from nats.aio.client import Client
from polling import wait_until
from prometheus_client import CollectorRegistry

from roundhouse.v1 import inference_pb2
from services.common.assetspec import Generation
from services.common.embedded import EmbeddedNats
from services.common.routespec import Cache
from services.router.cache import (
    MAX_TTL_S,
    SHARED_SCOPE,
    ResponseCache,
    cache_key,
    chat_cacheable,
)

NATS_KEY = re.compile(r"^[-/_=.a-zA-Z0-9]+$")


def chat(**fields: object) -> inference_pb2.ChatRequest:
    """A chat request: one user message and temperature 0, unless `fields` say otherwise."""
    request = inference_pb2.ChatRequest(
        model="support-chat", request_id="req-1", user="alice",
        messages=[inference_pb2.ChatMessage(role="user", content="What is a roundhouse?")],
        temperature=0.0)
    for name, value in fields.items():
        if isinstance(value, list):
            field = getattr(request, name)
            del field[:]
            field.extend(value)
        elif value is None:
            request.ClearField(name)
        else:
            setattr(request, name, value)
    return request


def key_of(request: inference_pb2.ChatRequest | inference_pb2.EmbedRequest, *, asset: str = "smollm2",
           revision: int = 3, scope: str = "key-1") -> str:
    return cache_key(asset, revision, scope, request)


# --- keys -------------------------------------------------------------------------------


def test_the_key_is_a_valid_nats_key_and_stable() -> None:
    key = key_of(chat())
    assert NATS_KEY.match(key) and not key.startswith(".") and not key.endswith(".")
    # Routers of every version and process agree on a key: its layout is fixed.
    assert key == "r1.4710931b9248aca51f88aaaab45ad6611f1436fb2115f9fb38c27ddea160b07b"


def test_requests_differing_only_in_id_user_or_the_name_used_share_a_key() -> None:
    base = key_of(chat())
    assert key_of(chat(request_id="req-2")) == base
    assert key_of(chat(user="bob")) == base
    assert key_of(chat(model="smollm2-alias")) == base
    assert key_of(chat(model="", request_id="", user="")) == base


@pytest.mark.parametrize("change", [
    {"temperature": 0.5},
    {"temperature": None},  # unset is the model's default, not 0
    {"top_p": 0.9},
    {"max_tokens": 16},
    {"seed": 7},
    {"stop": ["\n"]},
    {"tools": [inference_pb2.Tool(name="lookup", parameters_json="{}")]},
    {"messages": [inference_pb2.ChatMessage(role="user", content="What is a turntable?")]},
    {"messages": [inference_pb2.ChatMessage(role="system", content="What is a roundhouse?")]},
    {"messages": [inference_pb2.ChatMessage(role="user", content="What is a roundhouse?", name="a")]},
    {"messages": [inference_pb2.ChatMessage(role="user", content="What is a roundhouse?"),
                  inference_pb2.ChatMessage(role="assistant", content="A building.")]},
    {"messages": [], "prompt": "What is a roundhouse?"},
], ids=lambda change: "+".join(change))
def test_any_other_difference_in_the_request_gives_another_key(change: dict[str, object]) -> None:
    assert key_of(chat(**change)) != key_of(chat())


def test_the_answering_asset_its_revision_and_the_scope_are_in_the_key() -> None:
    base = key_of(chat())
    assert key_of(chat(), revision=4) != base
    assert key_of(chat(), asset="qwen") != base
    assert key_of(chat(), scope="key-2") != base
    assert key_of(chat(), scope="") != base
    assert key_of(chat(), scope=SHARED_SCOPE) != base
    # Parts do not run into each other.
    assert cache_key("a1", 2, "k", chat()) != cache_key("a", 12, "k", chat())


def test_a_chat_and_an_embedding_request_of_the_same_bytes_do_not_share_a_key() -> None:
    as_chat = inference_pb2.ChatRequest(messages=[inference_pb2.ChatMessage(role="hello")])
    as_embed = inference_pb2.EmbedRequest(inputs=[inference_pb2.EmbedInput(text="hello")])
    assert as_chat.SerializeToString() == as_embed.SerializeToString()
    assert key_of(as_chat) != key_of(as_embed)


def test_embedding_keys_follow_the_inputs_only() -> None:
    def embed(*texts: str, **fields: str) -> inference_pb2.EmbedRequest:
        return inference_pb2.EmbedRequest(inputs=[inference_pb2.EmbedInput(text=t) for t in texts], **fields)

    base = key_of(embed("a", "b", model="minilm", request_id="1"))
    assert key_of(embed("a", "b", model="embed-default", request_id="2", user="u")) == base
    assert key_of(embed("b", "a")) != base
    assert key_of(embed("a")) != base
    tokens = inference_pb2.EmbedRequest(inputs=[inference_pb2.EmbedInput(tokens=inference_pb2.TokenIds(ids=[1]))])
    assert key_of(tokens) != base


# --- what may be cached -----------------------------------------------------------------

CACHE = Cache(ttl_s=600)
OPT_IN = Cache(ttl_s=600, nondeterministic=True)


@pytest.mark.parametrize(("request_fields", "generation", "cache", "cacheable"), [
    ({"temperature": 0.0}, Generation(), CACHE, True),
    ({"temperature": 0.0}, Generation(temperature=0.7), CACHE, True),
    ({"temperature": 0.7}, Generation(), CACHE, False),
    ({"temperature": 0.7}, Generation(temperature=0), CACHE, False),
    ({"temperature": 0.7}, Generation(), OPT_IN, True),
    ({"temperature": None}, Generation(temperature=0), CACHE, True),
    ({"temperature": None}, Generation(temperature=0.8), CACHE, False),
    # Nothing set: the worker samples (the model folder's defaults, else temperature 1).
    ({"temperature": None}, Generation(), CACHE, False),
    ({"temperature": None}, Generation(), OPT_IN, True),
    # top_p 0 keeps only the most likely token: greedy whatever the temperature.
    ({"temperature": 0.7, "top_p": 0.0}, Generation(), CACHE, True),
    ({"temperature": None}, Generation(top_p=0), CACHE, True),
    ({"temperature": None, "top_p": 0.5}, Generation(top_p=0), CACHE, False),
    # A seed alone does not make sampling deterministic enough to cache.
    ({"temperature": 0.7, "seed": 1}, Generation(), CACHE, False),
])
def test_chat_is_cached_only_when_greedy_unless_the_route_opts_in(
    request_fields: dict[str, object], generation: Generation, cache: Cache, cacheable: bool
) -> None:
    assert chat_cacheable(chat(**request_fields), generation, cache) is cacheable


# --- the store --------------------------------------------------------------------------


class Clock:
    """Wall-clock seconds a test moves by hand (every router shares it)."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def counted(cache: ResponseCache, metric: str, route: str, result: str) -> float:
    return cache.registry.get_sample_value(
        f"roundhouse_response_cache_{metric}_total", {"route": route, "result": result}) or 0.0


Connect = Callable[[], Awaitable[Client]]
Routers = tuple[ResponseCache, ResponseCache, Clock]


@pytest.fixture
async def connections(nats_url: str) -> AsyncIterator[Connect]:
    """Opens separate NATS connections, as separate routers hold; all closed at the end."""
    opened: list[Client] = []

    async def connect() -> Client:
        nc = await nats.connect(nats_url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
        opened.append(nc)
        return nc

    yield connect
    for nc in opened:
        await nc.close()


async def delete_bucket(nc: Client, bucket: str) -> None:
    try:
        await nc.jetstream().delete_stream(f"KV_{bucket}")
    except nats.js.errors.NotFoundError:
        pass


@pytest.fixture
async def two_routers(connections: Connect) -> AsyncIterator[Routers]:
    """Two caches on one fresh bucket, each on its own connection, started at the same time
    (both race to create the bucket), and the clock they share."""
    bucket = f"test_responses_{uuid.uuid4().hex[:10]}"
    clock = Clock()
    caches = [ResponseCache(await connections(), bucket=bucket, registry=CollectorRegistry(), clock=clock)
              for _ in range(2)]
    await asyncio.gather(*(c.start() for c in caches))
    yield caches[0], caches[1], clock
    await delete_bucket(await connections(), bucket)
    for cache in caches:
        await cache.close()


async def test_two_routers_see_each_others_entries(two_routers: Routers) -> None:
    first, second, _ = two_routers
    key = key_of(chat())
    assert await second.get("support", key) is None
    assert await first.put("support", key, b"answer one", ttl_s=600, max_bytes=None)
    assert await second.get("support", key) == b"answer one"
    assert await second.put("support", key, b"answer two", ttl_s=600, max_bytes=None)
    assert await first.get("support", key) == b"answer two"
    assert await first.get("support", key_of(chat(), revision=4)) is None

    assert counted(second, "lookups", "support", "miss") == 1
    assert counted(second, "lookups", "support", "hit") == 1
    assert counted(first, "lookups", "support", "hit") == 1
    assert counted(first, "lookups", "support", "miss") == 1
    assert counted(first, "stores", "support", "stored") == 1


async def test_an_entry_is_served_for_its_ttl_then_misses_everywhere(two_routers: Routers) -> None:
    first, second, clock = two_routers
    short, long = key_of(chat()), key_of(chat(seed=1))
    assert await first.put("r", short, b"short", ttl_s=60, max_bytes=None)
    assert await first.put("r", long, b"long", ttl_s=10 * MAX_TTL_S, max_bytes=None)
    clock.now += 59
    assert await second.get("r", short) == b"short"
    clock.now += 1
    assert await second.get("r", short) is None
    assert await first.get("r", short) is None
    assert await second.get("r", long) == b"long"
    # No entry outlives the bucket's age limit, whatever its route asked.
    clock.now += MAX_TTL_S
    assert await second.get("r", long) is None
    assert counted(second, "lookups", "r", "miss") == 2
    # A new answer under the same key is served again.
    assert await first.put("r", short, b"fresh", ttl_s=60, max_bytes=None)
    assert await second.get("r", short) == b"fresh"


async def test_answers_over_the_entry_bound_are_not_kept(two_routers: Routers) -> None:
    first, second, _ = two_routers
    key = key_of(chat())
    assert not await first.put("r", key, b"x" * 101, ttl_s=60, max_bytes=100)
    assert await second.get("r", key) is None
    assert await first.put("r", key, b"x" * 100, ttl_s=60, max_bytes=100)
    assert await second.get("r", key) == b"x" * 100
    # Without a route bound, the cache's own applies; a route may allow more than it.
    big = b"y" * (first.max_entry_bytes + 1)
    assert not await first.put("r", key_of(chat(seed=2)), big, ttl_s=60, max_bytes=None)
    assert await first.put("r", key_of(chat(seed=2)), big, ttl_s=60, max_bytes=len(big))
    assert await second.get("r", key_of(chat(seed=2))) == big
    # Nothing larger than a NATS message is attempted: too large, not an error.
    assert not await first.put("r", key_of(chat(seed=3)), b"z" * (2 << 20), ttl_s=60, max_bytes=4 << 20)
    assert counted(first, "stores", "r", "too_large") == 3
    assert counted(first, "stores", "r", "stored") == 2
    assert counted(first, "stores", "r", "error") == 0


async def test_a_full_cache_drops_its_oldest_entries(connections: Connect) -> None:
    nc = await connections()
    bucket = f"test_responses_{uuid.uuid4().hex[:10]}"
    cache = ResponseCache(nc, bucket=bucket, max_total_bytes=64 * 1024, registry=CollectorRegistry())
    await cache.start()
    try:
        keys = [key_of(chat(seed=i)) for i in range(100)]
        for i, key in enumerate(keys):
            assert await cache.put("r", key, bytes([i]) * 2048, ttl_s=600, max_bytes=None)
        assert await cache.get("r", keys[0]) is None
        assert await cache.get("r", keys[-1]) == bytes([99]) * 2048
        kept = [i for i, key in enumerate(keys) if await cache.get("r", key) is not None]
        assert len(kept) >= 20 and kept == list(range(100 - len(kept), 100))  # the newest ones
        info = await nc.jetstream().stream_info(f"KV_{bucket}")
        assert info.state.bytes <= 64 * 1024
        assert info.config.max_age == MAX_TTL_S
    finally:
        await delete_bucket(nc, bucket)
        await cache.close()


async def test_a_cache_that_is_down_is_a_miss_not_a_failure(nats_factory: Callable[[], EmbeddedNats]) -> None:
    server = nats_factory()
    nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    cache = ResponseCache(nc, registry=CollectorRegistry())
    await cache.start()
    try:
        key = key_of(chat())
        assert await cache.put("r", key, b"kept", ttl_s=600, max_bytes=None)
        server.stop()
        await wait_until(lambda: not nc.is_connected)
        assert await cache.get("r", key) is None
        assert not await cache.put("r", key_of(chat(seed=1)), b"lost", ttl_s=600, max_bytes=None)
        assert counted(cache, "lookups", "r", "miss") == 1
        assert counted(cache, "stores", "r", "error") == 1

        server.start()  # same store: the entry is still there once NATS is back

        async def served() -> bool:
            return await cache.get("r", key) == b"kept"

        await wait_until(served)
    finally:
        await cache.close()
        await nc.close()


async def test_a_lost_bucket_is_created_again(two_routers: Routers, connections: Connect) -> None:
    first, second, _ = two_routers
    key = key_of(chat())
    assert await first.put("r", key, b"before", ttl_s=600, max_bytes=None)
    await delete_bucket(await connections(), first.bucket)  # as a server restarted without its store

    async def stored_again() -> bool:
        return await first.put("r", key, b"again", ttl_s=600, max_bytes=None)

    await wait_until(stored_again)
    assert await second.get("r", key) == b"again"


async def test_a_cache_started_while_nats_is_away_opens_once_it_is_back(
    nats_factory: Callable[[], EmbeddedNats]
) -> None:
    server = nats_factory()
    nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    cache = ResponseCache(nc, registry=CollectorRegistry())
    try:
        server.stop()
        await wait_until(lambda: not nc.is_connected)
        await cache.start()
        key = key_of(chat())
        assert await cache.get("r", key) is None
        server.start()

        async def stored() -> bool:
            return await cache.put("r", key, b"late", ttl_s=600, max_bytes=None)

        await wait_until(stored)
        assert await cache.get("r", key) == b"late"
    finally:
        await cache.close()
        await nc.close()
