"""Admission at the worker over real gRPC: per-model slots and queue, the router's queue budget,
drain, and the order of the worker's pictures.

A slot is held from the test with `ModelHost.use`, the same lease a request takes, so a queue
forms exactly when the test says and not when a generation happens to be slow.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, suppress
from pathlib import Path

import grpc
import pytest
from polling import wait_until
from stack_harness import TINY_CHAT, TINY_EMBED, RunningWorker, asset_message, running_worker, tiny_spec

from roundhouse.v1 import inference_pb2, worker_pb2
from services.common.events import ALL_HEARTBEATS, EventBus
from services.common.modelstore.store import ModelStore

QUEUE_TIMEOUT = "x-roundhouse-queue-timeout-s"


@pytest.fixture
async def worker(store: ModelStore) -> AsyncIterator[RunningWorker]:
    async with running_worker(store) as running:
        yield running


async def load(worker: RunningWorker, sources: Path, asset_id: str = TINY_CHAT, **policy: float) -> None:
    spec = tiny_spec(sources, asset_id, policy={"queue_timeout_s": 60, **policy})
    await worker.control.LoadModel(worker_pb2.LoadModelRequest(asset=asset_message(spec)), timeout=60)


async def figures(worker: RunningWorker, asset_id: str = TINY_CHAT) -> tuple[int, int, int]:
    """(in flight, waiting, max concurrency) of one held model, as `GetWorkerInfo` reports them."""
    state = await worker.control.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest(), timeout=10)
    [model] = [m for m in state.models if m.asset_id == asset_id]
    return model.in_flight, model.waiting, model.max_concurrency


async def reaches(worker: RunningWorker, in_flight: int, waiting: int, asset_id: str = TINY_CHAT) -> None:
    async def shown() -> bool:
        return (await figures(worker, asset_id))[:2] == (in_flight, waiting)

    await wait_until(shown)


def chat(max_tokens: int = 8) -> inference_pb2.ChatRequest:
    return inference_pb2.ChatRequest(
        model=TINY_CHAT, max_tokens=max_tokens, temperature=0,
        messages=[inference_pb2.ChatMessage(role="user", content="hello w1 w2")],
    )


async def finish(call: grpc.aio.UnaryStreamCall) -> inference_pb2.ChatChunk:
    """Read a stream to its end; its last chunk."""
    last = None
    while (chunk := await call.read()) is not grpc.aio.EOF:
        last = chunk
    assert isinstance(last, inference_pb2.ChatChunk)
    return last


async def hold(stack: AsyncExitStack, worker: RunningWorker, asset_id: str = TINY_CHAT) -> AsyncExitStack:
    """Take one slot of the model until the returned stack closes."""
    lease = AsyncExitStack()
    await lease.enter_async_context(worker.server.host.use(asset_id))
    stack.push_async_callback(lease.aclose)
    return lease


async def refused(call: grpc.aio.UnaryStreamCall) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await finish(call)
    return caught.value


def trailing(error: grpc.aio.AioRpcError) -> dict[str, str]:
    return {str(key): str(value) for key, value in error.trailing_metadata() or ()}


async def test_two_slots_serve_five_streams_in_arrival_order(worker: RunningWorker, sources: Path) -> None:
    await load(worker, sources, max_concurrency=2, max_queue=8)
    async with AsyncExitStack() as stack:
        first, second = await hold(stack, worker), await hold(stack, worker)
        calls = []
        for n in range(5):  # one at a time, so the queue's order is the calls' order
            calls.append(worker.inference.Chat(chat(max_tokens=150), timeout=60))
            await reaches(worker, in_flight=2, waiting=n + 1)
        assert (await figures(worker))[2] == 2
        await first.aclose()
        head = await calls[0].read()
        assert head.finish_reason == inference_pb2.FINISH_REASON_UNSPECIFIED
        await reaches(worker, in_flight=2, waiting=4)  # the freed slot went to the longest waiter

        seen: list[tuple[int, int, int]] = []

        async def sample() -> None:
            while True:
                seen.append(await figures(worker))
                await asyncio.sleep(0.01)  # pacing only: the sample is what counts

        sampler = asyncio.create_task(sample())
        await second.aclose()
        lasts = await asyncio.gather(*(finish(call) for call in calls))
        sampler.cancel()
        with suppress(asyncio.CancelledError):
            await sampler
    assert [last.finish_reason for last in lasts] == [inference_pb2.FINISH_REASON_LENGTH] * 5
    assert all(last.usage.completion_tokens == 150 for last in lasts)
    assert seen and max(in_flight for in_flight, _, _ in seen) <= 2
    assert await figures(worker) == (0, 0, 2)


async def test_a_full_queue_is_refused_at_once(worker: RunningWorker, sources: Path) -> None:
    await load(worker, sources, max_concurrency=1, max_queue=2)
    async with AsyncExitStack() as stack:
        await hold(stack, worker)
        queued = [worker.inference.Chat(chat(), timeout=60) for _ in range(2)]
        await reaches(worker, in_flight=1, waiting=2)
        error = await refused(worker.inference.Chat(chat(), timeout=60))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "at capacity: 1 running and its queue is full (2 waiting)" in str(error.details())
        assert float(trailing(error)["retry-after"]) > 0
        assert await figures(worker) == (1, 2, 1)
    lasts = await asyncio.gather(*(finish(call) for call in queued))
    assert {last.finish_reason for last in lasts} == {inference_pb2.FINISH_REASON_LENGTH}


async def test_the_routers_queue_budget_bounds_the_wait(worker: RunningWorker, sources: Path) -> None:
    await load(worker, sources, max_concurrency=1, max_queue=4)
    await load(worker, sources, TINY_EMBED, max_concurrency=1, max_queue=4)
    async with AsyncExitStack() as stack:
        await hold(stack, worker)
        await hold(stack, worker, TINY_EMBED)
        now = await refused(worker.inference.Chat(chat(), timeout=60, metadata=((QUEUE_TIMEOUT, "0"),)))
        assert now.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "no free slot (1 of 1 running) and the request may not wait" in str(now.details())
        with pytest.raises(grpc.aio.AioRpcError) as embed:
            await worker.inference.Embed(
                inference_pb2.EmbedRequest(model=TINY_EMBED, inputs=[inference_pb2.EmbedInput(text="hello")]),
                timeout=60, metadata=((QUEUE_TIMEOUT, "0"),))
        assert embed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The policy would wait 60 s and the call allows 60 s: the budget alone ends it.
        waited = await refused(worker.inference.Chat(chat(), timeout=60, metadata=((QUEUE_TIMEOUT, "0.2"),)))
        assert waited.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "stayed at capacity for 0.2s" in str(waited.details())
        wrong = await refused(worker.inference.Chat(chat(), timeout=60, metadata=((QUEUE_TIMEOUT, "soon"),)))
        assert wrong.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert str(wrong.details()).startswith(f"{QUEUE_TIMEOUT}: ") and "'soon'" in str(wrong.details())
        assert await figures(worker) == (1, 0, 1)
    last = await finish(worker.inference.Chat(chat(), timeout=60, metadata=((QUEUE_TIMEOUT, "0"),)))
    assert last.finish_reason == inference_pb2.FINISH_REASON_LENGTH


async def test_a_waiter_that_gives_up_leaves_the_queue(worker: RunningWorker, sources: Path) -> None:
    await load(worker, sources, max_concurrency=1, max_queue=1)
    async with AsyncExitStack() as stack:
        await hold(stack, worker)
        gone = worker.inference.Chat(chat(), timeout=60)
        await reaches(worker, in_flight=1, waiting=1)
        gone.cancel()
        await reaches(worker, in_flight=1, waiting=0)
        expired = await refused(worker.inference.Chat(chat(), timeout=0.3))  # the call's deadline
        assert expired.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)
        await reaches(worker, in_flight=1, waiting=0)
        waiter = worker.inference.Chat(chat(), timeout=60)  # the queue has room again
        await reaches(worker, in_flight=1, waiting=1)
    assert (await finish(waiter)).finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert await figures(worker) == (0, 0, 1)


async def test_drain_finishes_what_runs_and_refuses_the_rest(worker: RunningWorker, sources: Path) -> None:
    await load(worker, sources, max_concurrency=3, max_queue=2)
    host = worker.server.host
    async with AsyncExitStack() as stack:
        lease = await hold(stack, worker)
        running = [worker.inference.Chat(chat(max_tokens=400), timeout=60) for _ in range(2)]
        for call in running:
            await call.read()
        queued = worker.inference.Chat(chat(), timeout=60)
        await reaches(worker, in_flight=3, waiting=1)

        drain = asyncio.create_task(host.drain(timeout_s=60))
        for error in (await refused(queued), await refused(worker.inference.Chat(chat(), timeout=60))):
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert trailing(error)["roundhouse-error"] == "ShuttingDown" and "shutting down" in str(error.details())
        state = await worker.control.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest(), timeout=10)
        assert state.draining
        with pytest.raises(grpc.aio.AioRpcError) as load_refused:
            await load(worker, sources, TINY_EMBED)
        assert load_refused.value.code() == grpc.StatusCode.UNAVAILABLE

        lasts = await asyncio.gather(*(finish(call) for call in running))
        assert [last.finish_reason for last in lasts] == [inference_pb2.FINISH_REASON_LENGTH] * 2
        await reaches(worker, in_flight=1, waiting=0)
        assert not drain.done(), "one request (the test's lease) still runs"
        await lease.aclose()
        await asyncio.wait_for(drain, 10)


async def test_drain_gives_up_waiting_after_its_timeout(worker: RunningWorker, sources: Path) -> None:
    await load(worker, sources, max_concurrency=1)
    async with AsyncExitStack() as stack:
        await hold(stack, worker)
        await asyncio.wait_for(worker.server.host.drain(timeout_s=0.2), 10)
        assert (await figures(worker))[0] == 1, "left running for the caller to cut"


async def test_pictures_are_ordered_across_replies_and_heartbeats(store: ModelStore, nats_url: str) -> None:
    bus = await EventBus.connect(nats_url, name="test-worker-pictures")
    beats: asyncio.Queue[worker_pb2.WorkerInfo] = asyncio.Queue()

    async def on_beat(msg) -> None:  # type: ignore[no-untyped-def]
        beats.put_nowait(worker_pb2.WorkerInfo.FromString(msg.data))

    try:
        await bus.nc.subscribe(ALL_HEARTBEATS, cb=on_beat)
        await bus.nc.flush()
        # Heartbeats a minute apart: the one that shows the drain is sent out of turn.
        async with running_worker(store, bus=bus, heartbeat_s=60) as running:
            control = running.control

            async def next_beat() -> worker_pb2.WorkerInfo:
                while True:  # other workers may share the NATS server
                    beat = await asyncio.wait_for(beats.get(), 10)
                    if beat.worker_id == running.server.host.worker_id:
                        return beat

            first = await next_beat()
            replies = [await control.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest(), timeout=10) for _ in range(3)]
            assert first.seq < replies[0].seq < replies[1].seq < replies[2].seq
            assert not first.draining and {r.started_at.ToNanoseconds() for r in replies} == {
                first.started_at.ToNanoseconds()}
            await running.server.host.drain(timeout_s=10)
            beat = await next_beat()
            while not beat.draining:
                beat = await next_beat()
            assert beat.seq > replies[2].seq
            after = await control.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest(), timeout=10)
            assert after.seq > beat.seq and after.draining
    finally:
        await bus.close()
