"""`/admin/v1/stats/...`: the admin statistics over HTTP (an admin key is needed, as for every
`/admin/v1` route; see `auth`).

`window` and `bucket` are a count and a unit, `30s`, `5m`, `1h` or `7d`, as the schema's pattern
says (at most 9,999,999 s, 999,999 min, 99,999 h or 9,999 d); anything else is a 400 naming the
field. The figures come from the usage ledger, every router's requests included.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict

from services.router.admin_sources import admin_stats
from services.router.http.protocol import ErrorResponse
from services.router.stats import AdminStats, ModelState, RequestFigures, SeriesBy, series_bucket

DURATION_PATTERN = r"^([1-9][0-9]{0,6}s|[1-9][0-9]{0,5}m|[1-9][0-9]{0,4}h|[1-9][0-9]{0,3}d)$"
UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
Duration = Annotated[str, Query(pattern=DURATION_PATTERN, description="A count and a unit: `30s`, `5m`, `1h`, `7d`.")]
Capability = Literal["", "chat", "completions", "embeddings", "tools", "system_role", "streaming"]

stats_router = APIRouter(prefix="/admin/v1/stats", tags=["admin"])
INVALID: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "A parameter is invalid; `error.param` names it."}}
REGISTRY_DOWN: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorResponse, "description": "The registry is unavailable; see Retry-After."}}


def seconds(duration: str) -> int:
    """`30s`, `5m`, `1h`, `7d` → seconds (the text already matches `DURATION_PATTERN`)."""
    return int(duration[:-1]) * UNIT_S[duration[-1]]


def stats_of(request: Request) -> AdminStats:
    """The app's `AdminStats`; an app built without one gets one over its gateway and jobs
    service, without request figures (no ledger database)."""
    state = request.app.state
    if getattr(state, "stats", None) is None:
        state.stats = admin_stats(state.gateway, state.jobs)
    stats: AdminStats = state.stats
    return stats


class Figures(BaseModel):
    """What requests did over the window. Percentiles are null without requests (TTFT: without
    streamed answers); `tokens_per_s` is the completion tokens of the successful requests that
    produced any over those requests' summed latency (the rate a client saw), null without."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    requests: int
    errors: int
    """Requests that neither succeeded nor were cancelled by their client."""
    error_rate: float
    prompt_tokens: int
    completion_tokens: int
    p50_latency_ms: float | None
    p95_latency_ms: float | None
    p99_latency_ms: float | None
    p50_ttft_ms: float | None
    p95_ttft_ms: float | None
    p99_ttft_ms: float | None
    tokens_per_s: float | None


class ModelStatsView(Figures):
    """One model, its state, where it is held, and its requests over the window."""

    asset_id: str
    display_name: str
    interfaces: list[str]
    runtime: str
    capabilities: list[str]
    state: ModelState
    desired: str
    workers: list[str]
    """Ids of the workers holding it."""
    memory_bytes: int
    in_flight: int
    queued: int
    """Waiting at this router's admission and at its holders."""
    idle_s: float | None
    """Seconds since a request last started or finished on a holder; null when not held."""
    failure: str


class ModelStatsList(BaseModel):
    """`GET /admin/v1/stats/models`."""

    window_s: int
    models: list[ModelStatsView]


class SummaryView(BaseModel):
    """`GET /admin/v1/stats/summary`: models counted, and every request over the window."""

    window_s: int
    models: int
    by_runtime: dict[str, int]
    by_capability: dict[str, int]
    by_state: dict[str, int]
    by_interface: dict[str, int]
    requests: Figures


class AssetBytes(BaseModel):
    """One installed asset's bytes in the store."""

    asset_id: str
    bytes: int


class StoreView(BaseModel):
    """The model store's disk; `quota_bytes` 0: no quota."""

    path: str
    used_bytes: int
    quota_bytes: int
    assets: list[AssetBytes]


class HeldModelView(BaseModel):
    """A model a worker holds."""

    asset_id: str
    memory_bytes: int
    in_flight: int
    waiting: int
    max_concurrency: int
    loaded_at: datetime | None
    last_used_at: datetime | None


class WorkerResourcesView(BaseModel):
    """One worker's memory and models."""

    worker_id: str
    address: str
    healthy: bool
    draining: bool
    memory_used_bytes: int
    memory_budget_bytes: int
    has_gpu: bool
    models: list[HeldModelView]
    gpu_memory_used_bytes: int
    """VRAM in use on the worker's GPUs (0 without one)."""
    gpu_memory_total_bytes: int


class ResourcesView(BaseModel):
    """`GET /admin/v1/stats/resources`; `store` is null when the jobs service cannot say."""

    store: StoreView | None
    workers: list[WorkerResourcesView]


class SeriesPointView(BaseModel):
    """One bucket of one model (asset id) or key (name)."""

    start: datetime
    group: str
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int


class UsageSeries(BaseModel):
    """`GET /admin/v1/stats/usage`: buckets with requests, oldest first."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    window_s: int
    bucket_s: int
    """The bucket used: the one asked for, widened when the window would have more than 1000."""
    by: SeriesBy
    points: list[SeriesPointView]


def _figures(figures: RequestFigures) -> dict[str, Any]:
    return {**asdict(figures), "error_rate": figures.error_rate}


@stats_router.get("/models", response_model=ModelStatsList, responses={**INVALID, **REGISTRY_DOWN})
async def model_stats(
    request: Request,
    runtime: Annotated[Literal["", "transformers", "openai", "anthropic"], Query(description="Only this runtime.")] = "",
    capability: Annotated[Capability, Query(description="Only models with this capability.")] = "",
    state: Annotated[Literal["", ModelState], Query(description="Only models in this state.")] = "",
    interface: Annotated[Literal["", "llm-runtime", "embedding-runtime"], Query(
        description="Only models with this interface.")] = "",
    window: Duration = "1h",
) -> dict[str, Any]:
    """Every model matching the filters, by asset id: state (`loaded`, `loading`, `sleeping`,
    `failed`, `disabled`, `not_installed`), holders, memory, in flight and queued, and its
    requests over the window: counts, error rate, latency and TTFT percentiles, tokens/s."""
    window_s = seconds(window)
    models = await stats_of(request).models(runtime=runtime, capability=capability, state=state,
                                            interface=interface, window_s=window_s)
    return {"window_s": window_s, "models": [
        {"asset_id": m.asset_id, "display_name": m.display_name, "interfaces": m.interfaces,
         "runtime": m.runtime, "capabilities": m.capabilities, "state": m.state, "desired": m.desired,
         "workers": m.workers, "memory_bytes": m.memory_bytes, "in_flight": m.in_flight,
         "queued": m.queued, "idle_s": m.idle_s, "failure": m.failure, **_figures(m.figures)}
        for m in models]}


@stats_router.get("/summary", response_model=SummaryView, responses={**INVALID, **REGISTRY_DOWN})
async def summary(request: Request, window: Duration = "1h") -> dict[str, Any]:
    """Models counted by runtime, capability, state and interface; every request over the
    window (those that reached no model included)."""
    totals = await stats_of(request).summary(seconds(window))
    return {"window_s": totals.window_s, "models": totals.models, "by_runtime": totals.by_runtime,
            "by_capability": totals.by_capability, "by_state": totals.by_state,
            "by_interface": totals.by_interface, "requests": _figures(totals.requests)}


@stats_router.get("/resources", response_model=ResourcesView)
async def resources(request: Request) -> dict[str, Any]:
    """The model store's disk against its quota; each worker's memory used and budget, whether it
    has a GPU, and the models it holds."""
    found = await stats_of(request).resources()
    store = found.store
    return {
        "store": None if store is None else {
            "path": store.path, "used_bytes": store.used_bytes, "quota_bytes": store.quota_bytes,
            "assets": [{"asset_id": a, "bytes": b} for a, b in store.assets.items()]},
        "workers": [{"worker_id": w.worker_id, "address": w.address, "healthy": w.healthy,
                     "draining": w.draining, "memory_used_bytes": w.memory_used_bytes,
                     "memory_budget_bytes": w.memory_budget_bytes, "has_gpu": w.has_gpu,
                     "gpu_memory_used_bytes": w.gpu_memory_used_bytes,
                     "gpu_memory_total_bytes": w.gpu_memory_total_bytes,
                     "models": [vars(m) for m in w.models]} for w in found.workers]}


@stats_router.get("/usage", response_model=UsageSeries, responses=INVALID)
async def usage_series(
    request: Request, window: Duration = "24h", bucket: Duration = "1h",
    by: Annotated[SeriesBy, Query(description="One series per `model` (asset id) or `key` (name).")] = "model",
) -> dict[str, Any]:
    """Requests, errors and tokens per bucket and per model or key over the window, for charts;
    buckets are aligned on the window's start, and those without requests are left out."""
    window_s, bucket_s = seconds(window), seconds(bucket)
    points = await stats_of(request).usage_series(window_s, bucket_s, by)
    return {"window_s": window_s, "bucket_s": series_bucket(window_s, bucket_s), "by": by,
            "points": [vars(p) for p in points]}
