"""Cancelling operations: queued ones at once, running installs cooperatively, across instances.

A running install is held still by a FIFO in its source folder: the store blocks reading it
until the test writes to it, standing in for a slow download. The test cancels first and feeds
the FIFO after, so the install is certain to be cut off mid-way, with files already written.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from jobs_harness import (
    JobEvents,
    add_model,
    asset_status,
    copy_model,
    feed_until_done,
    jobs_settings,
    rpc_error,
    running_jobs,
    stalled_model,
    store_leftovers,
    submit,
    watch_until_done,
)
from registry_harness import RunningRegistry

from roundhouse.v1 import asset_pb2, jobs_pb2

CANCELLED = jobs_pb2.OPERATION_STATUS_CANCELLED


pytestmark = pytest.mark.usefixtures("no_leftover_operations")


async def test_cancel_stops_a_running_install_and_a_queued_one(
    registry: RunningRegistry, events: JobEvents, db_dsn: str, nats_url: str,
    tiny_llama: Path, tmp_path: Path,
) -> None:
    folder, fifo = stalled_model(tiny_llama, tmp_path)
    stalled = await add_model(registry, folder)
    waiting = await add_model(registry, copy_model(tiny_llama, tmp_path / "sources"))
    settings = jobs_settings(db_dsn, nats_url, tmp_path, registry.address, jobs_workers=1)
    async with running_jobs(settings) as jobs:
        running = await jobs.stub.SubmitOperation(submit(stalled))
        await events.wait_for(running.operation_id, "job.progress")
        queued = await jobs.stub.SubmitOperation(submit(waiting))
        assert queued.status == jobs_pb2.OPERATION_STATUS_QUEUED

        cancelled = await jobs.stub.CancelOperation(
            jobs_pb2.CancelOperationRequest(operation_id=queued.operation_id))
        assert (cancelled.status, cancelled.attempts) == (CANCELLED, 0)
        await events.wait_for(queued.operation_id, "job.cancelled")

        stopping = await jobs.stub.CancelOperation(
            jobs_pb2.CancelOperationRequest(operation_id=running.operation_id))
        assert stopping.status == jobs_pb2.OPERATION_STATUS_RUNNING
        assert stopping.message == "cancelling"
        await feed_until_done(fifo, jobs.stub, running.operation_id)
        final = (await watch_until_done(jobs.stub, running.operation_id))[-1]
        await events.wait_for(running.operation_id, "job.cancelled")

        again = await jobs.stub.CancelOperation(
            jobs_pb2.CancelOperationRequest(operation_id=running.operation_id))
        assert again.status == CANCELLED

    assert (final.status, final.attempts, final.error) == (CANCELLED, 1, "")
    assert store_leftovers(tmp_path / "store") == []
    status = await asset_status(registry, stalled)
    assert (status.state, status.message) == (asset_pb2.ASSET_STATE_REGISTERED, "install cancelled")
    assert "job.succeeded" not in events.types(running.operation_id)
    assert events.types(queued.operation_id) == ["job.queued", "job.cancelled"]


async def test_a_finished_operation_cannot_be_cancelled(
    registry: RunningRegistry, db_dsn: str, nats_url: str, tiny_llama: Path, tmp_path: Path
) -> None:
    asset_id = await add_model(registry, copy_model(tiny_llama, tmp_path / "sources"))
    async with running_jobs(jobs_settings(db_dsn, nats_url, tmp_path, registry.address)) as jobs:
        op = await jobs.stub.SubmitOperation(submit(asset_id))
        await watch_until_done(jobs.stub, op.operation_id)
        err = await rpc_error(jobs.stub.CancelOperation(
            jobs_pb2.CancelOperationRequest(operation_id=op.operation_id)))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already succeeded" in err.details()


async def test_another_instance_can_watch_and_cancel_an_operation(
    registry: RunningRegistry, events: JobEvents, db_dsn: str, nats_url: str,
    tiny_llama: Path, tmp_path: Path,
) -> None:
    folder, fifo = stalled_model(tiny_llama, tmp_path)
    asset_id = await add_model(registry, folder)
    runner_settings = jobs_settings(db_dsn, nats_url, tmp_path, registry.address,
                                    jobs_instance_id="runner", jobs_lease_s=1.5)
    async with running_jobs(runner_settings) as runner:
        op = await runner.stub.SubmitOperation(submit(asset_id))
        await events.wait_for(op.operation_id, "job.progress")
        other_settings = jobs_settings(db_dsn, nats_url, tmp_path, registry.address,
                                       jobs_instance_id="other")
        async with running_jobs(other_settings) as other:
            stopping = await other.stub.CancelOperation(
                jobs_pb2.CancelOperationRequest(operation_id=op.operation_id))
            assert stopping.status == jobs_pb2.OPERATION_STATUS_RUNNING
            states, feeding = [], None
            watch = other.stub.WatchOperation(
                jobs_pb2.GetOperationRequest(operation_id=op.operation_id), timeout=60)
            async for state in watch:
                states.append(state)
                # The runner's instance saw the flag: only now may the install go on.
                if state.message == "stopping (cancelled)":
                    feeding = asyncio.ensure_future(
                        feed_until_done(fifo, other.stub, op.operation_id))
            assert feeding is not None, [s.message for s in states]
            await feeding

    assert states[0].status == jobs_pb2.OPERATION_STATUS_RUNNING
    assert states[-1].status == CANCELLED
    assert store_leftovers(tmp_path / "store") == []
