"""An in-process jobs service (real gRPC server, Postgres, NATS) and helpers for its tests."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from registry_harness import RunningRegistry
from tiny_models import build_tiny_llama

from roundhouse.v1 import asset_pb2, events_pb2, jobs_pb2, jobs_pb2_grpc, registry_pb2
from services.common.events import EventBus
from services.common.grpc_client import open_channel
from services.common.modelstore import ModelStore
from services.jobs.registry_client import RegistryClient
from services.jobs.runners import Runner
from services.jobs.server import JobsApp, build_app
from services.jobs.settings import JobsSettings

TERMINAL = {jobs_pb2.OPERATION_STATUS_SUCCEEDED, jobs_pb2.OPERATION_STATUS_FAILED,
            jobs_pb2.OPERATION_STATUS_CANCELLED}


def jobs_settings(db_dsn: str, nats_url: str, root: Path, registry_address: str,
                  **overrides: Any) -> JobsSettings:
    """Settings for a test instance: port 0, a store and a source root under `root`, no
    reconciler."""
    values: dict[str, Any] = {
        "database_url": db_dsn, "nats_url": nats_url, "home": root / "home",
        "model_store": root / "store", "source_roots": [root / "sources"],
        "registry_address": registry_address, "jobs_address": "127.0.0.1:0",
        "jobs_instance_id": "test-jobs", "jobs_retry_backoff_s": 0.05,
        # Workers are discovered from heartbeats; the reconciler acts on every asset in the
        # database, so only tests that own their database turn it on.
        "worker_addresses": [], "jobs_reconcile": False,
    }
    values.update(overrides)
    return JobsSettings(**values)


@dataclass
class RunningJobs:
    """A jobs service started by `running_jobs`, with a typed stub."""

    app: JobsApp
    address: str
    stub: jobs_pb2_grpc.JobsStub


@asynccontextmanager
async def running_jobs(
    settings: JobsSettings,
    runners: Callable[[ModelStore, RegistryClient], Mapping[str, Runner]] | None = None,
) -> AsyncIterator[RunningJobs]:
    """Start the jobs service on 127.0.0.1:0 and yield a stub for it (with the TLS and internal
    token of `settings`)."""
    app = await build_app(settings, runners)
    port = await app.start()
    address = f"127.0.0.1:{port}"
    channel = open_channel(address, settings)
    try:
        yield RunningJobs(app, address, jobs_pb2_grpc.JobsStub(channel))
    finally:
        await channel.close(grace=None)
        await app.stop(1)


async def clear_operations(dsn: str) -> None:
    """Empty the operations table, so no test's executor picks up another test's work."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DELETE FROM operations")
    finally:
        await conn.close()


@dataclass
class JobEvents:
    """Every `job.*` event seen on NATS since the subscription started."""

    events: list[events_pb2.Event] = field(default_factory=list)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def add(self, event: events_pb2.Event) -> None:
        """Subscription handler."""
        async with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    def of(self, job_id: str) -> list[events_pb2.Event]:
        """The events of one operation, in arrival order."""
        return [e for e in self.events if e.job_id == job_id]

    def types(self, job_id: str) -> list[str]:
        """`job.queued`, `job.progress`... of one operation, in arrival order."""
        return [e.type for e in self.of(job_id)]

    async def wait_for(self, job_id: str, type: str, timeout_s: float = 30.0) -> events_pb2.Event:
        """The first event of that type for that operation, waiting for it if need be."""
        def found() -> events_pb2.Event | None:
            return next((e for e in self.of(job_id) if e.type == type), None)

        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: found() is not None), timeout_s)
        event = found()
        assert event is not None
        return event


@asynccontextmanager
async def job_events(nats_url: str) -> AsyncIterator[JobEvents]:
    """Collect `job.*` events from NATS while the block runs."""
    bus = await EventBus.connect(nats_url, name="test-job-events")
    collected = JobEvents()
    sub = await bus.subscribe("roundhouse.events.job.>", collected.add)
    await bus.nc.flush()
    try:
        yield collected
    finally:
        await sub.unsubscribe()
        await bus.close()


async def watch_until_done(
    stub: jobs_pb2_grpc.JobsStub, operation_id: str, timeout_s: float = 60.0
) -> list[jobs_pb2.Operation]:
    """Every state `WatchOperation` streams, up to and including the terminal one."""
    states: list[jobs_pb2.Operation] = []
    call = stub.WatchOperation(jobs_pb2.GetOperationRequest(operation_id=operation_id),
                               timeout=timeout_s)
    async for state in call:
        states.append(state)
    assert states and states[-1].status in TERMINAL, states[-1:] or "no state"
    return states


def uid(prefix: str = "m") -> str:
    """A unique asset id or key."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@cache
def tiny_llama(root: Path) -> Path:
    """A tiny transformers model folder under `root`, built once per process."""
    return build_tiny_llama(root / "jobs-tiny-llama")


def copy_model(source: Path, sources: Path, name: str = "") -> Path:
    """A copy of the model folder `source` under the source root `sources`."""
    return Path(shutil.copytree(source, sources / (name or uid("src"))))


async def add_model(registry: RunningRegistry, folder: Path, disk_gb: float = 0) -> str:
    """Register `folder` as a `path` asset; returns its id."""
    asset_id = uid()
    spec = asset_pb2.AssetSpec(
        asset_id=asset_id, interfaces=[asset_pb2.INTERFACE_LLM_RUNTIME],
        source=asset_pb2.Source(kind=asset_pb2.SOURCE_KIND_PATH, path=str(folder)),
    )
    if disk_gb:
        spec.resources.CopyFrom(asset_pb2.Resources(disk_gb=disk_gb))
    await registry.stub.ApplyAssets(registry_pb2.ApplyAssetsRequest(
        assets=[registry_pb2.AssetApply(spec=spec)]))
    return asset_id


async def asset_status(registry: RunningRegistry, asset_id: str) -> asset_pb2.AssetStatus:
    """The observed status the registry holds for the asset."""
    asset = await registry.stub.GetAsset(registry_pb2.GetAssetRequest(asset_id=asset_id))
    return asset.status


def submit(asset_id: str, type: int = jobs_pb2.OPERATION_TYPE_INSTALL,
           key: str = "") -> jobs_pb2.SubmitOperationRequest:
    """A SubmitOperation request."""
    return jobs_pb2.SubmitOperationRequest(type=type, asset_id=asset_id, idempotency_key=key)


async def rpc_error(call: object) -> grpc.aio.AioRpcError:
    """The error a call fails with (the test fails if it succeeds)."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value


def stalled_model(tiny_llama: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A model folder whose extra file is a FIFO; returns the folder and the FIFO."""
    folder = copy_model(tiny_llama, tmp_path / "sources", uid("stalled"))
    fifo = folder / "stream.bin"
    os.mkfifo(fifo)
    return folder, fifo


async def feed_until_done(fifo: Path, stub: jobs_pb2_grpc.JobsStub, operation_id: str,
                          timeout_s: float = 30.0) -> None:
    """Write to the FIFO once its reader is there, until the operation has finished."""
    deadline = time.monotonic() + timeout_s
    request = jobs_pb2.GetOperationRequest(operation_id=operation_id)
    try:
        while (await stub.GetOperation(request)).status not in TERMINAL:
            assert time.monotonic() < deadline, "the operation did not finish"
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: nobody reads it yet
                    raise
                await asyncio.sleep(0.05)
                continue
            os.write(fd, b"\0" * 4096)
            os.close(fd)
            await asyncio.sleep(0.05)
    finally:
        # Never leave a store thread blocked on the FIFO, whatever happened above.
        os.close(os.open(fifo, os.O_RDWR | os.O_NONBLOCK))


def store_leftovers(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir() if p.name != ".locks") if store.exists() else []
