"""The worker service over real gRPC: loading, serving, accounting and unloading tiny models."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from polling import wait_until
from stack_harness import (
    TINY_CHAT,
    TINY_EMBED,
    RunningWorker,
    asset_message,
    not_installed,
    running_worker,
    tiny_spec,
)

from roundhouse.v1 import events_pb2, inference_pb2, worker_pb2
from services.common.assetspec import AssetSpec
from services.common.events import EventBus
from services.common.modelstore.store import ModelStore
from services.common.workerpool import WorkerPool
from services.worker.settings import WorkerSettings

MIB = 1024 * 1024


@pytest.fixture
async def worker(store: ModelStore) -> AsyncIterator[RunningWorker]:
    async with running_worker(store) as running:
        yield running


async def load(worker: RunningWorker, item: AssetSpec, revision: int = 1) -> worker_pb2.LoadedModel:
    reply = await worker.control.LoadModel(worker_pb2.LoadModelRequest(asset=asset_message(item, revision)), timeout=60)
    return reply.model


async def info(worker: RunningWorker) -> worker_pb2.WorkerInfo:
    return await worker.control.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest(), timeout=10)


async def in_flight(worker: RunningWorker, asset_id: str) -> int:
    return sum(m.in_flight for m in (await info(worker)).models if m.asset_id == asset_id)




async def test_a_pool_learns_a_placement_from_the_load_reply_as_the_worker_would_report_it(
    worker: RunningWorker, sources: Path
) -> None:
    pool = WorkerPool([worker.address])
    try:
        await pool.refresh()
        [handle] = pool.workers
        assert pool.holders(TINY_CHAT) == []
        for revision in (1, 2):  # a new revision replaces the old one: counted once
            assert pool.note_loaded(handle, await load(worker, tiny_spec(sources, TINY_CHAT), revision))
            assert pool.holders(TINY_CHAT) == [handle]
            reported = await info(worker)
            assert handle.info is not None
            assert [(m.asset_id, m.revision) for m in handle.info.models] == [(TINY_CHAT, revision)]
            assert handle.info.memory_used_bytes == reported.memory_used_bytes
    finally:
        await pool.close()


def chat(model: str = TINY_CHAT, max_tokens: int = 12) -> inference_pb2.ChatRequest:
    return inference_pb2.ChatRequest(
        model=model, max_tokens=max_tokens, temperature=0,
        messages=[inference_pb2.ChatMessage(role="user", content="hello w1 w2")],
    )


def embed(model: str, *texts: str, tokens: list[int] | None = None) -> inference_pb2.EmbedRequest:
    inputs = [inference_pb2.EmbedInput(text=t) for t in texts]
    if tokens is not None:
        inputs.append(inference_pb2.EmbedInput(tokens=inference_pb2.TokenIds(ids=tokens)))
    return inference_pb2.EmbedRequest(model=model, inputs=inputs)


async def test_loaded_model_shows_in_worker_info(worker: RunningWorker, sources: Path) -> None:
    loaded = await load(worker, tiny_spec(sources, TINY_CHAT))
    assert loaded.memory_bytes > 0 and loaded.load_seconds > 0
    assert loaded.capabilities.context_length == 4096 and loaded.capabilities.streaming
    state = await info(worker)
    assert state.worker_id.startswith("worker-") and state.address == worker.address
    assert state.memory_budget_bytes == 4096 * MIB
    assert state.memory_used_bytes == loaded.memory_bytes
    [held] = state.models
    assert (held.asset_id, held.revision, held.in_flight) == (TINY_CHAT, 1, 0)
    again = await load(worker, tiny_spec(sources, TINY_CHAT))
    assert again.loaded_at == loaded.loaded_at, "same revision: nothing reloaded"
    newer = await load(worker, tiny_spec(sources, TINY_CHAT), revision=2)
    assert newer.revision == 2 and newer.loaded_at != loaded.loaded_at
    assert [m.revision for m in (await info(worker)).models] == [2]


async def test_concurrent_loads_of_one_asset_share_one_load(worker: RunningWorker, sources: Path) -> None:
    replies = await asyncio.gather(*(load(worker, tiny_spec(sources, TINY_EMBED)) for _ in range(4)))
    assert len({r.loaded_at.ToNanoseconds() for r in replies}) == 1
    assert len((await info(worker)).models) == 1


async def test_chat_streams_chunks_then_finish_reason_and_usage(worker: RunningWorker, sources: Path) -> None:
    await load(worker, tiny_spec(sources, TINY_CHAT))
    chunks = [c async for c in worker.inference.Chat(chat(max_tokens=12), timeout=60)]
    assert len(chunks) >= 3
    assert all(c.finish_reason == inference_pb2.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    assert "".join(c.delta for c in chunks).strip()
    last = chunks[-1]
    assert last.finish_reason == inference_pb2.FINISH_REASON_LENGTH and last.asset_id == TINY_CHAT
    assert last.usage.completion_tokens == 12 and last.usage.prompt_tokens > 0
    assert last.usage.total_tokens == last.usage.prompt_tokens + 12
    assert await in_flight(worker, TINY_CHAT) == 0


async def test_embed_texts_and_token_ids(worker: RunningWorker, sources: Path) -> None:
    await load(worker, tiny_spec(sources, TINY_EMBED))
    reply = await worker.inference.Embed(embed(TINY_EMBED, "hello w1", "hi w2 w3", "hello w1", tokens=[7, 8, 9]))
    assert len(reply.embeddings) == 4 and reply.dimensions == 32 and reply.asset_id == TINY_EMBED
    assert all(len(e.values) == 32 for e in reply.embeddings)
    assert all(math.isclose(math.hypot(*e.values), 1.0, rel_tol=1e-4) for e in reply.embeddings)
    assert reply.embeddings[0].values == reply.embeddings[2].values
    assert reply.embeddings[0].values != reply.embeddings[1].values
    assert reply.usage.prompt_tokens > 0


async def test_wrong_interface_and_unknown_model(worker: RunningWorker, sources: Path) -> None:
    await load(worker, tiny_spec(sources, TINY_EMBED))
    with pytest.raises(grpc.aio.AioRpcError) as wrong:
        async for _ in worker.inference.Chat(chat(model=TINY_EMBED)):
            pass
    assert wrong.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "llm-runtime" in wrong.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        async for _ in worker.inference.Chat(chat(model=TINY_CHAT)):
            pass
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert f"model '{TINY_CHAT}' is not loaded on worker" in missing.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as unload:
        await worker.control.UnloadModel(worker_pb2.UnloadModelRequest(asset_id=TINY_CHAT))
    assert unload.value.code() == grpc.StatusCode.NOT_FOUND


async def test_model_not_installed_fails_alone(worker: RunningWorker, sources: Path) -> None:
    await load(worker, tiny_spec(sources, TINY_EMBED))
    stranger = not_installed(sources)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await load(worker, stranger)
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not installed" in failed.value.details()
    assert [m.asset_id for m in (await info(worker)).models] == [TINY_EMBED]
    assert len((await worker.inference.Embed(embed(TINY_EMBED, "hello"))).embeddings) == 1


async def test_client_cancel_stops_generation_and_frees_the_slot(worker: RunningWorker, sources: Path) -> None:
    await load(worker, tiny_spec(sources, TINY_CHAT))
    call = worker.inference.Chat(chat(max_tokens=3000), timeout=60)
    await call.read()
    assert await in_flight(worker, TINY_CHAT) == 1
    call.cancel()

    async def freed() -> bool:
        return await in_flight(worker, TINY_CHAT) == 0

    async def stopped() -> bool:
        async with worker.server.host.use(TINY_CHAT) as lease:
            return lease.model.active_streams == 0  # type: ignore[attr-defined, no-any-return]

    await wait_until(freed)
    await wait_until(stopped)


async def test_unload_with_requests_in_flight_needs_force(worker: RunningWorker, sources: Path) -> None:
    loaded = await load(worker, tiny_spec(sources, TINY_CHAT))
    call = worker.inference.Chat(chat(max_tokens=3000), timeout=60)
    await call.read()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await worker.control.UnloadModel(worker_pb2.UnloadModelRequest(asset_id=TINY_CHAT))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "in flight" in refused.value.details()
    forced = await worker.control.UnloadModel(worker_pb2.UnloadModelRequest(asset_id=TINY_CHAT, force=True))
    assert forced.freed_bytes == loaded.memory_bytes
    with pytest.raises(grpc.aio.AioRpcError) as cut:
        while await call.read() is not grpc.aio.EOF:
            pass
    assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
    state = await info(worker)
    assert not state.models and state.memory_used_bytes == 0


async def test_loads_beyond_the_memory_budget_are_refused(store: ModelStore, sources: Path) -> None:
    async with running_worker(store, memory_mb=1) as small:
        embedder = await load(small, tiny_spec(sources, TINY_EMBED))
        with pytest.raises(grpc.aio.AioRpcError) as measured:
            await load(small, tiny_spec(sources, TINY_CHAT))  # about 1.1 MiB measured
        assert measured.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "1.0 MiB budget" in measured.value.details()
        state = await info(small)
        assert [m.asset_id for m in state.models] == [TINY_EMBED]
        assert state.memory_used_bytes == embedder.memory_bytes
        with pytest.raises(grpc.aio.AioRpcError) as declared:
            await load(small, tiny_spec(sources, TINY_CHAT, resources={"memory_mb": 2048}))
        assert declared.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "needs 2048.0 MiB" in declared.value.details()


async def test_lifecycle_events_are_published(store: ModelStore, sources: Path, nats_url: str) -> None:
    bus = await EventBus.connect(nats_url, name="test-worker-events")
    seen: asyncio.Queue[events_pb2.Event] = asyncio.Queue()

    async def collect(event: events_pb2.Event) -> None:
        await seen.put(event)

    try:
        sub = await bus.subscribe("roundhouse.events.model.*.*", collect)
        await bus.nc.flush()
        async with running_worker(store, bus=bus) as running:
            loaded = await load(running, tiny_spec(sources, TINY_EMBED))
            with pytest.raises(grpc.aio.AioRpcError):
                await load(running, not_installed(sources))
            await running.control.UnloadModel(worker_pb2.UnloadModelRequest(
                asset_id=TINY_EMBED, reason="evict", evicted_for="newcomer"))
            events = [await asyncio.wait_for(seen.get(), 10) for _ in range(5)]
        await sub.unsubscribe()
    finally:
        await bus.close()
    by_type = {(e.type, e.asset_id): e for e in events}
    arrived = list(by_type)  # published in order, without the load waiting for them
    assert arrived.index(("model.loading", TINY_EMBED)) < arrived.index(("model.loaded", TINY_EMBED))
    assert arrived.index(("model.loaded", TINY_EMBED)) < arrived.index(("model.evicted", TINY_EMBED))
    assert {e.source for e in events} == {"worker"}
    assert {e.worker_id for e in events} == {(await_id := events[0].worker_id)} and await_id
    assert ("model.loading", TINY_EMBED) in by_type and ("model.loading", "not-installed") in by_type
    done = by_type[("model.loaded", TINY_EMBED)].model
    assert done.memory_bytes == loaded.memory_bytes and done.load_seconds > 0
    assert "not installed" in by_type[("model.load_failed", "not-installed")].model.reason
    gone = by_type[("model.evicted", TINY_EMBED)].model  # an unload for room is an eviction
    assert gone.reason == "evict" and gone.memory_bytes == loaded.memory_bytes
    assert gone.evicted_for == "newcomer" and gone.idle_seconds >= 0


def test_worker_identity_follows_the_bound_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUNDHOUSE_WORKER_MEMORY_MB", "512")
    settings = WorkerSettings(worker_address="0.0.0.0:0")
    assert settings.worker_memory_mb == 512
    assert settings.advertised(50123) == "127.0.0.1:50123"
    assert settings.identity(50123).endswith("-50123")
    named = WorkerSettings(worker_id="w1", worker_advertise_address="gpu-box:7000")
    assert (named.identity(1), named.advertised(1)) == ("w1", "gpu-box:7000")
