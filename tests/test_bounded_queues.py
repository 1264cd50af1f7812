"""Every queue of a worker's model layer has a bound, and going past it is a clear `Overloaded`.

The embedding batch queue refuses a call past `max_queued`; the chat engine refuses a request
past `max_waiting`, and ends a request whose consumer leaves `max_unread_tokens` unread (a
client reading slowly) instead of holding ever more tokens for it. Real forward passes: a held
one for the batcher, a tiny random-weight Llama for the engine.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest
import torch
from polling import wait_until
from tiny_models import build_tiny_llama
from transformers import AutoModelForCausalLM

from services.common.errors import Overloaded
from services.worker.models.batching import BatchSettings, DynamicBatcher
from services.worker.models.engine import BatchingSettings, ChatEngine
from services.worker.models.engine.outbox import BoundedTokenStream
from services.worker.models.generation import Sampling, TokenStream

GREEDY = Sampling(temperature=0)
HOLD_S = 30


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = build_tiny_llama(tmp_path_factory.mktemp("bounded") / "tiny")
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@asynccontextmanager
async def chat_engine(model: Any, **settings: int) -> AsyncIterator[ChatEngine]:
    """An engine with one row in its batch and the given bounds."""
    engine = ChatEngine(model, 4096, [], BatchingSettings(max_requests_per_batch=1, **settings),
                        name="tiny")
    try:
        yield engine
    finally:
        await engine.close()


async def read_all(stream: TokenStream) -> list[int]:
    return [token async for ids in stream for token in ids]


async def test_a_call_past_the_embedding_queue_bound_is_refused_at_once() -> None:
    started, release = threading.Event(), threading.Event()

    def held_forward(batch: list[list[int]]) -> np.ndarray:
        started.set()
        release.wait(HOLD_S)
        return np.array([[float(s[0])] for s in batch])

    batcher = DynamicBatcher(held_forward, BatchSettings(max_queued=2), name="embed-tiny")
    try:
        running = asyncio.create_task(batcher.run([[1]]))
        assert await asyncio.to_thread(started.wait, HOLD_S)  # its pass runs, and holds
        waiting = [asyncio.create_task(batcher.run([[n]])) for n in (2, 3)]
        await wait_until(lambda: batcher.queued == 2)

        with pytest.raises(Overloaded, match=r"embedding batch queue 'embed-tiny' is full \(2 calls"):
            await batcher.run([[4]])

        release.set()
        rows = await asyncio.gather(running, *waiting)
        assert [r.tolist() for r in rows] == [[[1.0]], [[2.0]], [[3.0]]]
        assert (await batcher.run([[5]])).tolist() == [[5.0]]  # room again
    finally:
        release.set()
        await batcher.close()


async def test_a_request_past_the_engine_queue_bound_is_refused_at_once(model: Any) -> None:
    async with chat_engine(model, max_waiting=1) as engine:
        running = engine.submit([5, 6, 7], GREEDY, 4000)
        await anext(running)  # it holds the batch's only row
        reader = asyncio.create_task(read_all(running))
        waiting = engine.submit([8, 9], GREEDY, 2)

        with pytest.raises(Overloaded, match=r"model 'tiny': the chat engine's queue is full \(1 requests"):
            engine.submit([10], GREEDY, 2)

        reader.cancel()
        running.cancel()
        assert len(await read_all(waiting)) == 2


async def test_a_request_whose_client_reads_too_slowly_is_ended_and_frees_its_row(model: Any) -> None:
    async with chat_engine(model, max_unread_tokens=8) as engine:
        slow = engine.submit([5, 6, 7], GREEDY, 4000)

        # Nobody reads: the engine ends the request instead of queueing its tokens without end.
        await wait_until(lambda: engine.active_streams == 0, timeout=60)
        read: list[int] = []
        with pytest.raises(Overloaded, match="read too slowly.*bound of 8 unread tokens"):
            async for ids in slow:
                read.extend(ids)
        assert 0 < len(read) < 4000

        # Its row is free: the next request runs.
        assert len(await read_all(engine.submit([8, 9], GREEDY, 3))) == 3


async def test_a_token_stream_holds_no_more_than_its_bound_then_ends() -> None:
    cancelled = asyncio.Event()
    stream = BoundedTokenStream(asyncio.get_running_loop(), cancelled.set, max_unread=8, name="tiny")
    stream.put([1, 2, 3, 4, 5])
    assert [*await anext(stream)] == [1, 2, 3, 4, 5]  # read: nothing left unread
    stream.put([6, 7, 8, 9, 10, 11, 12, 13])
    assert not cancelled.is_set()
    stream.put([14])  # nine unread: one past the bound
    assert cancelled.is_set()  # generation is told to stop
    stream.put([15, 16])  # whatever was still on its way is dropped

    assert await anext(stream) == [6, 7, 8, 9, 10, 11, 12, 13, 14]
    with pytest.raises(Overloaded, match="bound of 8 unread tokens"):
        await anext(stream)
