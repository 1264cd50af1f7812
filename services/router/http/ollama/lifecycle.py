"""What the Ollama API does to a model's lifecycle: `keep_alive`, pull and delete.

`keep_alive` (on chat, generate and embed) maps onto the asset's declared lifecycle, the way
the admin UI's disable and enable re-apply the asset through the registry (naming the
revision read, so a concurrent apply is never overwritten), and onto the jobs service's
operations, as the admin API's unload does:

- `0`: unload the model once the request is answered: once no worker holding it has a
  request to it in flight (their pictures are polled with a growing delay), an `unload`
  operation on every worker holding it, waited for, so `/api/ps` no longer lists it when the
  answer ends. A request that slips in between makes the operation fail; it is tried again
  after the model is idle again, `UNLOAD_ATTEMPTS` operations at most and all within
  `UNLOAD_WITHIN_S`, then the request fails saying why. A `running` (pinned) model is made
  `on-demand` first (sleeping after the default `auto_sleep_min`), or the reconciler would
  load it straight back: an unload undoes a pin.
- a duration `d` (`"5m"`, or seconds as a number): the model is kept at least `d` after its
  last use: an `on-demand` asset whose `auto_sleep_min` is shorter gets `ceil(d / 60)`
  minutes. Never shortened (other clients may rely on the longer), and a model that never
  sleeps (`running`, or `auto_sleep_min: 0`) is left as it is.
- any negative value (`-1`, `"-1m"`): pinned: `lifecycle.desired: running`, so it is never
  put to sleep for idleness and is reloaded if its worker goes.

These change the declared asset for every client, so they are operator actions: a
`keep_alive` that would change anything (`0`, a duration above the current
`auto_sleep_min`, a pin of a model not pinned yet) needs an admin key (or authentication
off); from any other key it is refused (`PermissionDenied`) before the request runs. One that
changes nothing (a duration the model already keeps, a pin of a pinned model) passes. The
asset that answered is checked again when the change is made (a route's request, or an asset
re-applied meanwhile).

Pull is an `install` operation of the declared asset (nothing is fetched that an operator
did not declare), delete a `delete` operation (its files and its registry entry), both
through the jobs service as the admin API queues them; both need an admin key (see `routes`).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any

import grpc

from roundhouse.v1 import asset_pb2, jobs_pb2, jobs_pb2_grpc, registry_pb2
from services.common.asset_proto import AssetRecord
from services.common.assetspec import AssetSpec
from services.common.errors import Conflict, FailedPrecondition, NotFound, PermissionDenied, UpstreamError
from services.common.grpc_client import domain_error
from services.common.keys import KeyRecord
from services.common.operation_names import TYPES
from services.common.route_proto import RouteRecord, Stored
from services.common.workerpool import WorkerHandle
from services.router.http.ollama.views import digest

if TYPE_CHECKING:
    from services.router.gateway import Gateway

log = logging.getLogger(__name__)

JOBS_DOWN = "the jobs service is unavailable; retry later"
REGISTRY_DOWN = "the registry is unavailable; retry later"
UNLOAD_WITHIN_S = 30.0
"""The longest an unload for `keep_alive: 0` waits for other requests to the model to end."""
UNLOAD_ATTEMPTS = 3
"""The most `unload` operations one `keep_alive: 0` queues."""
IDLE_POLL_S = (0.05, 1.0)
"""The first and the longest delay between two looks at whether a model is idle."""
APPLY_ATTEMPTS = 3
DONE = (jobs_pb2.OPERATION_STATUS_SUCCEEDED, jobs_pb2.OPERATION_STATUS_FAILED,
        jobs_pb2.OPERATION_STATUS_CANCELLED)


async def _call(call: Any, unavailable: str) -> Any:
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        raise domain_error(exc, unavailable=unavailable) from None


def changes(spec: AssetSpec, seconds: float) -> bool:
    """Whether a `keep_alive` of `seconds` (`math.inf`: pin) would change the asset."""
    if seconds == 0:
        return True
    if math.isinf(seconds):
        return spec.desired != "running"
    return spec.desired == "on-demand" and 0 < spec.auto_sleep_min < math.ceil(seconds / 60)


def shown(seconds: float) -> str:
    """A `keep_alive` as a client would recognise it."""
    return "-1" if math.isinf(seconds) else f"{seconds:g}s"


def check_may_change(key: KeyRecord | None, records: Iterable[AssetRecord], seconds: float) -> None:
    """`PermissionDenied` when `key` is not an admin key (and authentication is on) and a
    `keep_alive` of `seconds` would change any of `records`."""
    if key is None or key.admin:
        return
    for record in records:
        if changes(record.spec, seconds):
            what = ("unloads the model" if seconds == 0 else "pins the model" if math.isinf(seconds)
                    else f"keeps the model longer than its auto_sleep_min of {record.spec.auto_sleep_min} "
                         "minutes")
            raise PermissionDenied(
                f"keep_alive: {shown(seconds)} {what} ('{record.spec.asset_id}') for every client, which "
                "needs an admin key; leave keep_alive out or use an admin key")


class ModelLifecycle:
    """Keep-alive, pull and delete for the Ollama API, over the registry and the jobs service."""

    def __init__(self, gateway: Gateway, jobs: jobs_pb2_grpc.JobsStub, *,
                 unload_within_s: float = UNLOAD_WITHIN_S) -> None:
        self.gateway = gateway
        self.jobs = jobs
        self.unload_within_s = unload_within_s

    async def answering(self, record: Stored) -> list[AssetRecord]:
        """The assets a request naming `record` may be answered by: the model, or every target
        and fallback of a route."""
        if isinstance(record, AssetRecord):
            return [record]
        assert isinstance(record, RouteRecord)
        answering = []
        for name in dict.fromkeys([*(t.asset for t in record.spec.targets), *record.spec.fallback]):
            try:
                resolved = await self.gateway.catalog.resolve(name, "")
            except (NotFound, FailedPrecondition):
                continue  # gone or disabled since the route was applied: it cannot answer
            if isinstance(resolved, AssetRecord):
                answering.append(resolved)
        return answering

    async def check(self, key: KeyRecord | None, record: Stored, seconds: float | None) -> None:
        """Refuse (`PermissionDenied`) a request's `keep_alive` that `key` may not apply to the
        model or route it names (see the module's docstring), before the request runs."""
        if seconds is not None and not (key is None or key.admin):
            check_may_change(key, await self.answering(record), seconds)

    async def keep(self, record: AssetRecord, seconds: float, key: KeyRecord | None = None) -> None:
        """Apply a request's `keep_alive` (seconds; `math.inf` pins) once it is answered, if
        `key` may (`PermissionDenied` otherwise)."""
        check_may_change(key, [record], seconds)
        spec = record.spec
        if seconds == 0:
            await self.unload(record)
        elif math.isinf(seconds):
            if spec.desired != "running":
                await self._reapply(spec.asset_id, _pin)
        elif changes(spec, seconds):
            minutes = math.ceil(seconds / 60)
            await self._reapply(spec.asset_id, lambda declared: _sleep_after(declared, minutes))

    async def load(self, record: AssetRecord) -> None:
        """Wake the model as a request would (through the jobs service, once for all callers)."""
        await self.gateway.waker.place(record)

    async def unload(self, record: AssetRecord) -> None:
        """Unload the model from every worker holding it once their requests have ended
        (unpinning it first); `FailedPrecondition` when that does not happen within
        `unload_within_s` or `UNLOAD_ATTEMPTS` operations (see the module's docstring)."""
        asset_id = record.spec.asset_id
        if record.spec.desired == "running":
            await self._reapply(asset_id, _unpin)
        why = "requests to it kept running"
        try:
            async with asyncio.timeout(self.unload_within_s):
                for _ in range(UNLOAD_ATTEMPTS):
                    holders = await self._idle(asset_id)
                    if not holders:
                        return
                    why = "its unload operation did not end"
                    operation = await self._run(jobs_pb2.SubmitOperationRequest(
                        type=TYPES["unload"], asset_id=asset_id))
                    pool = self.gateway.workers
                    await asyncio.gather(*(pool.refresh(w) for w in holders))  # for /api/ps
                    if operation.status == jobs_pb2.OPERATION_STATUS_SUCCEEDED:
                        return
                    why = operation.error or operation.message or "the unload was cancelled"
        except TimeoutError:
            raise FailedPrecondition(f"model '{asset_id}' was not unloaded within "
                                     f"{self.unload_within_s:g}s: {why}") from None
        raise FailedPrecondition(f"model '{asset_id}' was not unloaded after {UNLOAD_ATTEMPTS} tries: "
                                 f"{why}")

    async def _idle(self, asset_id: str) -> list[WorkerHandle]:
        """The workers holding the asset, once none has a request to it in flight or queued
        (this router's included), as their fresh pictures show; looked at again with a
        growing delay until then. Empty when none holds it."""
        pool = self.gateway.workers
        delay, longest = IDLE_POLL_S
        while True:
            await asyncio.gather(*(pool.refresh(w) for w in pool.holders(asset_id)))
            holders = pool.holders(asset_id)
            if all(_idle_on(w, asset_id) for w in holders):
                return holders
            await asyncio.sleep(delay)  # a backoff between looks, bounded by the caller's timeout
            delay = min(delay * 2, longest)

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


def _idle_on(worker: WorkerHandle, asset_id: str) -> bool:
    """Whether the worker's picture shows no request to the asset in flight or queued, and this
    router has none there either."""
    model = worker.model(asset_id)
    return (model is None or model.in_flight + model.waiting == 0) and not worker.in_flight[asset_id]
