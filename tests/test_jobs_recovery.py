"""A jobs service killed mid-install: a restarted one finishes the install, once.

Both instances are real `roundhouse jobs` processes. The install is held still by a FIFO in
its source (see `stalled_model`) until the first process is dead.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from jobs_harness import (
    JobEvents,
    add_model,
    asset_status,
    feed_until_done,
    stalled_model,
    store_leftovers,
    submit,
    watch_until_done,
)
from process_harness import roundhouse_process
from registry_harness import RunningRegistry

from roundhouse.v1 import asset_pb2, jobs_pb2, jobs_pb2_grpc
from services.common.embedded import free_port

pytestmark = pytest.mark.usefixtures("no_leftover_operations")


@asynccontextmanager
async def jobs_process(
    name: str, db_dsn: str, nats_url: str, registry_address: str, root: Path
) -> AsyncIterator[tuple[asyncio.subprocess.Process, jobs_pb2_grpc.JobsStub]]:
    """`roundhouse jobs` as a process with a 2 s lease; yields it and a stub once it serves."""
    address = f"127.0.0.1:{free_port()}"
    settings = {"ROUNDHOUSE_DATABASE_URL": db_dsn, "ROUNDHOUSE_NATS_URL": nats_url,
                "ROUNDHOUSE_REGISTRY_ADDRESS": registry_address, "ROUNDHOUSE_JOBS_ADDRESS": address,
                "ROUNDHOUSE_JOBS_INSTANCE_ID": name, "ROUNDHOUSE_JOBS_LEASE_S": "2",
                "ROUNDHOUSE_JOBS_POLL_INTERVAL_S": "0.2", "ROUNDHOUSE_JOBS_RECONCILE": "false",
                "ROUNDHOUSE_WORKER_ADDRESSES": "[]", "ROUNDHOUSE_HOME": str(root / "home"),
                "ROUNDHOUSE_MODEL_STORE": str(root / "store"),
                "ROUNDHOUSE_SOURCE_ROOTS": str(root / "sources")}
    async with roundhouse_process("jobs", settings, root / f"{name}.log") as process, \
            grpc.aio.insecure_channel(address) as channel:
        await asyncio.wait_for(channel.channel_ready(), 60)
        yield process, jobs_pb2_grpc.JobsStub(channel)

async def test_an_install_cut_off_by_a_killed_jobs_service_finishes_once_after_restart(
    registry: RunningRegistry, events: JobEvents, db_dsn: str, nats_url: str,
    tiny_llama: Path, tmp_path: Path,
) -> None:
    folder, fifo = stalled_model(tiny_llama, tmp_path)
    asset_id = await add_model(registry, folder)
    async with jobs_process("doomed", db_dsn, nats_url, registry.address, tmp_path) as (doomed, stub):
        operation = await stub.SubmitOperation(submit(asset_id))
        await events.wait_for(operation.operation_id, "job.progress")
        doomed.send_signal(signal.SIGKILL)
        await doomed.wait()

    async with jobs_process("rescuer", db_dsn, nats_url, registry.address, tmp_path) as (_, stub):
        await feed_until_done(fifo, stub, operation.operation_id, timeout_s=60)
        final = (await watch_until_done(stub, operation.operation_id))[-1]
        await events.wait_for(operation.operation_id, "job.succeeded")

    assert (final.status, final.attempts) == (jobs_pb2.OPERATION_STATUS_SUCCEEDED, 2)
    # Delivery is at least once: an event the dead instance published but had not marked as
    # sent is sent again by the rescuer, with the same event id (JetStream stores it once).
    seen = {e.event_id: e for e in events.of(operation.operation_id)}.values()
    assert [e.type for e in seen].count("job.succeeded") == 1
    starts = [e.job.message for e in seen if "attempt" in e.job.message]
    assert starts == ["running (attempt 1 of 3)", "running (attempt 2 of 3)"]
    assert (await asset_status(registry, asset_id)).state == asset_pb2.ASSET_STATE_INSTALLED
    assert store_leftovers(tmp_path / "store") == ["sources"]  # the install; no work dirs left
