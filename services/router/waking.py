"""Wake on demand: a worker holding the requested model, loading it through the jobs service.

The router never loads models itself. When no worker holds an asset it asks the jobs service
(`Jobs.EnsureLoaded`), which runs one load operation however many routers and requests ask,
placing it and evicting idle models as needed. Concurrent requests here share one call;
requests to models that are already held never wait on it.

The reply names the workers that hold the model now, and the waiting requests go to them at
once; the router's own picture of those workers is refreshed behind them, and requests that
arrive meanwhile are placed from the same reply.

Each waiting request's wait is a `wake` span; the call to the jobs service is made inside the
span of the request that started the wake, so the load operation (and the worker's load)
joins that request's trace.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection

import grpc

from roundhouse.v1 import jobs_pb2, jobs_pb2_grpc
from services.common.asset_proto import AssetRecord
from services.common.errors import ModelNotReady
from services.common.grpc_client import domain_error
from services.common.workerpool import WorkerHandle, WorkerPool
from services.router.metrics.spans import step

log = logging.getLogger(__name__)


class ModelWaker:
    """Finds the worker for a request, waking the model first when it sleeps."""

    def __init__(self, pool: WorkerPool, jobs: jobs_pb2_grpc.JobsStub, *, wait_s: float) -> None:
        self._pool = pool
        self._wait_s = wait_s
        self._jobs = jobs
        self._wakes: dict[str, asyncio.Future[list[WorkerHandle]]] = {}
        """Per asset being woken: the workers holding it, once the jobs service said so."""
        self._tasks: set[asyncio.Task[None]] = set()

    async def place(self, record: AssetRecord, *, exclude: Collection[str] = (),
                    on_wake: Callable[[], None] | None = None) -> WorkerHandle:
        """A healthy worker holding the asset, not one of `exclude` (addresses of workers that
        cannot take this request); `ModelNotReady` (503) when it cannot be loaded within the
        wake timeout. `on_wake` is called when the request has to wait for a wake."""
        asset_id = record.spec.asset_id
        worker = self._pool.pick(asset_id, exclude)
        if worker is not None:
            return worker
        if on_wake is not None:
            on_wake()
        with step("wake", {"roundhouse.asset_id": asset_id}, current=True):
            holders = self._wakes.get(asset_id)
            if holders is None:
                holders = self._start_wake(asset_id)  # its task inherits this span
            # A request that gives up leaves the wake-up running for the others.
            woken = await asyncio.shield(holders)
        worker = self._pool.pick(asset_id, exclude) or min(
            (w for w in woken if w.serving and w.address not in exclude),
            key=lambda w: w.in_flight[asset_id], default=None)
        if worker is None:
            raise ModelNotReady(f"model '{asset_id}' is not loaded on any worker yet; retry later",
                                retry_after_s=2.0)
        return worker

    def _start_wake(self, asset_id: str) -> asyncio.Future[list[WorkerHandle]]:
        holders: asyncio.Future[list[WorkerHandle]] = asyncio.get_running_loop().create_future()
        # Retrieved here too, in case every request waiting for it gave up.
        holders.add_done_callback(lambda done: done.cancelled() or done.exception())
        self._wakes[asset_id] = holders
        task = asyncio.create_task(self._wake(asset_id, holders), name=f"wake-{asset_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return holders

    async def _wake(self, asset_id: str, holders: asyncio.Future[list[WorkerHandle]]) -> None:
        """Ask for the load and hand the holders to the waiting requests, then bring the pool's
        picture of them up to date; the wake counts as under way until then."""
        log.info("waking %s", asset_id)
        try:
            try:
                worker_ids = await self._ensure_loaded(asset_id)
            except Exception as exc:  # noqa: BLE001 - every waiting request gets it
                holders.set_exception(exc)
                return
            known = [w for i in worker_ids if (w := self._pool.find(worker_id=i)) and w.healthy
                     and w.channel.get_state() == grpc.ChannelConnectivity.READY]
            # A worker this router has not heard from yet, or whose connection is not up (it
            # started after the router, say, and the channel is between reconnect attempts: a
            # call now would fail at once): the refresh waits for the connection.
            if not known or len(known) < len(worker_ids):
                await self._pool.refresh()
                holders.set_result(self._pool.holders(asset_id))
                return
            holders.set_result(known)
            await asyncio.gather(*(self._pool.refresh(w) for w in known))
        finally:
            if not holders.done():
                holders.cancel()
            self._wakes.pop(asset_id, None)

    async def _ensure_loaded(self, asset_id: str) -> list[str]:
        """The workers holding the asset once the jobs service has it loaded."""
        try:
            reply = await self._jobs.EnsureLoaded(
                jobs_pb2.EnsureLoadedRequest(asset_id=asset_id, wait_s=self._wait_s),
                timeout=self._wait_s + 10,
            )
        except grpc.aio.AioRpcError as exc:
            unavailable = f"model '{asset_id}' could not be loaded now; retry later"
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                # The wake's own time ran out, not the request's: the load may still finish.
                raise ModelNotReady(unavailable, retry_after_s=5.0) from None
            raise domain_error(exc, unavailable=unavailable) from None
        if not reply.loaded:
            raise ModelNotReady(
                f"model '{asset_id}' is still loading (operation {reply.operation.operation_id}); "
                "retry later", retry_after_s=5.0)
        return list(reply.worker_ids)
