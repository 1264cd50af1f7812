"""The pool's pictures of workers: ordered by `seq` within a process, newest process first;
requests go where slots are free; workers learnt from heartbeats are forgotten once long down."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from roundhouse.v1 import worker_pb2
from services.common.workerpool import WorkerPool

ASSET = "m"


def picture(worker_id: str = "w1", *, seq: int, started_s: int = 1000, address: str = "127.0.0.1:9",
            models: tuple[worker_pb2.LoadedModel, ...] = (), draining: bool = False) -> worker_pb2.WorkerInfo:
    info = worker_pb2.WorkerInfo(worker_id=worker_id, address=address, seq=seq, draining=draining,
                                 models=list(models))
    info.started_at.FromSeconds(started_s)
    return info


def held(asset_id: str = ASSET, *, slots: int = 2, in_flight: int = 0, waiting: int = 0) -> worker_pb2.LoadedModel:
    return worker_pb2.LoadedModel(asset_id=asset_id, max_concurrency=slots, in_flight=in_flight, waiting=waiting)


@pytest.fixture
async def pool() -> AsyncIterator[WorkerPool]:
    workers = WorkerPool(["127.0.0.1:9"], forget_after_s=0)
    yield workers
    await workers.close()


async def test_an_older_heartbeat_never_replaces_a_newer_picture(pool: WorkerPool) -> None:
    worker = pool.observe(picture(seq=5, models=(held(),)))
    pool.observe(picture(seq=4))
    assert worker.holds(ASSET) and worker.info is not None and worker.info.seq == 5
    pool.observe(picture(seq=6))
    assert not worker.holds(ASSET)


async def test_a_load_noted_locally_survives_the_heartbeat_taken_before_it(pool: WorkerPool) -> None:
    worker = pool.observe(picture(seq=7))
    assert pool.note_loaded(worker, held())
    pool.observe(picture(seq=7))  # the same picture, delivered late: it predates the load
    assert worker.holds(ASSET)
    pool.observe(picture(seq=8, models=(held(), held("other"))))
    assert worker.holds(ASSET) and worker.holds("other")


async def test_a_restarted_process_is_told_apart_by_its_start(pool: WorkerPool) -> None:
    worker = pool.observe(picture(seq=50, started_s=1000, models=(held(),)))
    pool.observe(picture(seq=1, started_s=2000))
    assert not worker.holds(ASSET)
    pool.observe(picture(seq=51, started_s=1000, models=(held(),)))  # the old process, late
    assert not worker.holds(ASSET)


async def test_a_stale_heartbeat_does_not_bring_a_dead_worker_back(pool: WorkerPool) -> None:
    worker = pool.observe(picture(seq=3))
    pool.mark_down(worker, cancel_calls=True)
    pool.observe(picture(seq=2))
    assert worker.down and not worker.healthy
    pool.observe(picture(seq=4))
    assert not worker.down and worker.healthy


async def test_requests_go_where_slots_are_free_counting_what_was_sent_since(pool: WorkerPool) -> None:
    busy = pool.observe(picture("busy", seq=1, address="127.0.0.1:10", models=(held(in_flight=2),)))
    free = pool.observe(picture("free", seq=1, address="127.0.0.1:11", models=(held(in_flight=1),)))
    assert pool.pick(ASSET) is free
    free.in_flight[ASSET] += 1  # this router sent one there since the picture
    assert free.free_slots(ASSET) == 0
    busy.in_flight[ASSET] += 1
    assert busy.free_slots(ASSET) == -1
    assert pool.pick(ASSET) is free  # none free: the least loaded
    pool.observe(picture("busy", seq=2, address="127.0.0.1:10", models=(held(in_flight=0),)))
    assert busy.free_slots(ASSET) == 2
    assert pool.pick(ASSET) is busy
    assert pool.pick(ASSET, exclude={busy.address}) is free
    assert pool.capacity(ASSET, default=1) == 4


async def test_a_draining_worker_gets_no_new_requests(pool: WorkerPool) -> None:
    worker = pool.observe(picture(seq=1, models=(held(),)))
    assert pool.pick(ASSET) is worker
    pool.note_draining(worker)
    assert pool.pick(ASSET) is None
    assert pool.capacity(ASSET, default=3) == 3
    pool.observe(picture(seq=2, models=(held(),), draining=True))
    assert pool.pick(ASSET) is None


async def test_a_discovered_worker_long_down_is_forgotten_a_configured_one_kept(pool: WorkerPool) -> None:
    configured = pool.observe(picture("configured", seq=1, address="127.0.0.1:9"))
    discovered = pool.observe(picture("discovered", seq=1, address="127.0.0.1:12"))
    busy = pool.observe(picture("busy", seq=1, address="127.0.0.1:13"))
    for worker in (configured, discovered, busy):
        pool.mark_down(worker, cancel_calls=False)
    # A call still running on a worker that is down (its drain lets it finish) keeps it known.
    call = busy.control.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest(), timeout=30, wait_for_ready=True)
    busy.calls.add(call)
    try:
        await pool.forget_gone()
        assert pool.find(worker_id="discovered") is None
        assert discovered.channel.get_state() == grpc.ChannelConnectivity.SHUTDOWN
        assert pool.find(worker_id="configured") is configured
        assert pool.find(worker_id="busy") is busy
    finally:
        call.cancel()
        busy.calls.discard(call)
    await pool.forget_gone()
    assert [w.worker_id for w in pool.workers] == ["configured"]
    back = pool.observe(picture("discovered", seq=2, address="127.0.0.1:12"))
    assert back is not discovered and back.healthy
