"""The dynamic batcher with real forward functions: when passes start, what they hold, and how
failures and unloads reach the callers.

A forward function that waits on a `threading.Event` holds a pass open, so what happens
while a pass runs is decided by the test, not by timing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import numpy as np
import pytest
from polling import wait_until

from services.worker.models.batching import BatchSettings, DynamicBatcher, plan_passes

HOLD_S = 10
LOOP_TURNS = 5


class HeldForward:
    """A forward pass that records its batch, then waits for `release` (each row: the
    sequence's first id and its length). It raises `failure` while that is set."""

    def __init__(self) -> None:
        self.batches: list[list[list[int]]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.failure: Exception | None = None

    def __call__(self, batch: list[list[int]]) -> np.ndarray:
        self.batches.append(batch)
        self.started.set()
        self.release.wait(HOLD_S)
        if self.failure is not None:
            raise self.failure
        return np.array([[float(s[0]), float(len(s))] for s in batch])

    async def wait_started(self) -> None:
        """Until a pass has begun (on the batcher's thread)."""
        assert await asyncio.to_thread(self.started.wait, HOLD_S)


@pytest.fixture
async def held() -> AsyncIterator[tuple[HeldForward, DynamicBatcher]]:
    forward = HeldForward()
    batcher = DynamicBatcher(forward, BatchSettings(max_batch_items=8))
    try:
        yield forward, batcher
    finally:
        forward.release.set()
        await batcher.close()


async def taken_within_a_few_loop_turns(batcher: DynamicBatcher) -> bool:
    """Whether the batcher takes what is queued within a few turns of the event loop: no
    time passes for a timer to fire, only ready callbacks run."""
    for _ in range(LOOP_TURNS):
        await asyncio.sleep(0)
    return batcher.queued == 0


async def test_a_lone_call_starts_a_pass_without_waiting_for_company(
    held: tuple[HeldForward, DynamicBatcher],
) -> None:
    forward, batcher = held
    alone = asyncio.create_task(batcher.run([[7, 7, 7]]))
    assert await taken_within_a_few_loop_turns(batcher)
    await forward.wait_started()
    assert forward.batches == [[[7, 7, 7]]]
    forward.release.set()
    assert (await alone).tolist() == [[7.0, 3.0]]
    # Again with the batcher idle after a batch.
    again = asyncio.create_task(batcher.run([[8]]))
    assert await taken_within_a_few_loop_turns(batcher)
    assert (await again).tolist() == [[8.0, 1.0]]
    assert forward.batches[1:] == [[[8]]]


async def test_calls_made_during_a_pass_share_the_next_one(held: tuple[HeldForward, DynamicBatcher]) -> None:
    forward, batcher = held
    first = asyncio.create_task(batcher.run([[100]]))
    await forward.wait_started()
    later = [asyncio.create_task(batcher.run([[i] * (i + 1), [50 + i]])) for i in range(3)]
    await wait_until(lambda: batcher.queued == 3)
    assert len(forward.batches) == 1
    forward.release.set()
    results = await asyncio.gather(first, *later)
    assert len(forward.batches) == 2
    assert sorted(s[0] for s in forward.batches[1]) == [0, 1, 2, 50, 51, 52]
    assert results[0].tolist() == [[100.0, 1.0]]
    for i, rows in enumerate(results[1:]):
        assert rows.tolist() == [[float(i), float(i + 1)], [50.0 + i, 1.0]]


async def test_a_batch_takes_what_the_bounds_allow_and_leaves_the_rest_queued(
    held: tuple[HeldForward, DynamicBatcher],
) -> None:
    forward, batcher = held
    first = asyncio.create_task(batcher.run([[100]]))
    await forward.wait_started()
    later = [asyncio.create_task(batcher.run([[i]] * 3)) for i in range(5)]
    await wait_until(lambda: batcher.queued == 5)
    forward.release.set()
    await asyncio.gather(first, *later)
    # At most 8 sequences a batch: a third call of 3 waits for the batch after.
    assert [sorted(s[0] for s in b) for b in forward.batches[1:]] == [
        [0, 0, 0, 1, 1, 1], [2, 2, 2, 3, 3, 3], [4, 4, 4],
    ]


async def test_a_failing_pass_fails_each_of_its_callers_and_the_next_one_runs(
    held: tuple[HeldForward, DynamicBatcher],
) -> None:
    forward, batcher = held
    forward.failure = ValueError("broken weights")
    first = asyncio.create_task(batcher.run([[1]]))
    await forward.wait_started()
    later = [asyncio.create_task(batcher.run([[i]])) for i in range(3)]
    await wait_until(lambda: batcher.queued == 3)
    forward.release.set()
    outcomes = await asyncio.gather(first, *later, return_exceptions=True)
    assert all(isinstance(o, ValueError) and str(o) == "broken weights" for o in outcomes)
    assert len(forward.batches) == 2
    forward.failure = None
    assert (await batcher.run([[9]])).tolist() == [[9.0, 1.0]]


async def test_unloading_fails_the_running_and_the_queued_callers(
    held: tuple[HeldForward, DynamicBatcher],
) -> None:
    forward, batcher = held
    running = asyncio.create_task(batcher.run([[1]]))
    await forward.wait_started()
    queued = [asyncio.create_task(batcher.run([[i]])) for i in range(3)]
    await wait_until(lambda: batcher.queued == 3)
    closing = asyncio.create_task(batcher.close())
    outcomes = await asyncio.gather(running, *queued, return_exceptions=True)
    assert all(isinstance(o, RuntimeError) and "unloaded" in str(o) for o in outcomes)
    assert not closing.done()  # it waits for the pass still on the thread
    forward.release.set()
    await closing
    assert len(forward.batches) == 1
    with pytest.raises(RuntimeError, match="unloaded"):
        await batcher.run([[1]])


async def test_a_cancelled_caller_does_not_break_the_batch(held: tuple[HeldForward, DynamicBatcher]) -> None:
    forward, batcher = held
    in_flight = asyncio.create_task(batcher.run([[100]]))
    await forward.wait_started()
    waiting = [asyncio.create_task(batcher.run([[i]])) for i in range(5)]
    await wait_until(lambda: batcher.queued == 5)
    in_flight.cancel()
    waiting[1].cancel()
    await wait_until(lambda: batcher.queued == 4)
    forward.release.set()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert isinstance(results[1], asyncio.CancelledError)
    assert [r.tolist() for r in results if isinstance(r, np.ndarray)] == [
        [[0.0, 1.0]], [[2.0, 1.0]], [[3.0, 1.0]], [[4.0, 1.0]],
    ]
    assert sorted(s[0] for s in forward.batches[1]) == [0, 2, 3, 4]
    assert (await batcher.run([[7]])).tolist() == [[7.0, 1.0]]


async def test_passes_run_one_at_a_time_on_one_thread() -> None:
    threads: set[str] = set()
    running = 0
    overlap = False
    lock = threading.Lock()

    def forward(batch: list[list[int]]) -> np.ndarray:
        nonlocal running, overlap
        with lock:
            running += 1
            overlap |= running > 1
            threads.add(threading.current_thread().name)
        rows = np.array([[float(sum(s)), float(len(s))] for s in batch])
        with lock:
            running -= 1
        return rows

    batcher = DynamicBatcher(forward, BatchSettings(max_batch_items=4))
    try:
        results = await asyncio.gather(*(batcher.run([[i, i], [1]]) for i in range(20)))
    finally:
        await batcher.close()
    for i, rows in enumerate(results):
        assert rows.tolist() == [[2.0 * i, 2.0], [1.0, 1.0]]
    assert len(threads) == 1 and not overlap


def test_passes_keep_similar_lengths_together_and_split_off_a_long_tail() -> None:
    settings = BatchSettings(pass_cost_tokens=8)
    # Twelve short sequences padded to 30 would cost far more than a second pass.
    assert plan_passes([30, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 30], settings) == [
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [0, 12],
    ]
    # Close lengths: the padding costs less than another pass.
    assert plan_passes([12, 10, 11, 12], settings) == [[1, 2, 0, 3]]


def test_passes_sort_by_length_and_respect_bounds() -> None:
    settings = BatchSettings(max_batch_tokens=12, max_batch_items=3)
    lengths = [5, 1, 3, 2, 4, 1]
    passes = plan_passes(lengths, settings)
    assert [i for p in passes for i in p] == [1, 5, 3, 2, 4, 0]
    for p in passes:
        assert len(p) <= 3
        assert max(lengths[i] for i in p) * len(p) <= 12 or len(p) == 1
