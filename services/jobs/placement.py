"""Where a load goes and what it evicts: a pure decision over the workers' last reports.

A load goes to the worker with the most free memory when one has room. Otherwise idle models
are evicted least recently used first, counting bytes, on the worker where the models to
evict are the least recently used (ties: fewer bytes evicted). Never evicted: a model with
requests in flight (the router queues only behind busy slots, so a model with requests
waiting has requests in flight too), and a `running` one unless the load is forced.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from services.common.errors import ModelNotReady, QuotaExceeded
from services.common.workerpool import WorkerHandle
from services.jobs.install import human_bytes


@dataclass(frozen=True)
class Victim:
    """A model to unload to make room."""

    worker_id: str
    asset_id: str
    memory_bytes: int
    idle_s: float


@dataclass(frozen=True)
class Placement:
    """The worker to load on and the models to evict there first (oldest use first)."""

    worker: WorkerHandle
    victims: tuple[Victim, ...] = ()


def _reporting(workers: list[WorkerHandle]) -> list[WorkerHandle]:
    return [w for w in workers if w.healthy and w.info is not None]


def has_room(workers: list[WorkerHandle], needed_bytes: int) -> bool:
    """Whether a worker can take `needed_bytes` without evicting anything (then `plan_placement`
    never asks for a held model's desired state)."""
    return any(w.free_bytes >= needed_bytes for w in _reporting(workers))


def plan_placement(
    workers: list[WorkerHandle],
    asset_id: str,
    needed_bytes: int,
    desired_of: Callable[[str], str],
    *,
    now: datetime,
    force: bool = False,
) -> Placement:
    """Choose where `asset_id` (`needed_bytes`) loads; `QuotaExceeded` when nowhere can fit it,
    `ModelNotReady` (worth a retry) when no worker is up.

    `desired_of(asset_id)` gives a held model's desired state (`on-demand`, `running`, ...).
    """
    reporting = _reporting(workers)
    if not reporting:
        raise ModelNotReady(f"cannot load '{asset_id}' now: no worker is available", retry_after_s=5)
    roomy = [w for w in reporting if w.free_bytes >= needed_bytes]
    if roomy:
        return Placement(max(roomy, key=lambda w: w.free_bytes))
    options: list[tuple[datetime, int, Placement]] = []
    for worker in reporting:
        assert worker.info is not None
        if worker.info.memory_budget_bytes < needed_bytes:
            continue
        idle = sorted(
            (m for m in worker.info.models
             if m.in_flight == 0 and m.asset_id != asset_id
             and (desired_of(m.asset_id) != "running" or force)),
            key=lambda m: m.last_used_at.ToDatetime(tzinfo=UTC),
        )
        free, chosen, newest_use = worker.free_bytes, [], now
        for model in idle:
            if free >= needed_bytes:
                break
            newest_use = model.last_used_at.ToDatetime(tzinfo=UTC)
            chosen.append(Victim(worker.worker_id, model.asset_id, model.memory_bytes,
                                 max((now - newest_use).total_seconds(), 0.0)))
            free += model.memory_bytes
        if free >= needed_bytes and chosen:
            evicted = sum(v.memory_bytes for v in chosen)
            options.append((newest_use, evicted, Placement(worker, tuple(chosen))))
    if options:
        return min(options, key=lambda o: (o[0], o[1]))[2]
    raise QuotaExceeded(_no_room(reporting, asset_id, needed_bytes))


def _no_room(workers: list[WorkerHandle], asset_id: str, needed_bytes: int) -> str:
    held = "; ".join(
        f"{w.worker_id}: {human_bytes(w.free_bytes)} free, holds "
        + (", ".join(f"{m.asset_id} ({m.in_flight} in flight)" for m in w.info.models) or "nothing")
        for w in workers if w.info is not None
    )
    return (f"cannot load '{asset_id}' ({human_bytes(needed_bytes)}): no worker has room, and the "
            f"models that could make room are busy or kept running ({held})")
