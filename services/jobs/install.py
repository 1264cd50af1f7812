"""The install operation: fetch an asset's source into the model store, within the storage quota.

The store works synchronously in a thread; its progress callback crosses to the event loop
through `ProgressPump`, which thins reports out (a stage change, 5 points more, or half a
second) so a fast copy does not turn into a storm of row updates and events. The same
callback enforces the quota while files are written: over it, the install is cancelled and
fails with `QuotaExceeded`, and the store removes what it had written.
"""

from __future__ import annotations

import asyncio
import logging
import time

from services.common.asset_proto import AssetRecord
from services.common.errors import Cancelled, QuotaExceeded, RoundhouseError
from services.common.modelstore import ModelStore, Progress
from services.jobs.model import ProgressReport, is_transient
from services.jobs.registry_client import RegistryClient
from services.jobs.runners import RunContext

log = logging.getLogger(__name__)

MIB, GIB = 1024**2, 1024**3
# Overall percentage covered by each store stage, in the order stages run.
STAGE_BANDS = {"download": (0, 40), "unpack": (40, 45), "copy": (45, 60), "convert": (60, 80),
               "hash": (80, 95), "verify": (95, 99)}
REPORT_INTERVAL_S, REPORT_STEP = 0.5, 5
QUOTA_CHECK_INTERVAL_S = 0.5


def human_bytes(n: float) -> str:
    """`1.5 GiB`, `12.0 KiB`, `300 B`."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class ProgressPump:
    """Store progress (from the install thread) → throttled `ctx.report` calls on the loop."""

    def __init__(self, ctx: RunContext, store: ModelStore, limit: int | None) -> None:
        self._ctx, self._store, self._limit = ctx, store, limit
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[ProgressReport | None] = asyncio.Queue()
        self._task = self._loop.create_task(self._drain())
        self._stage, self._sent, self._sent_at, self._overall = "", -1, 0.0, 0
        self._quota_stage, self._quota_at = "", 0.0
        self.quota_error: QuotaExceeded | None = None

    def on_progress(self, p: Progress) -> None:
        """The store's callback; runs in the install thread."""
        now = time.monotonic()
        self._check_quota(p, now)
        low, high = STAGE_BANDS.get(p.stage, (0, 99))
        self._overall = max(self._overall, int(low + (high - low) * p.percent / 100))
        new_stage = p.stage != self._stage
        if not (new_stage or self._overall >= self._sent + REPORT_STEP
                or (self._overall > self._sent and now - self._sent_at >= REPORT_INTERVAL_S)):
            return
        self._stage, self._sent, self._sent_at = p.stage, self._overall, now
        message = f"{p.stage}: {p.percent:.0f}%" + (f" ({p.message})" if p.message else "")
        report = ProgressReport(message, self._overall, p.bytes_done, p.bytes_total)
        self._loop.call_soon_threadsafe(self._queue.put_nowait, report)

    def _check_quota(self, p: Progress, now: float) -> None:
        if self._limit is None or self.quota_error is not None:
            return
        if p.stage == self._quota_stage and now - self._quota_at < QUOTA_CHECK_INTERVAL_S:
            return
        self._quota_stage, self._quota_at = p.stage, now
        used = self._store.usage_bytes()
        if used > self._limit:
            self.quota_error = QuotaExceeded(
                f"storage quota exceeded while installing {self._ctx.operation.asset_id}: the "
                f"model store reached {human_bytes(used)} of its {human_bytes(self._limit)} "
                "quota (ROUNDHOUSE_MAX_STORAGE_GB); the partial install was removed"
            )
            self._ctx.cancel.set()

    async def close(self) -> None:
        """Deliver the reports still queued, then stop."""
        self._queue.put_nowait(None)
        await self._task

    async def _drain(self) -> None:
        while True:
            report = await self._queue.get()
            while report is not None and not self._queue.empty():
                report = self._queue.get_nowait()  # only the latest matters
            if report is None:
                return
            await self._ctx.report(report)


class InstallRunner:
    """Installs an asset's source, reporting its observed state to the registry."""

    def __init__(self, store: ModelStore, registry: RegistryClient, *,
                 max_storage_bytes: int | None) -> None:
        self._store = store
        self._registry = registry
        self._limit = max_storage_bytes

    async def __call__(self, ctx: RunContext) -> str:
        asset_id = ctx.operation.asset_id
        asset = await self._registry.get_asset(asset_id)
        pump: ProgressPump | None = None
        try:
            await self._check_quota(asset)
            await self._registry.report_state(asset_id, "installing",
                                              message=f"operation {ctx.operation.operation_id}")
            pump = ProgressPump(ctx, self._store, self._limit)
            installed = await asyncio.to_thread(
                self._store.install, asset.spec, pump.on_progress, ctx.cancel
            )
            await pump.close()
        except Exception as exc:
            if pump is not None:
                await pump.close()
                if isinstance(exc, Cancelled) and pump.quota_error is not None:
                    exc = pump.quota_error
            await self._report_stopped(ctx, asset, exc)
            raise exc from None
        path = str(installed.path or "")
        size = human_bytes(installed.total_bytes)
        await self._registry.report_state(asset_id, "installed", store_path=path,
                                          message=f"installed, {size}")
        return f"installed {asset_id} ({size}) at {path or 'remote'}"

    async def _check_quota(self, asset: AssetRecord) -> None:
        if self._limit is None or asset.spec.source.kind == "url":
            return
        if await asyncio.to_thread(self._store.is_installed, asset.spec):
            return
        used = await asyncio.to_thread(self._store.usage_bytes)
        disk_gb = asset.spec.resources.disk_gb
        needed = int(disk_gb * GIB) if disk_gb else 0
        if used + needed > self._limit:
            declared = f"declares {human_bytes(needed)} (resources.disk_gb) and " if needed else ""
            raise QuotaExceeded(
                f"storage quota exceeded: {asset.spec.asset_id} {declared}the model store "
                f"already holds {human_bytes(used)} of its {human_bytes(self._limit)} quota "
                "(ROUNDHOUSE_MAX_STORAGE_GB)"
            )

    async def _report_stopped(self, ctx: RunContext, asset: AssetRecord, exc: Exception) -> None:
        """Tell the registry how the install ended, unless another attempt will follow."""
        asset_id = asset.spec.asset_id
        if isinstance(exc, Cancelled):
            if ctx.stop_reason == "cancelled":
                before = "registered" if asset.state in ("installing", "failed") else asset.state
                await self._tell(asset_id, before, "install cancelled")
            elif ctx.stop_reason == "timeout":
                await self._tell(asset_id, "failed", "install timed out")
            return
        if ctx.final_attempt or not is_transient(exc):
            await self._tell(asset_id, "failed", getattr(exc, "message", str(exc)))

    async def _tell(self, asset_id: str, state: str, message: str) -> None:
        try:
            await self._registry.report_state(asset_id, state, message=message)
        except RoundhouseError as exc:
            # The operation's own outcome matters more; the registry hears it next time.
            log.warning("could not report %s as %s to the registry: %s", asset_id, state, exc)
