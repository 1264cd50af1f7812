"""The jobs service's domain: submit, read, list, cancel and watch operations. No protobuf here."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from services.common.asset_proto import check_serves
from services.common.errors import ModelNotReady
from services.common.routespec import check_unrouted
from services.common.workerpool import WorkerPool
from services.jobs.cooldown import check_not_cooling, model_failed
from services.jobs.executor import Executor
from services.jobs.model import NewOperation, OperationFilter, OperationRecord
from services.jobs.registry_client import RegistryClient
from services.jobs.repository import OperationRepository
from services.jobs.watch import DEFAULT_POLL_S, ChangeNotifier, watch_operation


@dataclass(frozen=True)
class Loaded:
    """What `ensure_loaded` found: whether the asset is held, by whom, and the load it ran."""

    loaded: bool
    worker_ids: list[str]
    operation: OperationRecord | None = None


class JobService:
    """Durable operations on assets, backed by Postgres and run by an `Executor`."""

    def __init__(
        self,
        repository: OperationRepository,
        executor: Executor,
        registry: RegistryClient,
        notifier: ChangeNotifier,
        pool: WorkerPool,
        *,
        max_attempts: int = 3,
        watch_poll_s: float = DEFAULT_POLL_S,
        failure_cooldown_s: float = 60.0,
    ) -> None:
        self._repo = repository
        self._executor = executor
        self._registry = registry
        self._notifier = notifier
        self.pool = pool
        """The workers as this service sees them (heartbeats and refreshes)."""
        self._max_attempts = max_attempts
        self._watch_poll_s = watch_poll_s
        self._failure_cooldown_s = failure_cooldown_s

    async def submit(self, new: NewOperation) -> OperationRecord:
        """Queue an operation on an existing asset (`AssetNotFound` otherwise).

        With an idempotency key already used for the same request, returns that operation
        as it is now (even if its asset is gone since); for a different request, `Conflict`.
        """
        if new.idempotency_key:
            existing = await self._repo.by_key(new.idempotency_key)
            if existing is not None and new.same_request(existing):
                return existing
        if new.type == "delete":
            stored = await self._registry.get_stored(new.asset_id)
            check_unrouted(new.asset_id, stored.spec.aliases, await self._registry.list_routes())
        else:
            await self._registry.get_asset(new.asset_id)
        record = await self._repo.create(new, max_attempts=self._max_attempts)
        self._executor.wake()
        return record

    async def get(self, operation_id: str) -> OperationRecord:
        """The operation with that id; `OperationNotFound` otherwise."""
        return await self._repo.get(operation_id)

    async def list(
        self, filters: OperationFilter, *, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[OperationRecord], str]:
        """One page of operations, newest first, and the next page's token ('' at the end)."""
        return await self._repo.list(filters, page_size=page_size, page_token=page_token)

    async def cancel(self, operation_id: str) -> OperationRecord:
        """Cancel a queued operation at once; ask a running one to stop.

        A running operation is flagged `cancel_requested` in its row, and stopped at once when
        this instance runs it (another instance notices the flag at its next lease renewal).
        Its runner then removes partial results and it ends `cancelled`; `WatchOperation`
        shows when. Cancelling a cancelled operation is a no-op; a finished one,
        `FailedPrecondition`.
        """
        record = await self._repo.request_cancel(operation_id)
        if record.status == "running":
            self._executor.cancel(operation_id)
        return record

    async def _latest(self, operation: OperationRecord, wait_s: float) -> OperationRecord:
        """`operation` once it finishes, or as it stands after `wait_s`."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                async for seen in self.watch(operation.operation_id):
                    operation = seen
        return operation

    def watch(self, operation_id: str) -> AsyncGenerator[OperationRecord, None]:
        """The operation now, then every change until it finishes (see `watch_operation`)."""
        return watch_operation(self._repo, self._notifier, operation_id, poll_s=self._watch_poll_s)

    async def ensure_loaded(self, asset_id: str, wait_s: float) -> Loaded:
        """Make sure a worker holds the asset, waiting up to `wait_s` for it.

        Already held: returns at once. Otherwise joins the asset's load under way or queues
        one, started here at once when this instance has a free slot, so any number of
        concurrent callers cause one load. A load that fails raises `ModelFailed` with its
        reason, and so does every call during the failure's cooldown (see `cooldown`), without
        another load; a cancelled load raises `ModelNotReady`. One still running after
        `wait_s` comes back with `loaded` False and the operation to watch.
        """
        record = await self._registry.get_asset(asset_id)
        check_serves(record, asset_id, "")
        if holders := self.pool.holders(asset_id):
            # Callers ask when they see no holder: this picture may be the stale one (an unload
            # or eviction a moment ago), so it is checked with the holders themselves first.
            await asyncio.gather(*(self.pool.refresh(w) for w in holders))
            if holders := self.pool.holders(asset_id):
                return Loaded(True, [w.worker_id for w in holders])
        check_not_cooling(record, self._failure_cooldown_s)
        operation = await self._executor.create_and_run(NewOperation("load", asset_id),
                                                        max_attempts=self._max_attempts)
        if wait_s > 0:
            operation = await self._latest(operation, wait_s)
        if operation.status == "failed":
            reason = operation.error or operation.message
            if (await self._registry.get_asset(asset_id)).state == "failed":
                raise model_failed(asset_id, reason, self._failure_cooldown_s)
            raise ModelNotReady(f"model '{asset_id}' could not be loaded now: {reason}",
                                retry_after_s=5.0)
        if operation.status == "cancelled":
            raise ModelNotReady(f"the load of model '{asset_id}' was cancelled; retry later",
                                retry_after_s=5.0)
        if operation.status == "succeeded":
            holders = self.pool.holders(asset_id)
            if not holders:  # run by another instance: this pool has not seen it yet
                await self.pool.refresh()
                holders = self.pool.holders(asset_id)
            if holders:
                return Loaded(True, [w.worker_id for w in holders], operation)
        return Loaded(False, [], operation)
