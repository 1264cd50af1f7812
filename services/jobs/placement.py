"""Where a load goes and what it evicts: a pure decision over the workers' last reports.

A load goes to the worker with the most free memory when one has room. Otherwise idle models
are evicted least recently used first, counting bytes, on the worker where the models to
evict are the least recently used (ties: fewer bytes evicted). Never evicted: a model with
requests in flight (the router queues only behind busy slots, so a model with requests
waiting has requests in flight too), and a `running` one unless the load is forced.

Nor, unless the load is forced, a model loaded less than its hold ago (`Hold`: its
`lifecycle.min_resident_s`, longer while it is caught thrashing): two models that do not fit
together are not reloaded on every request. A load that only such models stand in the way of
fails with `ModelNotReady` (503, retry after the shortest hold left), never evicting them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from roundhouse.v1 import worker_pb2
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
class Hold:
    """How long a loaded model stays before it may be evicted for another, and why."""

    seconds: float
    why: str = "its lifecycle.min_resident_s"


NO_HOLD = Hold(0.0, "")


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
    hold_of: Callable[[str, str], Hold] = lambda worker_id, asset_id: NO_HOLD,
) -> Placement:
    """Choose where `asset_id` (`needed_bytes`) loads; `QuotaExceeded` when nowhere can fit it,
    `ModelNotReady` (worth a retry) when no worker is up or only models still within their hold
    stand in the way.

    `desired_of(asset_id)` gives a held model's desired state (`on-demand`, `running`, ...);
    `hold_of(worker_id, asset_id)` how long it stays after its load. `force` overrides both.
    """
    reporting = _reporting(workers)
    if not reporting:
        raise ModelNotReady(f"cannot load '{asset_id}' now: no worker is available", retry_after_s=5)
    roomy = [w for w in reporting if w.free_bytes >= needed_bytes]
    if roomy:
        return Placement(max(roomy, key=lambda w: w.free_bytes))
    options: list[tuple[datetime, int, Placement]] = []
    held: list[tuple[float, str]] = []
    for worker in reporting:
        assert worker.info is not None
        if worker.info.memory_budget_bytes < needed_bytes:
            continue
        idle = [m for m in worker.info.models
                if m.in_flight == 0 and m.asset_id != asset_id
                and (desired_of(m.asset_id) != "running" or force)]
        holds = {m.asset_id: NO_HOLD if force else hold_of(worker.worker_id, m.asset_id) for m in idle}
        left = {m.asset_id: holds[m.asset_id].seconds - _age_s(m, now) for m in idle}
        evictable = [m for m in idle if left[m.asset_id] <= 0]
        if placement := _evicting(worker, evictable, needed_bytes, now):
            options.append(placement)
        elif _evicting(worker, idle, needed_bytes, now):
            held.extend((left[m.asset_id], _held(m, worker.worker_id, holds[m.asset_id], now))
                        for m in idle if left[m.asset_id] > 0)
    if options:
        return min(options, key=lambda o: (o[0], o[1]))[2]
    if held:
        wait_s = max(1, math.ceil(min(s for s, _ in held)))
        raise ModelNotReady(
            f"cannot load '{asset_id}' yet: the models that could make room were loaded too "
            f"recently to be evicted ({'; '.join(why for _, why in held)}); retry in {wait_s}s",
            retry_after_s=wait_s)
    raise QuotaExceeded(_no_room(reporting, asset_id, needed_bytes))


def _evicting(worker: WorkerHandle, candidates: list[worker_pb2.LoadedModel], needed_bytes: int,
              now: datetime) -> tuple[datetime, int, Placement] | None:
    """Evict `candidates`, least recently used first, until `needed_bytes` fit on `worker`: the
    newest use among the victims, the bytes evicted and the placement; None if they cannot."""
    free, chosen, newest_use = worker.free_bytes, [], now
    for model in sorted(candidates, key=lambda m: m.last_used_at.ToDatetime(tzinfo=UTC)):
        if free >= needed_bytes:
            break
        newest_use = model.last_used_at.ToDatetime(tzinfo=UTC)
        chosen.append(Victim(worker.worker_id, model.asset_id, model.memory_bytes,
                             max((now - newest_use).total_seconds(), 0.0)))
        free += model.memory_bytes
    if free < needed_bytes or not chosen:
        return None
    return newest_use, sum(v.memory_bytes for v in chosen), Placement(worker, tuple(chosen))


def _age_s(model: worker_pb2.LoadedModel, now: datetime) -> float:
    return (now - model.loaded_at.ToDatetime(tzinfo=UTC)).total_seconds()


def _held(model: worker_pb2.LoadedModel, worker_id: str, hold: Hold, now: datetime) -> str:
    return (f"'{model.asset_id}' on {worker_id} was loaded {max(_age_s(model, now), 0):.0f}s ago "
            f"and stays {hold.seconds:.0f}s: {hold.why}")


def _no_room(workers: list[WorkerHandle], asset_id: str, needed_bytes: int) -> str:
    held = "; ".join(
        f"{w.worker_id}: {human_bytes(w.free_bytes)} free, holds "
        + (", ".join(f"{m.asset_id} ({m.in_flight} in flight)" for m in w.info.models) or "nothing")
        for w in workers if w.info is not None
    )
    return (f"cannot load '{asset_id}' ({human_bytes(needed_bytes)}): no worker has room, and the "
            f"models that could make room are busy or kept running ({held})")
