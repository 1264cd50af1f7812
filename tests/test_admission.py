"""Per-asset admission: concurrency slots, a bounded FIFO queue, queue timeouts."""

from __future__ import annotations

import asyncio

import pytest

from services.common.assetspec import Policy
from services.common.errors import Overloaded
from services.router.admission import Admission


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

    async def queued() -> None:
        while gate.stats.waiting < 2:
            await asyncio.sleep(0)

    await asyncio.wait_for(queued(), 5)
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
        while gate.stats.waiting < 1:
            await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert gate.stats.waiting == 0
    assert gate.stats.in_flight == 0
