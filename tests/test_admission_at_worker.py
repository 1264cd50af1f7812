"""Admission at the source: the worker holds `max_concurrency` for every router together, and a
router sends each request where a slot is free, on to another holder when a worker refuses it
before its first chunk.

First the router's dispatch against real in-process workers; then two real `roundhouse router`
processes in front of one worker, as the official `openai` client sees them.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from polling import wait_until
from process_harness import router_fleet
from stack_harness import TINY_CHAT, RunningWorker, running_worker, tiny_documents, tiny_spec

from roundhouse.v1 import inference_pb2, jobs_pb2_grpc, worker_pb2
from services.common.asset_proto import AssetRecord, record_to_proto
from services.common.errors import ModelNotReady, Overloaded
from services.common.modelstore.store import ModelStore
from services.common.workerpool import WorkerPool
from services.router.admission import QueueBudget
from services.router.deadlines import Deadline
from services.router.dispatch import Dispatcher
from services.router.remote import RemoteUpstreams
from services.router.usage import UsageLedger
from services.router.waking import ModelWaker

ONE_SLOT = {"max_concurrency": 1, "max_queue": 1, "queue_timeout_s": 5}
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]


def one_slot_chat(sources: Path, asset_id: str = TINY_CHAT) -> AssetRecord:
    now = datetime.now(UTC)
    return AssetRecord(tiny_spec(sources, TINY_CHAT, asset_id=asset_id, policy=ONE_SLOT), 1, now, now)


def chat(max_tokens: int = 4) -> inference_pb2.ChatRequest:
    return inference_pb2.ChatRequest(model=TINY_CHAT, max_tokens=max_tokens, temperature=0,
                                     messages=[inference_pb2.ChatMessage(role="user", content="hello")])


@asynccontextmanager
async def serving_one_slot(store: ModelStore, sources: Path) -> AsyncIterator[RunningWorker]:
    """An in-process worker holding the tiny chat model with a single slot."""
    async with running_worker(store) as worker:
        await worker.control.LoadModel(worker_pb2.LoadModelRequest(
            asset=record_to_proto(one_slot_chat(sources))), timeout=60)
        yield worker


@asynccontextmanager
async def dispatching(*workers: RunningWorker) -> AsyncIterator[tuple[Dispatcher, WorkerPool]]:
    """A dispatcher over a pool of `workers` (in that order), pictures taken; no jobs service
    answers its wakes."""
    pool = WorkerPool([w.address for w in workers])
    nowhere = grpc.aio.insecure_channel("127.0.0.1:9")
    try:
        await pool.refresh()
        waker = ModelWaker(pool, jobs_pb2_grpc.JobsStub(nowhere), wait_s=1)
        yield Dispatcher(pool, waker, RemoteUpstreams(), stream_idle_timeout_s=30), pool
    finally:
        await pool.close()
        await nowhere.close(None)


async def run_chat(dispatcher: Dispatcher, record: AssetRecord, queue_s: float) -> list[inference_pb2.ChatChunk]:
    ticket = UsageLedger(None).open(None, record.spec.asset_id, "llm-runtime", uuid.uuid4().hex)
    request = chat()
    request.model = record.spec.asset_id
    stream = dispatcher.chat(record, request, deadline=Deadline(30), queue=QueueBudget(queue_s),
                             ticket=ticket, stream=True)
    return [chunk async for chunk in stream]


@asynccontextmanager
async def slot_taken(worker: RunningWorker) -> AsyncIterator[None]:
    """The worker's only slot held by a long generation for the block."""
    hog = worker.inference.Chat(chat(max_tokens=4000), timeout=60)
    try:
        await hog.read()
        yield
    finally:
        hog.cancel()

        async def freed() -> bool:
            info = await worker.control.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest(), timeout=5)
            return all(m.in_flight == 0 for m in info.models)

        await wait_until(freed, 10, interval=0.05)


@pytest.fixture(scope="module")
async def pair(store: ModelStore, sources: Path) -> AsyncIterator[tuple[RunningWorker, RunningWorker]]:
    async with serving_one_slot(store, sources) as first, serving_one_slot(store, sources) as second:
        yield first, second


async def test_a_refusal_for_want_of_a_slot_goes_on_to_a_holder_with_one(
    pair: tuple[RunningWorker, RunningWorker], sources: Path
) -> None:
    first, second = pair
    record = one_slot_chat(sources)
    async with dispatching(first, second) as (dispatcher, _):
        # The pictures say both are free; the first, busy now, refuses (no time to queue).
        async with slot_taken(first):
            chunks = await run_chat(dispatcher, record, queue_s=0)
            assert chunks[-1].usage.completion_tokens == 4
            async with slot_taken(second):
                with pytest.raises(Overloaded):
                    await run_chat(dispatcher, record, queue_s=0)


async def test_a_draining_worker_hands_the_request_to_another_holder(
    pair: tuple[RunningWorker, RunningWorker], store: ModelStore, sources: Path
) -> None:
    async with serving_one_slot(store, sources) as leaving:
        async with dispatching(leaving, pair[0]) as (dispatcher, pool):
            await leaving.server.host.drain(0)
            chunks = await run_chat(dispatcher, one_slot_chat(sources), queue_s=5)
            assert chunks[-1].usage.completion_tokens == 4
            handle = pool.find(address=leaving.address)
            assert handle is not None and not handle.serving


async def test_a_model_missing_twice_while_placed_is_not_ready_not_not_found(
    pair: tuple[RunningWorker, RunningWorker], sources: Path
) -> None:
    worker = pair[0]
    async with dispatching(worker) as (dispatcher, pool):
        # A heartbeat, newer than any answer the worker will give, says it holds a model it
        # does not: the request meets NotFound, the refresh cannot correct the picture, and the
        # second NotFound is the answer.
        claimed = worker_pb2.WorkerInfo()
        claimed.CopyFrom(await worker.control.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest(), timeout=5))
        claimed.seq += 1_000_000
        claimed.models.add(asset_id="moved-away", max_concurrency=1)
        pool.observe(claimed)
        with pytest.raises(ModelNotReady) as answer:
            await run_chat(dispatcher, one_slot_chat(sources, "moved-away"), queue_s=5)
    assert answer.value.retry_after_s >= 1
    assert "retry later" in answer.value.message


@dataclass
class Fleet:
    """Two router processes in front of one in-process worker."""

    urls: list[str]
    worker: RunningWorker


@pytest.fixture(scope="module")
async def fleet(own_db: str, nats_url: str, sources: Path,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Fleet]:
    root = tmp_path_factory.mktemp("admission-at-worker")
    documents = [tiny_documents(sources, max_concurrency=2, max_queue=8, queue_timeout_s=60)[0],
                 {**tiny_documents(sources)[0], "asset_id": "tiny-narrow", "aliases": [],
                  "policy": {"max_concurrency": 2, "max_queue": 1, "queue_timeout_s": 30}}]
    async with router_fleet(own_db, nats_url, sources, root, documents,
                            {"ROUNDHOUSE_AUTH": "disabled"}) as (urls, worker):
        fleet = Fleet(urls, worker)
        async with client(fleet.urls[0]) as api:  # wake both models once
            for model in (TINY_CHAT, "tiny-narrow"):
                await api.chat.completions.create(model=model, messages=HELLO, max_tokens=2)
        yield fleet


def client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@asynccontextmanager
async def watching(worker: RunningWorker, asset_id: str) -> AsyncIterator[list[tuple[int, int]]]:
    """(running, waiting) of the asset at the worker, polled while the block runs."""
    seen: list[tuple[int, int]] = []

    async def poll() -> None:
        while True:
            info = await worker.control.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest(), timeout=5)
            seen.extend((m.in_flight, m.waiting) for m in info.models if m.asset_id == asset_id)
            await asyncio.sleep(0.02)

    task = asyncio.create_task(poll())
    try:
        yield seen
    finally:
        task.cancel()


async def burst(fleet: Fleet, model: str, n: int) -> list[str | openai.APIStatusError]:
    """`n` concurrent slow streams, alternately on router A and router B: each one's finish
    reason, or the refusal it met."""
    apis = [client(url) for url in fleet.urls]

    async def one(i: int) -> str | openai.APIStatusError:
        try:
            stream = await apis[i % 2].chat.completions.create(
                model=model, messages=HELLO, max_tokens=400, temperature=0, stream=True)
            reasons = [c.choices[0].finish_reason async for c in stream if c.choices]
            assert reasons[-1] is not None, "the stream ended without a finish reason"
            return reasons[-1]
        except openai.APIStatusError as refused:
            return refused

    try:
        return await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        for api in apis:
            await api.close()


async def test_two_routers_together_never_exceed_the_workers_slots(fleet: Fleet) -> None:
    async with watching(fleet.worker, TINY_CHAT) as seen:
        outcomes = await burst(fleet, TINY_CHAT, 6)
    assert all(isinstance(o, str) for o in outcomes), outcomes
    assert max(running for running, _ in seen) == 2
    # Each router sends two at once: the worker queued the other router's pair.
    assert max(waiting for _, waiting in seen) >= 1


async def test_a_full_queue_at_the_worker_is_a_clear_429(fleet: Fleet) -> None:
    async with watching(fleet.worker, "tiny-narrow") as seen:
        outcomes = await burst(fleet, "tiny-narrow", 8)
    served = [o for o in outcomes if isinstance(o, str)]
    refused = [o for o in outcomes if not isinstance(o, str)]
    assert served
    # Each router alone admits two and queues one: more refusals than its own queue's came from
    # the worker, whose queue holds one.
    assert len(refused) >= 3
    for error in refused:
        assert isinstance(error, openai.RateLimitError)
        assert error.code == "model_overloaded"
        assert int(error.response.headers["retry-after"]) >= 1
    assert max(running for running, _ in seen) <= 2
    assert max(waiting for _, waiting in seen) <= 1
