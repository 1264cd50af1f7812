"""What the admin statistics show: plain dataclasses, no protobuf.

`ModelStats` is one model's state, where it is held and what its requests did over a window;
`Summary` counts models and requests; `Resources` is the model store's disk and each worker's
memory; `SeriesPoint` is one bucket of a usage chart. `WorkerView` and `StoreUse` are what the
sources hand in (converted from the workers' and the jobs service's messages elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

ModelState = Literal["loaded", "loading", "sleeping", "failed", "disabled", "not_installed"]
SeriesBy = Literal["model", "key"]


@dataclass(frozen=True)
class HeldModel:
    """A model a worker holds, as the worker last reported it."""

    asset_id: str
    memory_bytes: int
    in_flight: int
    """Requests the worker serves for it now."""
    waiting: int
    """Requests waiting at the worker for one of its slots."""
    max_concurrency: int
    loaded_at: datetime | None
    last_used_at: datetime | None


@dataclass(frozen=True)
class FailedHere:
    """A model that failed on a worker (a load that failed, an engine that died)."""

    asset_id: str
    reason: str
    stage: str


@dataclass(frozen=True)
class WorkerView:
    """One worker as the router knows it."""

    address: str
    worker_id: str
    healthy: bool
    draining: bool
    memory_used_bytes: int
    memory_budget_bytes: int
    has_gpu: bool
    models: list[HeldModel] = field(default_factory=list)
    gpu_memory_used_bytes: int = 0
    gpu_memory_total_bytes: int = 0
    failed: list[FailedHere] = field(default_factory=list)


@dataclass(frozen=True)
class StoreUse:
    """The model store's disk: bytes used, the quota (0: none), bytes per installed asset."""

    path: str
    used_bytes: int
    quota_bytes: int
    assets: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestFigures:
    """What one model's (or all models') requests did over a window, from the usage ledger.

    Percentiles are `percentile_cont` over the window's requests; None when there were none
    (TTFT: none that streamed a first token). `tokens_per_s` is the completion tokens of the
    successful requests that produced any, divided by the summed wall time of those same
    requests (arrival to last byte, prompt processing and queueing included): the rate a
    client saw, not the decode speed alone."""

    requests: int = 0
    errors: int = 0
    """Requests that neither succeeded nor were cancelled by their client."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    p50_latency_ms: float | None = None
    p95_latency_ms: float | None = None
    p99_latency_ms: float | None = None
    p50_ttft_ms: float | None = None
    p95_ttft_ms: float | None = None
    p99_ttft_ms: float | None = None
    tokens_per_s: float | None = None

    @property
    def error_rate(self) -> float:
        """Errors over requests; 0 without requests."""
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class ModelStats:
    """One model: what it is, its state, where it is held and its requests over the window."""

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
    """Resident memory on all its holders together."""
    in_flight: int
    """Requests this router sends it now."""
    queued: int
    """Requests waiting at this router's admission gate, plus at its holders."""
    idle_s: float | None
    """Seconds since a request last started or finished on a holder; None when not held."""
    failure: str
    """Why it failed, when its state is `failed`."""
    figures: RequestFigures


@dataclass(frozen=True)
class Summary:
    """Models counted by runtime, capability and state; requests over the window."""

    window_s: int
    models: int
    by_runtime: dict[str, int]
    by_capability: dict[str, int]
    by_state: dict[str, int]
    by_interface: dict[str, int]
    requests: RequestFigures


@dataclass(frozen=True)
class WorkerResources:
    """One worker's memory and the models it holds."""

    worker_id: str
    address: str
    healthy: bool
    draining: bool
    memory_used_bytes: int
    memory_budget_bytes: int
    has_gpu: bool
    models: list[HeldModel]
    gpu_memory_used_bytes: int = 0
    """VRAM in use on the worker's GPUs (0 without one)."""
    gpu_memory_total_bytes: int = 0


@dataclass(frozen=True)
class Resources:
    """The model store's disk (None when the jobs service cannot say) and every worker."""

    store: StoreUse | None
    workers: list[WorkerResources]


@dataclass(frozen=True)
class SeriesPoint:
    """One bucket of one group (a model's asset id, or a key's name) in a usage chart."""

    start: datetime
    group: str
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
