"""Worker presence on NATS and failover: a dead worker's clients fail fast, traffic moves on."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from polling import wait_until
from process_harness import worker_process
from stack_harness import TINY_CHAT, running_stack, running_worker, tiny_documents

from roundhouse.v1 import events_pb2, inference_pb2, worker_pb2, worker_pb2_grpc
from services.common.asset_proto import record_to_proto
from services.common.events import EventBus
from services.common.modelstore.store import ModelStore

REPO = Path(__file__).resolve().parents[1]


@asynccontextmanager
async def witness(nats_url: str, subject: str) -> AsyncIterator[asyncio.Queue[events_pb2.Event]]:
    """Every event on `subject` while inside, in order."""
    bus = await EventBus.connect(nats_url, name="test-witness", ensure_stream=False)
    seen: asyncio.Queue[events_pb2.Event] = asyncio.Queue()

    async def keep(event: events_pb2.Event) -> None:
        await seen.put(event)

    await bus.subscribe(subject, keep)
    try:
        yield seen
    finally:
        await bus.close()


async def next_event(seen: asyncio.Queue[events_pb2.Event], worker_id: str, timeout: float) -> events_pb2.Event:
    """The next event about `worker_id`, within `timeout` seconds."""
    async def find() -> events_pb2.Event:
        while True:
            event = await seen.get()
            if event.worker_id == worker_id:
                return event

    return await asyncio.wait_for(find(), timeout)


async def test_worker_announces_up_and_down(nats_url: str, sources: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store", [sources])
    async with witness(nats_url, "roundhouse.events.worker.>") as seen:
        bus = await EventBus.connect(nats_url, name="test-worker", ensure_stream=False)
        try:
            async with running_worker(store, memory_mb=512, bus=bus) as worker:
                worker_id = worker.server.host.worker_id
                up = await next_event(seen, worker_id, 10)
            down = await next_event(seen, worker_id, 10)
        finally:
            await bus.close()
    assert up.type == "worker.up" and up.source == "worker"
    assert up.worker.address == worker.address
    assert up.worker.memory_budget_bytes == 512 * 1024 * 1024
    assert down.type == "worker.down" and down.worker.reason == "shutdown"


async def test_killed_worker_fails_its_stream_fast_and_traffic_moves_on(
    db_dsn: str, nats_url: str, sources: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    async with running_stack(db_dsn, nats_url, sources, store) as stack, \
            witness(nats_url, "roundhouse.events.worker.down.>") as downs, \
            worker_process(nats_url, store, sources, tmp_path / "worker.log") as (process, doomed_id, address):
        await stack.apply(*tiny_documents(sources))
        pool = stack.router.gateway.workers
        await wait_until(lambda: pool.find(worker_id=doomed_id) is not None, 60)
        doomed = pool.find(worker_id=doomed_id)
        assert doomed is not None
        assert doomed.address == address

        record = await stack.router.gateway.catalog.resolve(TINY_CHAT, "llm-runtime")
        control = worker_pb2_grpc.WorkerControlStub(doomed.channel)
        await control.LoadModel(worker_pb2.LoadModelRequest(asset=record_to_proto(record)), timeout=60)
        await wait_until(lambda: pool.pick(TINY_CHAT) is doomed, 10)

        call = stack.inference.Chat(inference_pb2.ChatRequest(
            model=TINY_CHAT, max_tokens=4000, temperature=0,
            messages=[inference_pb2.ChatMessage(role="user", content="hello")]), timeout=120)
        await call.read()
        process.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await asyncio.wait_for(_drain(call), 10)
        assert time.monotonic() - killed_at < 10
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE

        down = await next_event(downs, doomed_id, 10)
        assert down.source == "router" and down.worker.reason == "heartbeat_missed"
        assert TINY_CHAT in down.worker.asset_ids

        chunks = [c async for c in stack.inference.Chat(inference_pb2.ChatRequest(
            model=TINY_CHAT, max_tokens=4, temperature=0,
            messages=[inference_pb2.ChatMessage(role="user", content="hello")]), timeout=60)]
        assert chunks[-1].usage.completion_tokens == 4
        survivor = await stack.workers[0].control.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest())
        assert TINY_CHAT in {m.asset_id for m in survivor.models}


async def _drain(call: grpc.aio.UnaryStreamCall) -> None:
    while await call.read() != grpc.aio.EOF:
        pass

