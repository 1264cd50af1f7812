"""How a worker loads a model: from its model store, within its memory budget."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime

from services.common.asset_proto import AssetRecord
from services.common.errors import FailedPrecondition, QuotaExceeded
from services.common.modelstore.store import ModelStore
from services.common.upstreams import DEFAULT_UPSTREAM_RULES, UpstreamRules
from services.worker.admission import ModelSlots
from services.worker.holdings import MIB, HeldModel, mib
from services.worker.models import HostedModel, load_model

Loader = Callable[[AssetRecord, ModelStore], HostedModel]


def load_from_store(
    record: AssetRecord, store: ModelStore, *, upstreams: UpstreamRules = DEFAULT_UPSTREAM_RULES
) -> HostedModel:
    """Load an asset from the worker's model store (blocking: run it in a thread).

    Remote (`url`) assets count as installed with no folder, and are checked against
    `upstreams` first.
    """
    installed = store.installed(record.spec)
    if installed is None:
        raise FailedPrecondition(
            f"model '{record.spec.asset_id}' is not installed in the model store at "
            f"{store.root}; install it first"
        )
    return load_model(record.spec, installed.path, upstreams=upstreams)


class MemoryBudget:
    """The memory a worker may fill with models: what the held models use, and the room loads
    in progress reserve.

    A load is checked twice: before it starts, against what its spec declares, and once its
    model is in memory, against what it measures; its reservation holds in between.
    """

    def __init__(self, budget_bytes: int, held: Mapping[str, HeldModel]) -> None:
        self.budget_bytes = budget_bytes
        self._held = held
        self._reserved: dict[str, int] = {}

    @property
    def used_bytes(self) -> int:
        """Memory of every held model."""
        return sum(h.memory_bytes for h in self._held.values())

    @contextmanager
    def reserving(self, asset_id: str, size: int) -> Iterator[None]:
        """Hold `size` bytes for the load of `asset_id` while the body runs."""
        self._reserved[asset_id] = size
        try:
            yield
        finally:
            self._reserved.pop(asset_id, None)

    def check(self, asset_id: str, needed: int, replacing: HeldModel | None, worker_id: str) -> None:
        """Raise `QuotaExceeded` unless `needed` bytes fit beside the held models and the loads
        in progress, less `replacing` (the model a load replaces, if it is still held: it may
        have been unloaded or dropped as failed meanwhile)."""
        still_held = replacing is not None and self._held.get(replacing.asset_id) is replacing
        held = self.used_bytes - (replacing.memory_bytes if replacing and still_held else 0)
        committed = held + sum(self._reserved.values())
        if committed + needed > self.budget_bytes:
            free = max(self.budget_bytes - committed, 0)
            raise QuotaExceeded(
                f"model '{asset_id}' needs {mib(needed)} but worker {worker_id} has "
                f"{mib(free)} free of its {mib(self.budget_bytes)} budget "
                f"({mib(committed)} in use); unload a model or raise ROUNDHOUSE_WORKER_MEMORY_MB"
            )


async def load_within(
    budget: MemoryBudget, record: AssetRecord, replacing: HeldModel | None, load: Callable[[], HostedModel],
    worker_id: str,
) -> HeldModel:
    """Run `load` in a thread with the room `record` declares reserved in `budget`, then check
    what the model measures against the budget; a model that does not fit is closed again
    (`QuotaExceeded`). The declared size is checked before, by the caller."""
    asset_id = record.spec.asset_id
    started = time.perf_counter()
    with budget.reserving(asset_id, (record.spec.resources.memory_mb or 0) * MIB):
        model = await asyncio.to_thread(load)
    now = datetime.now(UTC)
    held = HeldModel(record, model, now, now, time.perf_counter() - started, ModelSlots(asset_id, record.spec.policy))
    try:
        budget.check(asset_id, held.memory_bytes, replacing, worker_id)
    except QuotaExceeded:
        await model.close()
        raise
    return held
