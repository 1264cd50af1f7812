"""One operation an executor is running: its runner's context, and its progress reports in order.

Progress is bookkeeping, not work: a runner's reports are queued and written, one after the
other, by a task of their own while the runner goes on; `reported()` waits until all of them
are in, which the executor does before it records the operation's outcome.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

from services.jobs.model import OperationRecord, ProgressReport
from services.jobs.runners import RunContext, StopReason


class OperationRun:
    """One operation this instance is running, and its progress reports not yet written;
    `write(run, report)` writes one report."""

    def __init__(self, record: OperationRecord,
                 write: Callable[[OperationRun, ProgressReport], Awaitable[None]]) -> None:
        self.ctx = RunContext(record, report=self._queue_report)
        self.stopped = asyncio.Event()
        self._write = write
        self._reports: deque[ProgressReport] = deque()
        self._writer: asyncio.Task[None] | None = None

    @property
    def operation_id(self) -> str:
        """The operation's id."""
        return self.ctx.operation.operation_id

    async def _queue_report(self, report: ProgressReport) -> None:
        """Queue `report`; it is written after the ones before it, while the runner goes on."""
        self._reports.append(report)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_reports(), name=f"progress-{self.operation_id}")

    async def _write_reports(self) -> None:
        while self._reports:
            await self._write(self, self._reports.popleft())

    async def reported(self) -> None:
        """Wait until every report queued so far is written (or failed to be)."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    def stop(self, reason: StopReason) -> None:
        """Ask the runner to stop; the first reason given is the one that counts."""
        if self.ctx.stop_reason is None:
            self.ctx.stop_reason = reason
        self.ctx.cancel.set()
        self.stopped.set()
