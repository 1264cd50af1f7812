"""Per-asset admission at a router: slots sized to the holders' capacity, a bounded FIFO queue,
one queue budget shared with the worker, the request's deadline."""

from __future__ import annotations

import asyncio

import pytest
from polling import wait_until

from services.common.assetspec import Policy
from services.common.errors import DeadlineExceeded, Overloaded
from services.common.grpc_interceptors import QUEUE_TIMEOUT_KEY
from services.router.admission import Admission
from services.router.deadlines import Deadline


async def hold(
    gate, entered: asyncio.Event, release: asyncio.Event, log: list[str], name: str
) -> None:
    async with gate.slot():
        log.append(name)
        entered.set()
        await release.wait()


async def test_never_more_than_max_concurrency_and_fifo_handover() -> None:
    gate = Admission().gate("m", Policy(max_concurrency=2, max_queue=5, queue_timeout_s=5))
    release = asyncio.Event()
    log: list[str] = []
    events = [asyncio.Event() for _ in range(4)]
    tasks = [asyncio.create_task(hold(gate, events[i], release, log, f"r{i}")) for i in range(4)]
    await asyncio.wait_for(asyncio.gather(events[0].wait(), events[1].wait()), 5)
    await wait_until(lambda: gate.stats.waiting == 2, 5)
    assert (gate.stats.in_flight, gate.stats.waiting) == (2, 2)
    assert log == ["r0", "r1"]
    release.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert log == ["r0", "r1", "r2", "r3"]
    assert (gate.stats.in_flight, gate.stats.waiting) == (0, 0)


async def test_full_queue_is_refused_at_once_with_retry_after() -> None:
    gate = Admission().gate("m", Policy(max_concurrency=1, max_queue=0, queue_timeout_s=5))
    async with gate.slot():
        with pytest.raises(Overloaded) as info:
            async with gate.slot():
                pass
    assert info.value.retry_after_s >= 1
    assert "at capacity" in info.value.message


async def test_queue_timeout_refuses_and_frees_the_place() -> None:
    gate = Admission().gate("m", Policy(max_concurrency=1, max_queue=1, queue_timeout_s=0.05))
    async with gate.slot():
        with pytest.raises(Overloaded, match="stayed at capacity"):
            async with gate.slot():
                pass
        assert gate.stats.waiting == 0
    async with gate.slot():
        assert gate.stats.in_flight == 1


async def test_cancelled_waiter_gives_up_its_place() -> None:
    gate = Admission().gate("m", Policy(max_concurrency=1, max_queue=2, queue_timeout_s=30))
    async with gate.slot():
        waiter = asyncio.create_task(gate.slot().__aenter__())
        await wait_until(lambda: gate.stats.waiting == 1, 5)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert gate.stats.waiting == 0
    assert gate.stats.in_flight == 0


async def test_a_larger_capacity_lets_waiters_through_in_order() -> None:
    gate = Admission().gate("m", Policy(max_concurrency=1, max_queue=5, queue_timeout_s=30))
    release = asyncio.Event()
    log: list[str] = []
    events = [asyncio.Event() for _ in range(3)]
    tasks = [asyncio.create_task(hold(gate, events[i], release, log, f"r{i}")) for i in range(3)]
    await events[0].wait()
    await wait_until(lambda: gate.stats.waiting == 2, 5)
    gate.resize(3)  # a second holder reported its slots
    await asyncio.wait_for(asyncio.gather(events[1].wait(), events[2].wait()), 5)
    assert log == ["r0", "r1", "r2"]
    assert (gate.stats.in_flight, gate.stats.waiting) == (3, 0)
    release.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert (gate.stats.in_flight, gate.stats.waiting) == (0, 0)


async def test_the_wait_here_is_taken_from_the_budget_the_worker_gets() -> None:
    gate = Admission().gate("m", Policy(max_concurrency=1, max_queue=1, queue_timeout_s=30))
    loop = asyncio.get_running_loop()
    seen: list[tuple[float, float]] = []

    async def queued() -> None:
        queued_at = loop.time()
        async with gate.slot() as budget:
            seen.append((loop.time() - queued_at, budget.left()))

    async with gate.slot() as first:
        assert 29 < float(dict(first.metadata())[QUEUE_TIMEOUT_KEY]) <= 30
        second = asyncio.create_task(queued())
        await wait_until(lambda: gate.stats.waiting == 1, 5)
        await asyncio.sleep(0.2)  # time spent in the queue, not a synchronisation
    await asyncio.wait_for(second, 5)
    waited, left = seen[0]
    assert waited >= 0.2
    assert left <= 30 - waited + 0.01


async def test_a_deadline_shorter_than_the_queue_timeout_ends_the_wait_as_a_timeout() -> None:
    gate = Admission().gate("m", Policy(max_concurrency=1, max_queue=1, queue_timeout_s=30))
    async with gate.slot():
        with pytest.raises(DeadlineExceeded, match="queued for a slot"):
            async with gate.slot(Deadline(0.05)):
                pass
        assert gate.stats.waiting == 0
    assert gate.stats.in_flight == 0
