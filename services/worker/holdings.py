"""What a worker holds: held models, one request's lease on a model, the models that failed
here, and read-only snapshots."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

from services.common.asset_proto import AssetRecord
from services.common.errors import ModelNotReady, NotFound
from services.worker.admission import ModelSlots
from services.worker.gpu import NO_GPU, GpuMemory
from services.worker.models import Capabilities, HostedModel

if TYPE_CHECKING:
    from services.worker.metering import RequestMeter

MIB = 1024 * 1024


def mib(size: int) -> str:
    """A byte count as MiB for messages, one decimal (tiny models are well under 1 MiB)."""
    return f"{size / MIB:.1f} MiB"


@dataclass(frozen=True)
class LoadedModelInfo:
    """A snapshot of one held model (the domain side of `LoadedModel`).

    `in_flight` counts the requests holding one of its `max_concurrency` slots (those still
    finishing on a revision it replaced included), `waiting` those queued for one.
    """

    asset_id: str
    revision: int
    capabilities: Capabilities
    memory_bytes: int
    in_flight: int
    max_concurrency: int
    waiting: int
    loaded_at: datetime
    last_used_at: datetime
    load_seconds: float


FailureStage = Literal["load", "engine"]
"""Where a model failed: its load, or its engine once it was loaded (it was then dropped)."""


@dataclass(frozen=True)
class FailedModelInfo:
    """A model that failed on this worker and is not held (the domain side of `FailedModel`).

    Kept until a load of the asset succeeds.
    """

    asset_id: str
    revision: int
    reason: str
    failed_at: datetime
    stage: FailureStage


@dataclass(frozen=True)
class WorkerState:
    """A snapshot of the worker: identity, memory figures, the models it holds and those that
    failed here. `seq` orders the snapshots of one process; `draining`: it takes no new work."""

    worker_id: str
    address: str
    memory_budget_bytes: int
    memory_used_bytes: int
    started_at: datetime
    models: tuple[LoadedModelInfo, ...]
    failed_models: tuple[FailedModelInfo, ...] = ()
    seq: int = 0
    draining: bool = False
    gpu: GpuMemory = NO_GPU


@dataclass
class HeldModel:
    """A model the worker holds, with its accounting.

    `slots` admit its requests (shared with the revision it replaced, and the one replacing
    it). `unloaded` is set when it was removed with requests still running (a forced unload):
    those requests then fail as not ready. `retiring` is set when a newer revision replaced
    it: running requests finish, and the last one out closes it.
    """

    record: AssetRecord
    model: HostedModel
    loaded_at: datetime
    last_used_at: datetime
    load_seconds: float
    slots: ModelSlots
    in_flight: int = 0
    unloaded: bool = False
    retiring: bool = False

    @property
    def asset_id(self) -> str:
        """The asset id."""
        return self.record.spec.asset_id

    @property
    def memory_bytes(self) -> int:
        """What it counts against the budget: the measured footprint, or the spec's
        `resources.memory_mb` when that is more (a declaration reserves room the weights alone
        do not show, such as the KV cache a long generation grows)."""
        declared = (self.record.spec.resources.memory_mb or 0) * MIB
        return max(self.model.capabilities.memory_bytes, declared)

    @property
    def idle_seconds(self) -> float:
        """Seconds since its last use."""
        return (datetime.now(UTC) - self.last_used_at).total_seconds()

    def touch(self) -> None:
        """Record use now."""
        self.last_used_at = datetime.now(UTC)

    @asynccontextmanager
    async def lease(self, worker_id: str, meter: RequestMeter, *, touch: bool = True) -> AsyncIterator[Lease]:
        """One request's lease, counted in flight while the body runs (and, with `touch`, as
        use of the model); the last request out of a retiring revision closes it."""
        self.in_flight += 1
        if touch:
            self.touch()
        try:
            yield Lease(self, worker_id, meter)
        except Exception as exc:
            if self.unloaded:
                raise unloaded_error(self.asset_id, worker_id) from exc
            raise
        finally:
            self.in_flight -= 1
            if touch:
                self.touch()
            if self.retiring and self.in_flight == 0:
                await self.model.close()

    def snapshot(self) -> LoadedModelInfo:
        """The model's figures as of now."""
        return LoadedModelInfo(
            asset_id=self.asset_id,
            revision=self.record.revision,
            capabilities=self.model.capabilities,
            memory_bytes=self.memory_bytes,
            in_flight=self.slots.running,
            max_concurrency=self.slots.policy.max_concurrency,
            waiting=self.slots.waiting,
            loaded_at=self.loaded_at,
            last_used_at=self.last_used_at,
            load_seconds=self.load_seconds,
        )


@dataclass
class Lease:
    """One request's hold on a model, counted in flight until the request ends."""

    held: HeldModel
    worker_id: str
    meter: RequestMeter
    """What the worker records of the request (its answer's usage and phases, for metrics and spans)."""

    @property
    def model(self) -> HostedModel:
        """The model to serve the request with."""
        return self.held.model

    def check(self) -> None:
        """Raise `ModelNotReady` if the model was unloaded while the request ran."""
        if self.held.unloaded:
            raise unloaded_error(self.held.asset_id, self.worker_id)


def unloaded_error(asset_id: str, worker_id: str, *, waiting: bool = False) -> ModelNotReady:
    """The error of a request whose model was unloaded under it (`waiting`: while the request
    waited for a slot)."""
    during = "while this request waited for it" if waiting else "while serving this request"
    return ModelNotReady(f"model '{asset_id}' was unloaded from worker {worker_id} {during}; retry")


def not_held_error(asset_id: str, worker_id: str, failed: FailedModelInfo | None) -> NotFound:
    """The error of a request for a model the worker does not hold, with why when it failed."""
    message = f"model '{asset_id}' is not loaded on worker {worker_id}"
    if failed is not None:
        how = "its last load failed" if failed.stage == "load" else "it failed and was dropped"
        message += f" ({how}: {failed.reason})"
    return NotFound(message)
