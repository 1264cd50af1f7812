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

from services.common.asset_proto import AssetRecord
from services.common.assetspec import AssetSpec
from services.common.errors import AssetNotFound, FailedPrecondition
from services.common.modelstore import ModelStore, source_fingerprint
from services.common.routespec import check_unrouted
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
    bookkeeping: list[asyncio.Task[None]] = field(default_factory=list)
    """Records the runner started with `alongside`, awaited with the operation's outcome."""

    def alongside(self, record: Coroutine[Any, Any, None]) -> None:
        """Write `record` (bookkeeping elsewhere, such as an observed state in the registry)
        while the operation's own outcome is written, rather than before it. It is done when
        the operation's outcome is; if it fails, that is logged, not the operation's failure."""
        self.bookkeeping.append(asyncio.create_task(record))

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
    """Removes the asset from the registry, and its installed files when no other asset uses them.

    The store keeps one folder per source, shared by every asset with that source: the files
    go only when no other registered asset has the same source (`source_fingerprint`), and
    the final message says which way it went. Safe to repeat: files already gone and an
    asset already deleted count as done. An asset a route uses is refused before any file
    goes (the registry refuses its deletion anyway); a route applied between that check and the
    registry's leaves the asset registered without its files, which its next install restores.
    """

    def __init__(self, store: ModelStore, registry: RegistryClient) -> None:
        self._store = store
        self._registry = registry

    async def __call__(self, ctx: RunContext) -> str:
        asset_id = ctx.operation.asset_id
        try:
            asset = await self._registry.get_stored(asset_id)
        except AssetNotFound:
            # A repeated run: the files were dealt with before the registry entry went.
            return f"asset {asset_id} already deleted"
        # Refused before any file goes: the registry would refuse the deletion anyway.
        check_unrouted(asset_id, asset.spec.aliases, await self._registry.list_routes())
        files = "a route has no files"
        if isinstance(asset, AssetRecord):
            await ctx.report(ProgressReport("removing installed files", progress=10))
            files = await self._remove_files(asset.spec)
        await ctx.report(ProgressReport("deleting the asset from the registry", progress=60))
        try:
            await self._registry.delete_asset(asset_id)
        except AssetNotFound:
            pass
        return f"asset {asset_id} deleted; {files}"

    async def _remove_files(self, spec: AssetSpec) -> str:
        """Remove the spec's source from the store unless another asset uses it; says what it did."""
        if spec.source.kind == "url":
            return "nothing was installed (a remote source)"
        fingerprint = source_fingerprint(spec.source)
        sharing = sorted(
            other.spec.asset_id for other in await self._registry.list_assets()
            if other.spec.asset_id != spec.asset_id and other.spec.source.kind != "url"
            and source_fingerprint(other.spec.source) == fingerprint
        )
        if sharing:
            return f"its files kept, still used by {', '.join(sharing)} (same source)"
        removed = await asyncio.to_thread(self._store.remove, spec.source)
        return "its files removed" if removed else "nothing was installed"
