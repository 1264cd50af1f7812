"""What the Ollama API does to a model's lifecycle: `keep_alive`, pull and delete.

`keep_alive` (on chat, generate and embed) maps onto the asset's declared lifecycle, the way
the admin UI's disable and enable re-apply the asset through the registry (naming the
revision read, so a concurrent apply is never overwritten), and onto the jobs service's
operations, as the admin API's unload does:

- `0`: unload the model once the request is answered (an `unload` operation on every worker
  holding it, waited for, so `/api/ps` no longer lists it when the answer ends). A `running`
  model is made `on-demand` first (sleeping after the default `auto_sleep_min`), or the
  reconciler would load it straight back.
- a duration `d` (`"5m"`, or seconds as a number): the model is kept at least `d` after its
  last use: an `on-demand` asset whose `auto_sleep_min` is shorter gets `ceil(d / 60)`
  minutes. Never shortened (other clients may rely on the longer), and a model that never
  sleeps (`running`, or `auto_sleep_min: 0`) is left as it is.
- any negative value (`-1`, `"-1m"`): pinned: `lifecycle.desired: running`, so it is never
  put to sleep for idleness and is reloaded if its worker goes.

Any key that may use the model may do all three, as any Ollama client may. Pull is an
`install` operation of the declared asset (nothing is fetched that an operator did not
declare), delete a `delete` operation (its files and its registry entry), both through the
jobs service as the admin API queues them.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc

from roundhouse.v1 import asset_pb2, jobs_pb2, jobs_pb2_grpc, registry_pb2
from services.common.asset_proto import AssetRecord
from services.common.errors import Conflict, FailedPrecondition, UpstreamError
from services.common.grpc_client import domain_error
from services.common.operation_names import TYPES
from services.router.http.ollama.views import digest

if TYPE_CHECKING:
    from services.router.gateway import Gateway

log = logging.getLogger(__name__)

JOBS_DOWN = "the jobs service is unavailable; retry later"
REGISTRY_DOWN = "the registry is unavailable; retry later"
UNLOAD_WITHIN_S = 30.0
"""The longest an unload for `keep_alive: 0` waits for other requests to the model to end."""
APPLY_ATTEMPTS = 3
DONE = (jobs_pb2.OPERATION_STATUS_SUCCEEDED, jobs_pb2.OPERATION_STATUS_FAILED,
        jobs_pb2.OPERATION_STATUS_CANCELLED)


async def _call(call: Any, unavailable: str) -> Any:
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        raise domain_error(exc, unavailable=unavailable) from None


class ModelLifecycle:
    """Keep-alive, pull and delete for the Ollama API, over the registry and the jobs service."""

    def __init__(self, gateway: Gateway, jobs: jobs_pb2_grpc.JobsStub) -> None:
        self.gateway = gateway
        self.jobs = jobs

    async def keep(self, record: AssetRecord, seconds: float) -> None:
        """Apply a request's `keep_alive` (seconds; `math.inf` pins) once it is answered."""
        spec = record.spec
        if seconds == 0:
            await self.unload(record)
        elif math.isinf(seconds):
            if spec.desired != "running":
                await self._reapply(spec.asset_id, _pin)
        elif spec.desired == "on-demand" and 0 < spec.auto_sleep_min < (minutes := math.ceil(seconds / 60)):
            await self._reapply(spec.asset_id, lambda declared: _sleep_after(declared, minutes))

    async def load(self, record: AssetRecord) -> None:
        """Wake the model as a request would (through the jobs service, once for all callers)."""
        await self.gateway.waker.place(record)

    async def unload(self, record: AssetRecord) -> None:
        """Unload the model from every worker holding it, once their requests have ended (a
        request just answered may still hold its slot there for a moment)."""
        asset_id = record.spec.asset_id
        if record.spec.desired == "running":
            await self._reapply(asset_id, _unpin)
        pool = self.gateway.workers
        deadline = asyncio.get_running_loop().time() + UNLOAD_WITHIN_S
        while holders := pool.holders(asset_id):
            operation = await self._run(jobs_pb2.SubmitOperationRequest(
                type=TYPES["unload"], asset_id=asset_id))
            await asyncio.gather(*(pool.refresh(w) for w in holders))
            if operation.status == jobs_pb2.OPERATION_STATUS_SUCCEEDED:
                continue
            if asyncio.get_running_loop().time() > deadline:
                raise FailedPrecondition(f"model '{asset_id}' was not unloaded: {operation.error}")
            await asyncio.sleep(0.05)  # requests still running there: try again shortly

    async def pull(self, record: AssetRecord) -> AsyncGenerator[dict[str, Any], None]:
        """Install the declared asset; Ollama's progress lines as it goes (`total` and
        `completed` in percent), ending with `success`. A failed install raises."""
        yield {"status": "pulling manifest"}
        operation = await _call(self.jobs.SubmitOperation(jobs_pb2.SubmitOperationRequest(
            type=TYPES["install"], asset_id=record.spec.asset_id), timeout=30), JOBS_DOWN)
        layer = digest(record)
        status = {"status": f"pulling {layer[:12]}", "digest": f"sha256:{layer}", "total": 100}
        yield {**status, "completed": 0}
        sent = 0
        async for update in self._watch(operation):
            if update.progress > sent and update.status not in DONE:
                sent = update.progress
                yield {**status, "completed": sent}
            operation = update
        if operation.status != jobs_pb2.OPERATION_STATUS_SUCCEEDED:
            raise UpstreamError(f"pulling '{record.spec.asset_id}' failed: "
                                f"{operation.error or operation.message or 'cancelled'}")
        if sent < 100:
            yield {**status, "completed": 100}
        yield {"status": "verifying sha256 digest"}
        yield {"status": "writing manifest"}
        yield {"status": "success"}

    async def delete(self, asset_id: str) -> None:
        """Delete the asset (files and registry entry) and wait for it to be done."""
        operation = await self._run(jobs_pb2.SubmitOperationRequest(type=TYPES["delete"], asset_id=asset_id))
        if operation.status != jobs_pb2.OPERATION_STATUS_SUCCEEDED:
            raise FailedPrecondition(f"deleting '{asset_id}' failed: {operation.error or 'cancelled'}")
        self.gateway.catalog.invalidate()

    async def stored_bytes(self) -> dict[str, int]:
        """Bytes each installed asset takes in the model store; empty when the jobs service
        cannot say (sizes are then shown as 0)."""
        try:
            storage = await self.jobs.GetStorage(jobs_pb2.GetStorageRequest(), timeout=5)
        except grpc.aio.AioRpcError:
            log.warning("model store sizes unavailable", exc_info=True)
            return {}
        return {a.asset_id: a.bytes for a in storage.assets}

    async def _run(self, request: jobs_pb2.SubmitOperationRequest) -> jobs_pb2.Operation:
        """Queue an operation and wait for its end; the operation as it ended."""
        operation = await _call(self.jobs.SubmitOperation(request, timeout=30), JOBS_DOWN)
        async for update in self._watch(operation):
            operation = update
        return operation

    async def _watch(self, operation: jobs_pb2.Operation) -> AsyncIterator[jobs_pb2.Operation]:
        if operation.status in DONE:
            yield operation
            return
        watch = self.jobs.WatchOperation(jobs_pb2.GetOperationRequest(operation_id=operation.operation_id))
        try:
            async for update in watch:
                yield update
        except grpc.aio.AioRpcError as exc:
            raise domain_error(exc, unavailable=JOBS_DOWN) from None
        finally:
            watch.cancel()

    async def _reapply(self, asset_id: str, change: Callable[[asset_pb2.AssetSpec], bool]) -> None:
        """Re-apply the asset with `change` made to its declared spec (when it says it changed
        anything), naming the revision it read; read again if another apply came between."""
        registry = self.gateway.catalog.registry
        for _ in range(APPLY_ATTEMPTS):
            asset = await _call(registry.GetAsset(registry_pb2.GetAssetRequest(asset_id=asset_id),
                                                  timeout=10), REGISTRY_DOWN)
            spec = asset_pb2.AssetSpec()
            spec.CopyFrom(asset.spec)
            if not change(spec):
                return
            try:
                await _call(registry.ApplyAssets(registry_pb2.ApplyAssetsRequest(assets=[
                    registry_pb2.AssetApply(spec=spec, expected_revision=asset.revision)]), timeout=30),
                    REGISTRY_DOWN)
            except Conflict:
                continue  # another apply came between: read it again
            self.gateway.catalog.invalidate()
            log.info("keep_alive re-applied %s: lifecycle %s", asset_id, spec.lifecycle)
            return
        raise Conflict(f"model '{asset_id}' changed under this request; retry")


def _pin(spec: asset_pb2.AssetSpec) -> bool:
    if spec.lifecycle.desired == asset_pb2.DESIRED_STATE_RUNNING:
        return False
    spec.lifecycle.desired = asset_pb2.DESIRED_STATE_RUNNING
    spec.lifecycle.ClearField("auto_sleep_min")  # sleeping applies to on-demand models only
    return True


def _unpin(spec: asset_pb2.AssetSpec) -> bool:
    if spec.lifecycle.desired == asset_pb2.DESIRED_STATE_ON_DEMAND:
        return False
    spec.lifecycle.desired = asset_pb2.DESIRED_STATE_ON_DEMAND
    spec.lifecycle.ClearField("auto_sleep_min")  # a running model reads 0 (never): the default again
    return True


def _sleep_after(spec: asset_pb2.AssetSpec, minutes: int) -> bool:
    lifecycle = spec.lifecycle
    if lifecycle.desired not in (asset_pb2.DESIRED_STATE_ON_DEMAND, asset_pb2.DESIRED_STATE_UNSPECIFIED):
        return False
    if lifecycle.HasField("auto_sleep_min") and not 0 < lifecycle.auto_sleep_min < minutes:
        return False  # it never sleeps, or not sooner
    lifecycle.desired = asset_pb2.DESIRED_STATE_ON_DEMAND
    lifecycle.auto_sleep_min = minutes
    return True
