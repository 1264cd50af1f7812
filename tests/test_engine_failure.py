"""A chat model whose chat engine dies: its requests end cleanly, it serves nothing more, and
the worker drops it, reports it (`model.degraded`, `failed_models`, an immediate heartbeat)
and serves it again once it is loaded again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from polling import wait_until
from stack_harness import TINY_CHAT, RunningWorker, asset_message, not_installed, running_worker, tiny_spec
from tiny_models import spec_for

from roundhouse.v1 import events_pb2, inference_pb2, worker_pb2
from services.common.assetspec import AssetSpec
from services.common.errors import ModelNotReady
from services.common.events import ALL_HEARTBEATS, EventBus
from services.common.modelstore.store import ModelStore
from services.common.workerpool import WorkerPool
from services.worker.converters import worker_info
from services.worker.holdings import FailedModelInfo, WorkerState
from services.worker.models import ChatDelta, ChatParams, TransformersChatModel, load_model

HELLO = [{"role": "user", "content": "hello w1 w2"}]
CRASH = "crash injected by test_engine_failure"


@pytest.fixture
async def model(sources: Path) -> AsyncIterator[TransformersChatModel]:
    """A chat model of its own: the test kills its engine."""
    folder = sources / TINY_CHAT
    loaded = await asyncio.to_thread(load_model, spec_for("doomed", "llm-runtime", folder), folder)
    assert isinstance(loaded, TransformersChatModel)
    yield loaded
    await loaded.close()


async def first_delta(stream: AsyncIterator[ChatDelta]) -> ChatDelta:
    """The stream's first delta with text: generation is under way."""
    while not (delta := await anext(stream)).text:
        pass
    return delta


async def ending_error(stream: AsyncIterator[ChatDelta]) -> BaseException:
    """Read the stream to its end, which must be an error; return it."""
    with pytest.raises(Exception) as ended:  # noqa: PT011 - which error is what the caller checks
        async with asyncio.timeout(30):
            async for _ in stream:
                pass
    return ended.value


async def test_a_crashed_engine_ends_every_stream_and_serves_nothing_more(model: TransformersChatModel) -> None:
    failures: asyncio.Queue[str] = asyncio.Queue()
    model.on_failure(failures.put_nowait)
    batched = model.chat(ChatParams(messages=HELLO, max_tokens=1000))  # two fit the cache budget
    threaded = model.chat(ChatParams(messages=HELLO, max_tokens=1000, seed=7))  # seeded: same engine
    await first_delta(batched)
    await first_delta(threaded)

    model.crash_engine(CRASH)

    for stream in (batched, threaded):
        error = await ending_error(stream)
        assert isinstance(error, ModelNotReady), repr(error)
        assert "model 'doomed' failed on this worker" in error.message and CRASH in error.message
    assert CRASH in await asyncio.wait_for(failures.get(), 30)
    assert model.failure is not None and CRASH in model.failure
    await wait_until(lambda: model.active_streams == 0)  # the engine holds none of them
    for params in (ChatParams(messages=HELLO, max_tokens=4), ChatParams(messages=HELLO, max_tokens=4, seed=7)):
        with pytest.raises(ModelNotReady, match="failed on this worker"):
            model.chat(params)  # seeded or not, the engine refuses


async def test_an_idle_engine_that_dies_is_reported(model: TransformersChatModel) -> None:
    failures: asyncio.Queue[str] = asyncio.Queue()
    model.on_failure(failures.put_nowait)
    model.crash_engine(CRASH)
    assert CRASH in await asyncio.wait_for(failures.get(), 30)
    with pytest.raises(ModelNotReady):
        model.chat(ChatParams(messages=HELLO, max_tokens=4))


async def test_an_engine_that_died_unwatched_fails_the_next_request(model: TransformersChatModel) -> None:
    model.crash_engine(CRASH)
    # Nobody watches: the first request after the death finds it, and is not sent elsewhere.
    async with asyncio.timeout(30):
        while model.failure is None:
            try:
                deltas = [d async for d in model.chat(ChatParams(messages=HELLO, max_tokens=2))]
            except ModelNotReady as error:
                assert CRASH in error.message
                break
            assert deltas[-1].finish_reason  # served before the engine died
    assert model.failure is not None and CRASH in model.failure


def load_request(item: AssetSpec, revision: int = 1) -> worker_pb2.LoadModelRequest:
    return worker_pb2.LoadModelRequest(asset=asset_message(item, revision))


def chat(max_tokens: int) -> inference_pb2.ChatRequest:
    return inference_pb2.ChatRequest(model=TINY_CHAT, max_tokens=max_tokens, temperature=0,
                                     messages=[inference_pb2.ChatMessage(role="user", content="hello w1 w2")])


async def info(worker: RunningWorker) -> worker_pb2.WorkerInfo:
    return await worker.control.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest(), timeout=10)


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[EventBus]:
    bus = await EventBus.connect(nats_url, name="test-engine-failure")
    yield bus
    await bus.close()


async def test_a_crashed_engine_is_dropped_reported_and_loaded_again(
    store: ModelStore, sources: Path, bus: EventBus
) -> None:
    degraded: asyncio.Queue[events_pb2.Event] = asyncio.Queue()
    beats: asyncio.Queue[worker_pb2.WorkerInfo] = asyncio.Queue()

    async def on_degraded(event: events_pb2.Event) -> None:
        degraded.put_nowait(event)

    async def on_beat(msg) -> None:  # type: ignore[no-untyped-def]
        beats.put_nowait(worker_pb2.WorkerInfo.FromString(msg.data))

    await bus.subscribe(f"roundhouse.events.model.degraded.{TINY_CHAT}", on_degraded)
    await bus.nc.subscribe(ALL_HEARTBEATS, cb=on_beat)
    await bus.nc.flush()
    pool = WorkerPool([])
    # Heartbeats a minute apart: the failure must be reported by one out of turn.
    async with running_worker(store, bus=bus, heartbeat_s=60) as worker:
        await worker.control.LoadModel(load_request(tiny_spec(sources, TINY_CHAT)), timeout=60)
        before = await info(worker)
        assert [h.address for h in pool.holders(TINY_CHAT)] == []
        pool.observe(before)
        assert [h.address for h in pool.holders(TINY_CHAT)] == [worker.address]

        call = worker.inference.Chat(chat(max_tokens=3000), timeout=60)
        await call.read()
        async with worker.server.host.use(TINY_CHAT) as lease:
            lease.model.crash_engine(CRASH)  # type: ignore[attr-defined]
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            while await call.read() is not grpc.aio.EOF:
                pass
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"model '{TINY_CHAT}' failed on this worker" in cut.value.details()
        assert CRASH in cut.value.details()

        event = await asyncio.wait_for(degraded.get(), 30)
        assert (event.type, event.asset_id, event.source) == ("model.degraded", TINY_CHAT, "worker")
        assert event.worker_id == before.worker_id and CRASH in event.model.reason

        async with asyncio.timeout(30):
            while not (beat := await beats.get()).failed_models or beat.worker_id != before.worker_id:
                pass
        assert [m.asset_id for m in beat.models] == []
        pool.observe(beat)
        assert pool.holders(TINY_CHAT) == []

        state = await info(worker)
        assert [m.asset_id for m in state.models] == [] and state.memory_used_bytes == 0
        [failed] = state.failed_models
        assert (failed.asset_id, failed.revision, failed.stage) == (TINY_CHAT, 1, "engine")
        assert CRASH in failed.reason and failed.failed_at.ToDatetime(UTC) <= datetime.now(UTC)

        with pytest.raises(grpc.aio.AioRpcError) as missing:
            async for _ in worker.inference.Chat(chat(max_tokens=4), timeout=30):
                pass
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert CRASH in missing.value.details()

        await worker.control.LoadModel(load_request(tiny_spec(sources, TINY_CHAT)), timeout=60)
        chunks = [c async for c in worker.inference.Chat(chat(max_tokens=6), timeout=60)]
        assert chunks[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
        assert chunks[-1].usage.completion_tokens == 6 and "".join(c.delta for c in chunks).strip()
        again = await info(worker)
        assert [m.asset_id for m in again.models] == [TINY_CHAT] and not again.failed_models
    await pool.close()


async def test_a_failed_load_is_listed_as_failed(store: ModelStore, sources: Path) -> None:
    async with running_worker(store) as worker:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await worker.control.LoadModel(load_request(not_installed(sources), revision=3), timeout=60)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        state = await info(worker)
        assert not state.models
        [failed] = state.failed_models
        assert (failed.asset_id, failed.revision, failed.stage) == ("not-installed", 3, "load")
        assert "not installed" in failed.reason and failed.reason in refused.value.details()
        assert failed.failed_at.seconds > 0


def test_failed_models_travel_in_worker_info() -> None:
    at = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    state = WorkerState("w1", "127.0.0.1:1", 100, 0, at, (),
                        (FailedModelInfo("chat", 4, "its engine crashed", at, "engine"),))
    message = worker_info(state)
    assert [(f.asset_id, f.revision, f.reason, f.stage) for f in message.failed_models] == [
        ("chat", 4, "its engine crashed", "engine")
    ]
    assert message.failed_models[0].failed_at.ToDatetime(UTC) == at
