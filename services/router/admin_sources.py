"""Where this router's admin statistics come from: the catalog, the worker pool's pictures, the
admission gates, the jobs service's `GetStorage` and the usage ledger's pool, converted to the
plain shapes of `services.router.stats` here (the one place that reads those messages for it)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from roundhouse.v1 import jobs_pb2, worker_pb2
from services.common.workerpool import WorkerPool
from services.router.stats import AdminStats, FailedHere, HeldModel, StoreUse, WorkerView

if TYPE_CHECKING:
    import asyncpg

    from roundhouse.v1.jobs_pb2_grpc import JobsStub
    from services.router.gateway import Gateway

log = logging.getLogger(__name__)

STORAGE_TIMEOUT_S = 10.0


def _when(value: Timestamp, present: bool) -> datetime | None:
    return value.ToDatetime(tzinfo=UTC) if present else None


def held_model(model: worker_pb2.LoadedModel) -> HeldModel:
    """A worker's `LoadedModel` as the statistics show it."""
    return HeldModel(asset_id=model.asset_id, memory_bytes=model.memory_bytes, in_flight=model.in_flight,
                     waiting=model.waiting, max_concurrency=model.max_concurrency,
                     loaded_at=_when(model.loaded_at, model.HasField("loaded_at")),
                     last_used_at=_when(model.last_used_at, model.HasField("last_used_at")))


def worker_views(pool: WorkerPool) -> list[WorkerView]:
    """Every worker the pool knows, from its current picture (the last one while it does not
    answer, with `healthy` false)."""
    views = []
    for worker in pool.workers:
        info = worker.info or worker.last_info or worker_pb2.WorkerInfo()
        views.append(WorkerView(
            address=worker.address, worker_id=worker.worker_id or info.worker_id, healthy=worker.healthy,
            draining=info.draining, memory_used_bytes=info.memory_used_bytes,
            memory_budget_bytes=info.memory_budget_bytes, has_gpu=info.has_gpu,
            gpu_memory_used_bytes=info.gpu_memory_used_bytes, gpu_memory_total_bytes=info.gpu_memory_total_bytes,
            models=[held_model(m) for m in info.models],
            failed=[FailedHere(asset_id=f.asset_id, reason=f.reason, stage=f.stage)
                    for f in info.failed_models]))
    return views


def store_use(storage: jobs_pb2.Storage) -> StoreUse:
    """The jobs service's `Storage` as the statistics show it."""
    return StoreUse(path=storage.path, used_bytes=storage.used_bytes, quota_bytes=storage.quota_bytes,
                    assets={a.asset_id: a.bytes for a in storage.assets})


def admin_stats(gateway: Gateway, jobs: JobsStub, pool: asyncpg.Pool | None = None) -> AdminStats:
    """The statistics of the router around `gateway`; without `pool` (the usage ledger's
    database) they have no request figures."""

    async def storage() -> StoreUse | None:
        try:
            reply = await jobs.GetStorage(jobs_pb2.GetStorageRequest(), timeout=STORAGE_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            log.warning("the jobs service did not say how much of the store is used: %s",
                        exc.code().name)
            return None
        return store_use(reply)

    return AdminStats(assets=gateway.catalog.snapshot, workers=lambda: worker_views(gateway.workers),
                      gates=gateway.admission.stats, storage=storage, pool=pool,
                      flush=gateway.usage.flush if pool is not None else None)
