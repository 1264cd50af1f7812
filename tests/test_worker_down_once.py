"""One `worker.down` per death, however many routers see the worker fall silent.

Two `WorkerLiveness` instances, each with its own pool and NATS connection (as two routers
have), watch a real worker on a real nats-server. A worker's NATS connection is cut (it keeps
running, silent), then a new process of the same worker comes up and is cut off in turn; a
worker process is stopped (SIGSTOP), resumed, and stopped again. The stream holds exactly
one `worker.down` per death.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path

from polling import wait_until
from process_harness import worker_process

from services.common.events import STREAM_NAME, EventBus
from services.common.liveness import WorkerLiveness
from services.common.modelstore import ModelStore
from services.common.workerpool import WorkerPool
from services.worker.server import WorkerServer
from services.worker.settings import WorkerSettings

HEARTBEAT_S = 0.2
DEAD_AFTER_S = 3 * HEARTBEAT_S
PROCESS_DEAD_AFTER_S = 1.5
"""Three of the heartbeats of `worker_process` (every 0.5 s)."""


class Router:
    """What a router keeps of the workers: a pool fed by its own liveness watch."""

    def __init__(self, pool: WorkerPool, bus: EventBus, dead_after_s: float) -> None:
        self.pool = pool
        self.lost: list[str] = []
        self.liveness = WorkerLiveness(pool, bus, dead_after_s=dead_after_s,
                                       on_down=lambda w: self.lost.append(w.worker_id))

    def sees_up(self, worker_id: str) -> bool:
        worker = self.pool.find(worker_id=worker_id)
        return worker is not None and worker.healthy


@asynccontextmanager
async def routers(nats_url: str, count: int, *, dead_after_s: float = DEAD_AFTER_S
                  ) -> AsyncIterator[list[Router]]:
    async with AsyncExitStack() as stack:
        started = []
        for n in range(count):
            bus = await EventBus.connect(nats_url, name=f"router-{n}")
            stack.push_async_callback(bus.close)
            pool = WorkerPool([], refresh_s=60)
            stack.push_async_callback(pool.close)
            router = Router(pool, bus, dead_after_s)
            await router.liveness.start()
            stack.push_async_callback(router.liveness.stop)
            started.append(router)
        yield started


@asynccontextmanager
async def silenced_worker(nats_url: str, store: ModelStore, worker_id: str) -> AsyncIterator[EventBus]:
    """A worker (in this process) heartbeating on the bus it yields, until that is closed."""
    bus = await EventBus.connect(nats_url, name=worker_id)
    settings = WorkerSettings(worker_id=worker_id, worker_address="127.0.0.1:0",
                              worker_heartbeat_s=HEARTBEAT_S)
    server = WorkerServer(settings, store, bus)
    await server.start()
    try:
        yield bus
    finally:
        await server.stop(0.5)
        await bus.close()


def lost_by_all(watching: list[Router], worker_id: str, times: int) -> bool:
    """Whether every router has taken the worker out of its pool `times` times."""
    return all(r.lost.count(worker_id) == times for r in watching)


async def downs_in_stream(nats_url: str, worker_id: str) -> int:
    """`worker.down` events about `worker_id` that the event stream holds."""
    bus = await EventBus.connect(nats_url, name="down-counter", ensure_stream=False)
    subject = f"roundhouse.events.worker.down.{worker_id}"
    try:
        info = await bus.js.stream_info(STREAM_NAME, subjects_filter=subject)
    finally:
        await bus.close()
    return (info.state.subjects or {}).get(subject, 0)


async def test_a_worker_that_falls_silent_is_announced_down_once_per_death(
    nats_url: str, store: ModelStore
) -> None:
    worker_id = f"silent-{uuid.uuid4().hex[:8]}"
    async with routers(nats_url, 2) as watching:
        for death in (1, 2):
            async with silenced_worker(nats_url, store, worker_id) as worker_bus:
                await wait_until(lambda: all(r.sees_up(worker_id) for r in watching), 10)

                await worker_bus.nc.close()  # heartbeats stop; the process goes on, silent

                # Each router takes it out of its own pool, and is done announcing (or not).
                await wait_until(partial(lost_by_all, watching, worker_id, death), 10)
                assert not any(r.sees_up(worker_id) for r in watching)
                assert await downs_in_stream(nats_url, worker_id) == death


async def test_a_stopped_worker_that_resumes_and_stops_again_dies_anew(
    nats_url: str, sources: Path, tmp_path: Path
) -> None:
    async with routers(nats_url, 2, dead_after_s=PROCESS_DEAD_AFTER_S) as watching, \
            worker_process(nats_url, tmp_path / "store", sources, tmp_path / "worker.log") as (
                process, worker_id, _):
        try:
            await wait_until(lambda: all(r.sees_up(worker_id) for r in watching), 60)
            for death in (1, 2):
                process.send_signal(signal.SIGSTOP)
                await wait_until(partial(lost_by_all, watching, worker_id, death), 10)
                assert await downs_in_stream(nats_url, worker_id) == death
                process.send_signal(signal.SIGCONT)
                await wait_until(lambda: all(r.sees_up(worker_id) for r in watching), 10)
        finally:
            process.send_signal(signal.SIGCONT)


async def test_a_router_that_was_frozen_does_not_declare_a_live_worker_dead(
    nats_url: str, sources: Path, tmp_path: Path
) -> None:
    async with routers(nats_url, 1, dead_after_s=PROCESS_DEAD_AFTER_S) as (router,), \
            worker_process(nats_url, tmp_path / "store", sources, tmp_path / "worker.log") as (
                _, worker_id, _):
        await wait_until(lambda: router.sees_up(worker_id), 60)
        worker = router.pool.find(worker_id=worker_id)
        assert worker is not None and worker.info is not None

        # The router's own process stops (SIGSTOP, a long GC pause, a starved CPU) for longer
        # than the worker's deadline, while the worker goes on heartbeating.
        time.sleep(3 * PROCESS_DEAD_AFTER_S)
        frozen_at = worker.last_info.seq if worker.last_info else 0

        # Once it runs again, the heartbeats sent meanwhile are read, not missed.
        await wait_until(lambda: worker.last_info is not None and worker.last_info.seq > frozen_at + 2, 10)
        assert router.lost == []
        assert router.sees_up(worker_id)
        assert await downs_in_stream(nats_url, worker_id) == 0
