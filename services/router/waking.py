"""Wake on demand: a worker holding the requested model, loading it through the jobs service.

The router never loads models itself. When no worker holds an asset it asks the jobs service
(`Jobs.EnsureLoaded`), which runs one load operation however many routers and requests ask,
placing it and evicting idle models as needed. Concurrent requests here share one call;
requests to models that are already held never wait on it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from roundhouse.v1 import jobs_pb2, jobs_pb2_grpc
from services.common.asset_proto import AssetRecord
from services.common.errors import ModelNotReady
from services.common.grpc_client import domain_error
from services.common.workerpool import WorkerHandle, WorkerPool

log = logging.getLogger(__name__)


class ModelWaker:
    """Finds the worker for a request, waking the model first when it sleeps."""

    def __init__(self, pool: WorkerPool, jobs: jobs_pb2_grpc.JobsStub, *, wait_s: float) -> None:
        self._pool = pool
        self._wait_s = wait_s
        self._jobs = jobs
        self._wakes: dict[str, asyncio.Task[None]] = {}

    async def place(self, record: AssetRecord, *,
                    on_wake: Callable[[], None] | None = None) -> WorkerHandle:
        """A healthy worker holding the asset; `ModelNotReady` (503) when it cannot be loaded
        within the wake timeout. `on_wake` is called when the request has to wait for a wake."""
        asset_id = record.spec.asset_id
        worker = self._pool.pick(asset_id)
        if worker is not None:
            return worker
        if on_wake is not None:
            on_wake()
        task = self._wakes.get(asset_id)
        if task is None:
            task = asyncio.create_task(self._wake(asset_id), name=f"wake-{asset_id}")
            self._wakes[asset_id] = task
            task.add_done_callback(lambda _: self._wakes.pop(asset_id, None))
        # A request that gives up leaves the wake-up running for the others.
        await asyncio.shield(task)
        worker = self._pool.pick(asset_id)
        if worker is None:
            raise ModelNotReady(f"model '{asset_id}' is not loaded on any worker yet; retry later",
                                retry_after_s=2.0)
        return worker

    async def _wake(self, asset_id: str) -> None:
        log.info("waking %s", asset_id)
        try:
            reply = await self._jobs.EnsureLoaded(
                jobs_pb2.EnsureLoadedRequest(asset_id=asset_id, wait_s=self._wait_s),
                timeout=self._wait_s + 10,
            )
        except grpc.aio.AioRpcError as exc:
            raise domain_error(
                exc, unavailable=f"model '{asset_id}' could not be loaded now; retry later"
            ) from None
        if not reply.loaded:
            raise ModelNotReady(
                f"model '{asset_id}' is still loading (operation {reply.operation.operation_id}); "
                "retry later", retry_after_s=5.0)
        holders = [w for i in reply.worker_ids if (w := self._pool.find(worker_id=i))]
        if holders:
            await asyncio.gather(*(self._pool.refresh(w) for w in holders))
        else:  # a worker this router has not heard from yet
            await self._pool.refresh()
