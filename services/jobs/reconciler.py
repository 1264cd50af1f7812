"""The reconciler: converges what the workers hold (observed) to what the registry asks (desired).

Every pass, and at once when a worker is lost, it compares each asset with the workers'
last reports and queues the operations that close the gap; the executor runs them like any
other operation, so every step is durable, visible and evented:

- not installed (and installable): `install`, once per revision;
- `running` and held by no worker: `load` (also after its worker died or restarted); a
  `failed` one only once its cooldown has passed (see `cooldown`);
- a model whose engine died on a worker (reported in the worker's `failed_models`): `load`,
  once per failure, whatever its desired state (but `disabled`), so it serves again;
- `disabled` and held: `unload` (reason `disabled`, forced);
- `on-demand`, held, no request in flight, idle for `auto_sleep_min`: `unload` on that worker
  (reason `sleep`, so the worker publishes `model.sleeping`); the next request wakes it.

Several jobs instances may reconcile at once: loads are one per asset by a unique index,
installs by idempotency key, and unloads are skipped while one is under way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime

from services.common.asset_proto import AssetRecord
from services.common.errors import RoundhouseError
from services.common.modelstore import ModelStore
from services.common.tasks import cancel_and_wait
from services.common.workerpool import WorkerHandle, WorkerPool
from services.jobs.cooldown import cooldown_left_s
from services.jobs.executor import Executor
from services.jobs.model import NewOperation
from services.jobs.registry_client import RegistryClient
from services.jobs.repository import OperationRepository

log = logging.getLogger(__name__)

INSTALLABLE = frozenset({"registered", "installed", "sleeping", "failed"})
"""Observed states in which a missing install is queued (once per revision, by its key)."""


class Reconciler:
    """Queues the operations that bring workers in line with the registry."""

    def __init__(
        self,
        repository: OperationRepository,
        executor: Executor,
        registry: RegistryClient,
        pool: WorkerPool,
        store: ModelStore,
        *,
        interval_s: float,
        sleep_unit_s: float = 60.0,
        max_attempts: int = 3,
        failure_cooldown_s: float = 60.0,
    ) -> None:
        self._repo = repository
        self._executor = executor
        self._registry = registry
        self._pool = pool
        self._store = store
        self._interval_s = interval_s
        self._sleep_unit_s = sleep_unit_s
        self._max_attempts = max_attempts
        self._failure_cooldown_s = failure_cooldown_s
        self._poked = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Reconcile every interval, and whenever `poke` is called, in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._run_forever(), name="reconciler")

    async def stop(self) -> None:
        """Stop reconciling."""
        if self._task is not None:
            task, self._task = self._task, None
            await cancel_and_wait(task)

    def poke(self, *_: object) -> None:
        """Reconcile now (a worker was lost, an asset changed)."""
        self._poked.set()

    async def _run_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval_s):
                    await self._poked.wait()
            self._poked.clear()
            try:
                await self.reconcile()
            except RoundhouseError as exc:
                log.warning("reconcile pass skipped: %s", exc.message)
            except Exception:
                log.exception("reconcile pass failed")

    async def reconcile(self) -> list[str]:
        """One pass; returns what it queued (or found queued), as `type:asset_id` strings."""
        # The pool's picture is kept fresh by heartbeats and its own refresh loop.
        records = await self._registry.list_assets()
        queued: list[str] = []
        now = datetime.now(UTC)
        for record in records:
            for new in await self._needed(record, now):
                operation = await self._repo.create(new, max_attempts=self._max_attempts)
                if operation.status == "queued" and operation.attempts == 0:
                    queued.append(f"{new.type}:{new.asset_id}")
        if queued:
            log.info("reconciler queued %s", ", ".join(queued))
            self._executor.wake()
        return queued

    async def _needed(self, record: AssetRecord, now: datetime) -> list[NewOperation]:
        spec, asset_id = record.spec, record.spec.asset_id
        holders = self._pool.holders(asset_id)
        if not holders and not await asyncio.to_thread(self._store.is_installed, spec):
            if record.state in INSTALLABLE:
                return [NewOperation("install", asset_id,
                                     idempotency_key=f"reconcile-install:{asset_id}:r{record.revision}")]
            return []
        if not holders and spec.desired != "disabled" and (crash := self._engine_failure(record)):
            return [NewOperation("load", asset_id, reason="recover", idempotency_key=crash)]
        if spec.desired == "running" and not holders and self._loadable(record, now):
            # With no worker up a load could only fail; a pass after one is back loads it.
            return [NewOperation("load", asset_id, reason="running")] if self._pool.healthy() else []
        if spec.desired == "disabled" and holders:
            if await self._repo.active(asset_id, "unload"):
                return []
            return [NewOperation("unload", asset_id, force=True, reason="disabled")]
        if spec.desired == "on-demand" and spec.auto_sleep_min and holders:
            idle_after = spec.auto_sleep_min * self._sleep_unit_s
            sleepy = [w for w in holders if _idle_s(w, asset_id, now) >= idle_after]
            if sleepy and not await self._repo.active(asset_id, "unload"):
                return [NewOperation("unload", asset_id, worker_id=w.worker_id, reason="sleep")
                        for w in sleepy]
        return []


    def _loadable(self, record: AssetRecord, now: datetime) -> bool:
        """Whether a `running` asset held nowhere may be loaded now: not while it installs, and
        a failed one only once its cooldown has passed."""
        if record.state == "installing":
            return False
        return cooldown_left_s(record, self._failure_cooldown_s, now) == 0

    def _engine_failure(self, record: AssetRecord) -> str:
        """An idempotency key for reloading the asset after its engine died on a worker, at its
        current revision ('' when no worker reports such a failure): one reload per failure."""
        for worker in self._pool.healthy():
            for failed in worker.info.failed_models if worker.info else ():
                if (failed.asset_id == record.spec.asset_id and failed.stage == "engine"
                        and failed.revision == record.revision):
                    stamp = failed.failed_at.ToMicroseconds()
                    return f"recover:{record.spec.asset_id}:{worker.worker_id}:{stamp}"
        return ""


def _idle_s(worker: WorkerHandle, asset_id: str, now: datetime) -> float:
    """Seconds since the model's last request on `worker`; 0 while a request runs."""
    assert worker.info is not None
    for model in worker.info.models:
        if model.asset_id == asset_id:
            if model.in_flight:
                return 0.0
            return (now - model.last_used_at.ToDatetime(tzinfo=UTC)).total_seconds()
    return 0.0
