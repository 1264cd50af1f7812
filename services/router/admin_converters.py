"""Admin statistics (`services.router.stats`) → `roundhouse.v1` Admin messages."""

from __future__ import annotations

from roundhouse.v1 import admin_pb2, jobs_pb2
from services.common.asset_proto import timestamp
from services.router.stats import HeldModel, ModelStats, RequestFigures, Resources, StoreUse, Summary

DEFAULT_WINDOW_S = 3600
"""The window a request that names none (0) gets."""


def window_of(window_s: int) -> int:
    """A request's window in seconds: its own, or `DEFAULT_WINDOW_S` for 0."""
    return window_s or DEFAULT_WINDOW_S


def figures_to_proto(figures: RequestFigures) -> admin_pb2.RequestFigures:
    """Request figures → message (percentiles and rate absent when unknown)."""
    optional = {name: value for name in ("p50_latency_ms", "p95_latency_ms", "p99_latency_ms",
                                         "p50_ttft_ms", "p95_ttft_ms", "p99_ttft_ms", "tokens_per_s")
                if (value := getattr(figures, name)) is not None}
    return admin_pb2.RequestFigures(
        requests=figures.requests, errors=figures.errors, error_rate=figures.error_rate,
        prompt_tokens=figures.prompt_tokens, completion_tokens=figures.completion_tokens, **optional)


def model_to_proto(stats: ModelStats) -> admin_pb2.ModelStats:
    """One model's statistics → message."""
    return admin_pb2.ModelStats(
        asset_id=stats.asset_id, display_name=stats.display_name, interfaces=stats.interfaces,
        runtime=stats.runtime, capabilities=stats.capabilities, state=stats.state, desired=stats.desired,
        worker_ids=stats.workers, memory_bytes=stats.memory_bytes, in_flight=stats.in_flight,
        queued=stats.queued, idle_s=stats.idle_s, failure=stats.failure,
        figures=figures_to_proto(stats.figures))


def summary_to_proto(summary: Summary) -> admin_pb2.Summary:
    """Totals → message."""
    return admin_pb2.Summary(
        window_s=summary.window_s, models=summary.models, by_runtime=summary.by_runtime,
        by_capability=summary.by_capability, by_state=summary.by_state,
        by_interface=summary.by_interface, requests=figures_to_proto(summary.requests))


def _held(model: HeldModel) -> admin_pb2.HeldModel:
    return admin_pb2.HeldModel(
        asset_id=model.asset_id, memory_bytes=model.memory_bytes, in_flight=model.in_flight,
        waiting=model.waiting, max_concurrency=model.max_concurrency,
        loaded_at=timestamp(model.loaded_at), last_used_at=timestamp(model.last_used_at))


def _store(store: StoreUse) -> jobs_pb2.Storage:
    return jobs_pb2.Storage(
        path=store.path, used_bytes=store.used_bytes, quota_bytes=store.quota_bytes,
        assets=[jobs_pb2.AssetStorage(asset_id=a, bytes=b) for a, b in store.assets.items()])


def resources_to_proto(resources: Resources) -> admin_pb2.ResourceUse:
    """Store and workers → message."""
    return admin_pb2.ResourceUse(
        store=_store(resources.store) if resources.store is not None else None,
        workers=[admin_pb2.WorkerResources(
            worker_id=w.worker_id, address=w.address, healthy=w.healthy, draining=w.draining,
            memory_used_bytes=w.memory_used_bytes, memory_budget_bytes=w.memory_budget_bytes,
            has_gpu=w.has_gpu, models=[_held(m) for m in w.models],
            gpu_memory_used_bytes=w.gpu_memory_used_bytes, gpu_memory_total_bytes=w.gpu_memory_total_bytes,
        ) for w in resources.workers])
