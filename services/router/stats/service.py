"""`AdminStats`: every model's state and figures, totals, resources and usage series, from the
catalog, the workers, this router's admission gates, the jobs service and the usage ledger.

A model's state, first that applies: `disabled` (desired so), `loaded` (a healthy worker holds
it), `failed` (a worker reports it failed, or the registry does), `loading` (the registry says a
load is under way), `not_installed` (registered or still installing), else `sleeping`
(installed, held nowhere: the next request wakes it).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import asyncpg

from services.common.asset_proto import AssetRecord
from services.common.route_proto import Stored
from services.router.admission import GateStats
from services.router.stats import ledger
from services.router.stats.model import (
    ModelState,
    ModelStats,
    RequestFigures,
    Resources,
    SeriesBy,
    SeriesPoint,
    StoreUse,
    Summary,
    WorkerResources,
    WorkerView,
)

log = logging.getLogger(__name__)

MAX_BUCKETS = 1000
"""The most buckets a usage series has: a finer `bucket_s` is widened to fit."""
_DETECTED = (("tools", "supports_tools"), ("system_role", "supports_system_role"),
             ("streaming", "streaming"))


def capabilities_of(record: AssetRecord) -> list[str]:
    """What a model can do: `chat` and `completions` (a language model), `embeddings`, and
    what its load detected: `tools`, `system_role`, `streaming`."""
    found = set()
    if "llm-runtime" in record.spec.interface:
        found |= {"chat", "completions"}
    if "embedding-runtime" in record.spec.interface:
        found.add("embeddings")
    detected = record.capabilities or {}
    found |= {name for name, flag in _DETECTED if detected.get(flag)}
    return sorted(found)


def series_bucket(window_s: int, bucket_s: int) -> int:
    """The bucket a series over `window_s` uses for a requested `bucket_s`: at least
    `window_s / MAX_BUCKETS`, so a series never has more than `MAX_BUCKETS` buckets."""
    return max(bucket_s, -(-window_s // MAX_BUCKETS), 1)


class AdminStats:
    """The admin statistics of one router (its usage figures are every router's: the ledger is
    shared). Each source is a callable so that the composition root decides where it comes from."""

    def __init__(
        self, *, assets: Callable[[], Awaitable[list[Stored]]], workers: Callable[[], list[WorkerView]],
        gates: Callable[[str], GateStats], storage: Callable[[], Awaitable[StoreUse | None]],
        pool: asyncpg.Pool | None = None, flush: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """`assets`: every stored asset (routes are skipped); `workers`: the workers now;
        `gates`: this router's admission of an asset; `storage`: the model store's disk (None
        when unknown); `pool`: the usage ledger's database (None: no figures); `flush`: write
        this router's buffered ledger rows before reading."""
        self._assets, self._workers, self._gates, self._storage = assets, workers, gates, storage
        self._pool, self._flush = pool, flush

    async def models(self, *, runtime: str = "", capability: str = "", state: str = "",
                     interface: str = "", window_s: int = 3600, figures: bool = True) -> list[ModelStats]:
        """Every model matching the filters ('' matches all), by asset id, with its figures over
        the last `window_s` seconds; with `figures` false, empty figures and no ledger read (for
        views that show only states)."""
        by_model = await self._figures(window_s) if figures else {}
        workers = self._workers()
        found = []
        for record in await self._assets():
            if not isinstance(record, AssetRecord):
                continue
            stats = self._model(record, workers, by_model.get(record.spec.asset_id, RequestFigures()))
            if ((not runtime or stats.runtime == runtime) and (not state or stats.state == state)
                    and (not capability or capability in stats.capabilities)
                    and (not interface or interface in stats.interfaces)):
                found.append(stats)
        return sorted(found, key=lambda s: s.asset_id)

    async def summary(self, window_s: int = 3600) -> Summary:
        """Models counted by runtime, capability, state and interface; every request over the
        last `window_s` seconds (those that reached no model too)."""
        models = await self.models(window_s=window_s, figures=False)
        totals = RequestFigures()
        if self._pool is not None:
            await self._flushed()
            totals = await ledger.total_figures(self._pool, _since(window_s))
        return Summary(
            window_s=window_s, models=len(models),
            by_runtime=dict(Counter(m.runtime for m in models)),
            by_capability=dict(Counter(c for m in models for c in m.capabilities)),
            by_state=dict(Counter(m.state for m in models)),
            by_interface=dict(Counter(i for m in models for i in m.interfaces)),
            requests=totals)

    async def resources(self) -> Resources:
        """The model store's disk against its quota, and each worker's memory and models."""
        try:
            store = await self._storage()
        except Exception:  # the figures stand without the store; say why in the log
            log.warning("model store usage unavailable", exc_info=True)
            store = None
        workers = [WorkerResources(
            worker_id=w.worker_id, address=w.address, healthy=w.healthy, draining=w.draining,
            memory_used_bytes=w.memory_used_bytes, memory_budget_bytes=w.memory_budget_bytes,
            has_gpu=w.has_gpu, models=list(w.models), gpu_memory_used_bytes=w.gpu_memory_used_bytes,
            gpu_memory_total_bytes=w.gpu_memory_total_bytes) for w in self._workers()]
        return Resources(store=store, workers=workers)

    async def usage_series(self, window_s: int, bucket_s: int, by: SeriesBy) -> list[SeriesPoint]:
        """Requests, errors and tokens per bucket and per model (asset id) or key (name) over the
        last `window_s` seconds, buckets of `series_bucket(window_s, bucket_s)` seconds aligned
        on the window's start; buckets without requests are left out."""
        if self._pool is None:
            return []
        await self._flushed()
        return await ledger.series(self._pool, _since(window_s), series_bucket(window_s, bucket_s), by)

    async def _figures(self, window_s: int) -> dict[str, RequestFigures]:
        if self._pool is None:
            return {}
        await self._flushed()
        return await ledger.figures_by_model(self._pool, _since(window_s))

    async def _flushed(self) -> None:
        if self._flush is None:
            return
        try:
            await self._flush()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            log.warning("admin statistics read without this router's latest requests", exc_info=True)

    def _model(self, record: AssetRecord, workers: list[WorkerView], figures: RequestFigures) -> ModelStats:
        spec = record.spec
        asset_id = spec.asset_id
        held = [(w, m) for w in workers if w.healthy for m in w.models if m.asset_id == asset_id]
        failures = [f for w in workers if w.healthy for f in w.failed if f.asset_id == asset_id]
        gate = self._gates(asset_id)
        now = datetime.now(UTC)
        idle = [0.0 if m.in_flight else (now - m.last_used_at).total_seconds()
                for _, m in held if m.last_used_at is not None]
        failure = failures[0].reason if failures else str(record.status.get("message", ""))
        state = _state(record, bool(held), bool(failures))
        return ModelStats(
            asset_id=asset_id, display_name=spec.display_name, interfaces=list(spec.interface),
            runtime=spec.runtime, capabilities=capabilities_of(record), state=state,
            desired=spec.desired, workers=[w.worker_id for w, _ in held],
            memory_bytes=sum(m.memory_bytes for _, m in held),
            # Holders' pictures lag this router's own count by a refresh: take the larger.
            in_flight=max(gate.in_flight, sum(m.in_flight for _, m in held)),
            queued=gate.waiting + sum(m.waiting for _, m in held),
            idle_s=max(0.0, min(idle)) if idle else None,
            failure=failure if state == "failed" else "", figures=figures)


def _state(record: AssetRecord, held: bool, failed_on_worker: bool) -> ModelState:
    if record.spec.desired == "disabled":
        return "disabled"
    if held:
        return "loaded"
    if failed_on_worker or record.state == "failed":
        return "failed"
    if record.state == "loading":
        return "loading"
    if record.state in ("registered", "installing"):
        return "not_installed"
    return "sleeping"


def _since(window_s: int) -> datetime:
    return datetime.now(UTC) - timedelta(seconds=window_s)
