"""What each operation type does: a table of runners, one coroutine per type.

A runner gets a `RunContext` and returns the final message; raising fails the operation
(a transient error, see `model.is_transient`, is retried). The executor owns everything
around it: claiming, the lease, timeouts, cancellation, retries and the final state. A runner
honours `ctx.cancel` (a `threading.Event`, so blocking work in threads can poll it too) and
should leave nothing half-done when it stops. Runs may be repeated after a crash, so a runner
must be safe to run again on an operation that was partly done.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

from services.common.errors import AssetNotFound, FailedPrecondition
from services.common.modelstore import ModelStore
from services.jobs.model import OperationRecord, ProgressReport
from services.jobs.registry_client import RegistryClient

StopReason = Literal["cancelled", "timeout", "lease_lost", "shutdown"]


@dataclass
class RunContext:
    """One run of one operation, as its runner sees it."""

    operation: OperationRecord
    report: Callable[[ProgressReport], Awaitable[None]]
    """Record progress and publish `job.progress`; cheap enough to call for every step."""
    cancel: threading.Event = field(default_factory=threading.Event)
    """Set when the run must stop: cancelled, timed out, lease lost, or shutting down."""
    stop_reason: StopReason | None = None
    """Why `cancel` was set, once it is."""

    @property
    def final_attempt(self) -> bool:
        """Whether a failure now ends the operation (no attempts left)."""
        return self.operation.attempts >= self.operation.max_attempts


Runner = Callable[[RunContext], Coroutine[Any, Any, str]]
"""Runs one operation; returns the message it ends with."""


def not_supported(kind: str) -> Runner:
    """A runner for a type this jobs service cannot run yet: fails at once, not retried."""

    async def run(ctx: RunContext) -> str:
        raise FailedPrecondition(
            f"{kind} operations are not supported yet by this jobs service"
        )

    return run


class DeleteRunner:
    """Removes the asset's installed files from the store, then the asset from the registry.

    Safe to repeat: files already gone and an asset already deleted count as done.
    """

    def __init__(self, store: ModelStore, registry: RegistryClient) -> None:
        self._store = store
        self._registry = registry

    async def __call__(self, ctx: RunContext) -> str:
        asset_id = ctx.operation.asset_id
        await ctx.report(ProgressReport("removing installed files", progress=10))
        removed = await asyncio.to_thread(self._store.remove, asset_id)
        await ctx.report(ProgressReport("deleting the asset from the registry", progress=60))
        try:
            await self._registry.delete_asset(asset_id)
        except AssetNotFound:
            pass
        files = "its files removed" if removed else "nothing was installed"
        return f"asset {asset_id} deleted; {files}"

