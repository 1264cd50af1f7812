"""The jobs service's Prometheus figures, served on `ROUNDHOUSE_JOBS_METRICS_PORT`.

Finished operations are counted by this instance as it records their outcome (each outcome is
written once, by the instance that holds the operation, so the instances' counts add up). The
operations still queued or running are read from the database, which every instance shares:
at once after a change here, and every `refresh_s` for the changes made elsewhere. The outbox
relay adds its own figures (`OutboxMetrics`) to the same registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.outbox import OutboxMetrics
from services.common.tasks import cancel_and_wait
from services.common.telemetry import LATENCY_BUCKETS
from services.jobs.model import OPERATION_TYPES, OperationRecord
from services.jobs.repository import OperationRepository

log = logging.getLogger(__name__)

REFRESH_S = 5.0
"""How often the unfinished operations are counted when nothing changes here."""
MIN_REFRESH_GAP_S = 0.25
"""A burst of changes (progress reports) is counted once, not once per change."""


class JobsMetrics:
    """`roundhouse_operations_total{type,status}`, `roundhouse_operation_duration_seconds`,
    `roundhouse_operations_in_progress{type}`, and the outbox relay's figures, in `registry`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.operations = Counter(
            "roundhouse_operations", "Operations finished, by type and outcome "
            "(succeeded, failed, cancelled)", ["type", "status"], registry=self.registry)
        self.duration = Histogram(
            "roundhouse_operation_duration_seconds", "Time from an operation's start (or its "
            "submission, when it never started) to its end", ["type", "status"],
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.in_progress = Gauge(
            "roundhouse_operations_in_progress", "Operations queued or running, by type",
            ["type"], registry=self.registry)
        for type_ in OPERATION_TYPES:
            self.in_progress.labels(type_).set(0)
        self.outbox = OutboxMetrics(self.registry)

    def finished(self, record: OperationRecord) -> None:
        """Count an operation that just reached its outcome (call once per outcome)."""
        self.operations.labels(record.type, record.status).inc()
        if record.finished_at is not None:
            started = record.started_at or record.created_at
            elapsed = max((record.finished_at - started).total_seconds(), 0.0)
            self.duration.labels(record.type, record.status).observe(elapsed)

    def unfinished(self, counts: dict[str, int]) -> None:
        """Set the queued-or-running gauge of every type (absent types: 0)."""
        for type_ in {*OPERATION_TYPES, *counts}:
            self.in_progress.labels(type_).set(counts.get(type_, 0))


class InProgressSampler:
    """Keeps `roundhouse_operations_in_progress` in step with the database in the background."""

    def __init__(self, repository: OperationRepository, metrics: JobsMetrics, *,
                 refresh_s: float = REFRESH_S) -> None:
        self._repo = repository
        self._metrics = metrics
        self._refresh_s = refresh_s
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def changed(self) -> None:
        """An operation changed here: count again soon."""
        self._changed.set()

    def start(self) -> None:
        """Start counting in the background (on the running loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="operations-gauge")

    async def stop(self) -> None:
        """Stop counting."""
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)

    async def _run(self) -> None:
        while True:
            self._changed.clear()
            try:
                self._metrics.unfinished(await self._repo.unfinished_by_type())
            except Exception as exc:  # noqa: BLE001 - the database may be back next time
                log.debug("counting unfinished operations failed: %s", exc)
            await asyncio.sleep(MIN_REFRESH_GAP_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), self._refresh_s)
