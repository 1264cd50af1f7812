"""The worker's domain: which models it holds, their memory and requests in flight, and which
failed here."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from services.common.asset_proto import AssetRecord
from services.common.errors import FailedPrecondition, ModelNotReady, NotFound, QuotaExceeded
from services.common.events import EventBus
from services.common.modelstore.store import ModelStore
from services.worker.admission import Intake, shutting_down, wait_s
from services.worker.failures import FailedModels
from services.worker.gpu import gpu_memory
from services.worker.holdings import (
    MIB,
    HeldModel,
    Lease,
    LoadedModelInfo,
    WorkerState,
    mib,
    not_held_error,
    unloaded_error,
)
from services.worker.loading import Loader, MemoryBudget, load_from_store, load_within
from services.worker.metering import RequestMeter, loading
from services.worker.metrics import WorkerMetrics
from services.worker.model_events import UNLOAD_EVENTS, ModelEvents
from services.worker.models import ChatParams

log = logging.getLogger(__name__)

ChangeListener = Callable[[], None]


class ModelHost:
    """Loads, holds, serves and unloads models; one failing model never affects the others.

    Loads run in a thread, so the event loop keeps serving the models already held.
    Each held model admits `policy.max_concurrency` requests at once and queues the next
    ones (see `ModelSlots`); `drain` closes the worker to new work before it stops.
    A held model that fails (its engine dies) is dropped at once: its requests end with
    `ModelNotReady`, new ones get `NotFound`, and it is closed. Failed loads and dropped
    models are remembered (`info().failed_models`) until the asset loads again.
    Events (`model.loading`, `model.loaded`, `model.load_failed`, `model.degraded`, and on
    unload `model.unloaded`, `model.evicted` or `model.sleeping` by reason) are published
    best effort when a bus is attached, in order, without holding up the work they report:
    a load starts while `model.loading` is on its way, and answers before `model.loaded` is
    acknowledged.
    Requests, loads and unloads are counted in `metrics`, whose gauges read `held_models`.
    """

    def __init__(
        self,
        *,
        store: ModelStore,
        memory_budget_bytes: int,
        bus: EventBus | None = None,
        loader: Loader = load_from_store,
        worker_id: str = "worker",
        address: str = "",
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.address = address
        self.started_at = datetime.now(UTC)
        self._store = store
        self._events = ModelEvents(bus)
        self._loader = loader
        self._held: dict[str, HeldModel] = {}
        self._loading: dict[str, asyncio.Task[HeldModel]] = {}
        self._budget = MemoryBudget(memory_budget_bytes, self._held)
        self._failures = FailedModels(self._publish, self._held)
        self._change_listeners: list[ChangeListener] = []
        self._intake = Intake()
        self._seq = 0
        self.metrics = metrics or WorkerMetrics()
        self.metrics.watch(self)

    def identify(self, worker_id: str, address: str) -> None:
        """Name the worker once its port is known."""
        self.worker_id, self.address = worker_id, address

    def attach_bus(self, bus: EventBus | None) -> None:
        """Publish events on `bus` from now on (None: stop publishing)."""
        self._events.bus = bus

    def on_change(self, listener: ChangeListener) -> None:
        """Call `listener` (synchronously, on the loop) once `info()` shows a change no request
        answers: a held model failed and was dropped, or the worker started to drain. The
        heartbeat then reports it without waiting its turn."""
        self._change_listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._change_listeners:
            try:
                listener()
            except Exception:
                log.exception("worker change listener failed")

    @property
    def memory_budget_bytes(self) -> int:
        """The memory the worker may fill with models."""
        return self._budget.budget_bytes

    @property
    def memory_used_bytes(self) -> int:
        """Memory of every held model."""
        return self._budget.used_bytes

    def held_models(self) -> tuple[HeldModel, ...]:
        """The models held now (copied in one step: safe to call from another thread)."""
        return tuple(self._held.values())

    def info(self) -> WorkerState:
        """A snapshot of the worker and every model it holds; each one's `seq` is one more
        than the last one's."""
        self._seq += 1
        return WorkerState(
            worker_id=self.worker_id,
            address=self.address,
            memory_budget_bytes=self.memory_budget_bytes,
            memory_used_bytes=self.memory_used_bytes,
            started_at=self.started_at,
            models=tuple(h.snapshot() for h in self._held.values()),
            failed_models=self._failures.all(),
            seq=self._seq,
            draining=self._intake.draining,
            gpu=gpu_memory(),
        )

    async def load(self, record: AssetRecord) -> LoadedModelInfo:
        """Hold `record`'s model; a no-op when that revision is held.

        Concurrent loads of one asset share one load. Raises `FailedPrecondition` when the
        model is not installed, `QuotaExceeded` when it does not fit the memory budget and
        `ShuttingDown` once the worker drains.
        """
        self._intake.refuse_if_draining(self.worker_id)
        asset_id = record.spec.asset_id
        held = self._held.get(asset_id)
        if held is not None and held.record.revision == record.revision:
            return held.snapshot()
        task = self._loading.get(asset_id)
        if task is None:
            task = asyncio.create_task(self._load(record, replacing=held), name=f"load-{asset_id}")
            self._loading[asset_id] = task
            task.add_done_callback(lambda done: self._load_done(asset_id, done))
        # A caller that gives up (deadline, cancel) leaves the load running for the others.
        return (await asyncio.shield(task)).snapshot()

    def _load_done(self, asset_id: str, task: asyncio.Task[HeldModel]) -> None:
        self._loading.pop(asset_id, None)
        if not task.cancelled():
            task.exception()  # retrieved here too, in case every waiter gave up

    async def _load(self, record: AssetRecord, replacing: HeldModel | None) -> HeldModel:
        with loading(self.metrics, record, self.worker_id):
            return await self._load_held(record, replacing)

    async def _load_held(self, record: AssetRecord, replacing: HeldModel | None) -> HeldModel:
        asset_id = record.spec.asset_id
        declared = (record.spec.resources.memory_mb or 0) * MIB
        try:
            self._budget.check(asset_id, declared, replacing, self.worker_id)
        except QuotaExceeded as exc:
            self._failures.load_failed(record, exc.message)
            raise
        self._publish("model.loading", asset_id)
        try:
            held = await load_within(self._budget, record, replacing, lambda: self._loader(record, self._store),
                                     self.worker_id)
        except Exception as exc:
            reason = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            log.warning("loading %s failed: %s", asset_id, reason)
            self._failures.load_failed(record, reason)
            raise
        # What it replaces now: the model `replacing` names may have been unloaded or dropped.
        previous = self._held.get(asset_id)
        if previous is not None:  # its running requests keep their slots: one count for both
            held.slots = previous.slots
            held.slots.apply(record.spec.policy)
        self._held[asset_id] = held
        self._failures.forget(asset_id)
        held.model.on_failure(lambda reason: self._model_failed(held, reason))
        held.model.on_forward_pass(self.metrics.model(record.spec).batch_size.observe)
        if previous is not None:
            await self._retire(previous)
        log.info("loaded %s in %.2fs (%s)", asset_id, held.load_seconds, mib(held.memory_bytes))
        self._publish("model.loaded", asset_id, load_seconds=held.load_seconds,
                      memory_bytes=held.memory_bytes)
        return held

    def _model_failed(self, held: HeldModel, reason: str) -> None:
        """A held model's engine died (called on the loop): drop it now, close it and tell."""
        if self._failures.drop(held, reason, self.worker_id):
            self.metrics.unloaded(held.record.spec, "failed", held.idle_seconds)
            self._changed()

    async def _retire(self, old: HeldModel) -> None:
        """Close a replaced revision now, or when its last running request ends."""
        old.retiring = True
        if old.in_flight == 0:
            await old.model.close()

    async def unload(
        self, asset_id: str, *, force: bool = False, reason: str = "", evicted_for: str = ""
    ) -> int:
        """Release a model and return the bytes freed.

        Refuses with `FailedPrecondition` while requests are in flight or queued unless
        `force`; forced, those requests fail as not ready.
        """
        held = self._held.get(asset_id)
        if held is None:
            raise NotFound(f"model '{asset_id}' is not loaded on worker {self.worker_id}")
        if (held.slots.running or held.slots.waiting) and not force:
            raise FailedPrecondition(
                f"model '{asset_id}' has {held.slots.running} request(s) in flight and "
                f"{held.slots.waiting} queued on worker {self.worker_id}; wait for them or unload "
                "with force"
            )
        del self._held[asset_id]
        held.slots.refuse_waiters(lambda: unloaded_error(asset_id, self.worker_id, waiting=True))
        held.unloaded = held.in_flight > 0
        idle = held.idle_seconds
        await held.model.close()
        log.info("unloaded %s (%s): freed %s", asset_id, reason or "operator", mib(held.memory_bytes))
        self.metrics.unloaded(held.record.spec, reason or "operator", idle)
        self._publish(UNLOAD_EVENTS.get(reason, "model.unloaded"), asset_id,
                      reason=reason or "operator", memory_bytes=held.memory_bytes,
                      idle_seconds=idle, evicted_for=evicted_for)
        return held.memory_bytes

    @asynccontextmanager
    async def use(
        self, asset_id: str, *, queue_timeout_s: float | None = None, deadline_s: float | None = None,
        counts_as_use: bool = True,
    ) -> AsyncIterator[Lease]:
        """A lease on the model for one request, holding one of its slots while the body runs.

        Waits for a slot up to `queue_timeout_s` (None: the model's `policy.queue_timeout_s`)
        and never past `deadline_s`, the seconds the call has left; raises `Overloaded` when
        none comes in that time or the queue is full. Raises `NotFound` when the model is not
        held (`ModelNotReady` while it is loading) and `ShuttingDown` while the worker drains.
        `counts_as_use` False (a route's shadow copy): the model's idle clock is left alone.
        """
        with RequestMeter(self.metrics, asset_id) as meter, self._intake.entered(self.worker_id):
            waited_for = self._serving(asset_id)
            meter.model(waited_for.record.spec)
            slots = waited_for.slots
            with meter.queue():
                await slots.acquire(wait_s(slots.policy, queue_timeout_s, deadline_s))
            try:
                # The revision held now: a newer one may have replaced it while this request waited.
                held = self._held.get(asset_id)
                if held is None or held.slots is not slots:
                    raise unloaded_error(asset_id, self.worker_id, waiting=True)
                async with held.lease(self.worker_id, meter, touch=counts_as_use) as lease:
                    yield lease
            finally:
                slots.release()

    async def count_tokens(self, asset_id: str, params: ChatParams) -> int:
        """The prompt tokens `params` would use on the held model, without generating.

        Counting takes no slot (it waits behind no generation) but counts as use of the model.
        Raises as `use` does when the model is not held, and `FailedPrecondition` when the model
        cannot count (see `HostedModel.count_prompt_tokens`).
        """
        with self._intake.entered(self.worker_id):
            held = self._serving(asset_id)
            held.touch()
            return await held.model.count_prompt_tokens(params)

    def _serving(self, asset_id: str) -> HeldModel:
        """The held model of `asset_id`; `ModelNotReady` while it loads, else `NotFound`."""
        held = self._held.get(asset_id)
        if held is None:
            if asset_id in self._loading:
                raise ModelNotReady(f"model '{asset_id}' is still loading on worker {self.worker_id}")
            raise not_held_error(asset_id, self.worker_id, self._failures.get(asset_id))
        return held

    async def drain(self, timeout_s: float) -> None:
        """Take no new work from now on and wait for the running requests to end.

        New requests and loads are refused with `ShuttingDown`, and so are the requests
        queued for a slot; `info().draining` is true. Returns once every running request has
        ended, or after `timeout_s` with the rest still running (the caller then cuts them).
        """
        if not self._intake.draining:
            log.info("worker %s draining: no new work", self.worker_id)
        self._intake.close()
        for held in self._held.values():
            held.slots.refuse_waiters(lambda: shutting_down(self.worker_id))
        self._changed()
        await self._intake.emptied(timeout_s)

    async def close(self) -> None:
        """Stop loads in progress and unload everything (at shutdown)."""
        for task in list(self._loading.values()):
            task.cancel()
        for asset_id in list(self._held):
            await self.unload(asset_id, force=True, reason="shutdown")
        await self._failures.dropped()
        await self.events_sent()

    def _publish(self, kind: str, asset_id: str, **detail: Any) -> None:
        self._events.publish(kind, asset_id, self.worker_id, **detail)

    async def events_sent(self) -> None:
        """Wait until every event published so far has been sent (or failed to be)."""
        await self._events.sent()

