"""Transactional outbox: an event exists if and only if the change it reports committed.

Writers call `add_to_outbox(session, event)` inside the transaction that makes the change,
and `relay.notify()` after it commits. `OutboxRelay` publishes unpublished rows to
JetStream in `id` order and stamps them published; while NATS is unreachable the rows
stay put and the relay retries with a capped backoff, so an outage delays events but
loses none. A row re-published after a lost ack carries the same `Nats-Msg-Id`, which
JetStream drops within its duplicate window. A row keeps the trace context and request id of
the transaction that wrote it, and the event goes out with them as headers.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from roundhouse.v1 import events_pb2
from services.common import tracing
from services.common.db.models import OutboxEvent
from services.common.events import EventBus, EventPublishError, encode_event, event_type_of, subject_for
from services.common.tasks import cancel_and_wait

logger = logging.getLogger(__name__)


def add_to_outbox(session: AsyncSession, event: events_pb2.Event) -> OutboxEvent:
    """Queue `event` for publishing as part of the session's current transaction.

    Synchronous: the row is flushed with the transaction, so a rollback discards it.
    Call the relay's `notify()` after the commit for prompt delivery. The row keeps the
    current trace context and request id.
    """
    row = OutboxEvent(
        event_id=uuid.UUID(event.event_id),
        subject=subject_for(event),
        payload=encode_event(event),
        trace_context=tracing.traceparent(),
        request_id=tracing.current_request_id(),
    )
    session.add(row)
    return row


class OutboxMetrics:
    """The relay's Prometheus figures, in the registry of the service that runs it:
    `roundhouse_outbox_backlog` (rows not published yet, every writer's) and
    `roundhouse_events_published_total{type}`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.backlog = Gauge("roundhouse_outbox_backlog",
                             "Outbox rows committed but not yet published to the event stream",
                             registry=registry)
        self.published = Counter("roundhouse_events_published",
                                 "Events this relay published to the event stream, by event type",
                                 ["type"], registry=registry)


class OutboxRelay:
    """Background task that moves committed outbox rows to the event stream.

    Wakes on `notify()`, on NATS reconnecting, and every `poll_interval_s` as a safety
    net for writers in other processes. Several relays may share one table: each batch is
    claimed with `FOR UPDATE SKIP LOCKED`, and order is kept within what one relay sends.
    Published rows older than `retention_s` are deleted now and then. With `metrics`, the
    relay counts what it publishes and measures the backlog after every pass.
    """

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        bus: EventBus,
        *,
        batch_size: int = 100,
        poll_interval_s: float = 1.0,
        min_backoff_s: float = 0.2,
        max_backoff_s: float = 10.0,
        retention_s: float = 24 * 3600.0,
        metrics: OutboxMetrics | None = None,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._bus = bus
        self._batch_size = batch_size
        self._poll_interval_s = poll_interval_s
        self._min_backoff_s = min_backoff_s
        self._max_backoff_s = max_backoff_s
        self._retention_s = retention_s
        self._metrics = metrics
        self._wake = asyncio.Event()
        self._urgent = False
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._last_purge = 0.0
        bus.on_reconnect(self._on_reconnect)

    def start(self) -> None:
        """Start relaying in the background (on the running loop)."""
        if self._task is None:
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(self._run(), name="outbox-relay")

    def notify(self) -> None:
        """Publish pending rows now: call it right after committing outbox rows."""
        self._wake.set()

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Make one last pass over pending rows, then stop; cancel if it takes too long."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        self._urgent = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout_s)
        except TimeoutError:
            await cancel_and_wait(task)

    async def relay_pending(self) -> int:
        """Publish every pending row in `id` order; return how many were published.

        Raises `EventPublishError` at the first row that could not be published; the rows
        before it stay marked published, that one and the rest stay pending.
        """
        total = 0
        while True:
            published, failure = await self._relay_batch()
            total += published
            if failure is not None:
                raise failure
            if published < self._batch_size:
                return total

    async def _relay_batch(self) -> tuple[int, EventPublishError | None]:
        """Publish one batch and stamp it; its events are counted once the stamps commit (a
        batch whose commit fails goes out again, and is counted then)."""
        published: list[str] = []
        failure: EventPublishError | None = None
        async with self._sessionmaker() as session, session.begin():
            rows = (
                await session.scalars(
                    select(OutboxEvent)
                    .where(OutboxEvent.published_at.is_(None))
                    .order_by(OutboxEvent.id)
                    .limit(self._batch_size)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            for row in rows:
                trace = {"traceparent": row.trace_context, tracing.REQUEST_ID_KEY: row.request_id}
                try:
                    await self._bus.publish_raw(row.subject, row.payload, str(row.event_id),
                                                trace=trace)
                except EventPublishError as exc:
                    row.attempts += 1
                    failure = exc
                    break
                row.published_at = datetime.now(UTC)
                published.append(row.subject)
        if self._metrics is not None:
            for subject in published:
                self._metrics.published.labels(event_type_of(subject)).inc()
        return len(published), failure

    async def _measure_backlog(self) -> None:
        if self._metrics is None:
            return
        async with self._sessionmaker() as session:
            pending = await session.scalar(
                select(func.count()).select_from(OutboxEvent).where(OutboxEvent.published_at.is_(None)))
        self._metrics.backlog.set(pending or 0)

    async def _purge_published(self) -> None:
        if time.monotonic() - self._last_purge < min(self._retention_s, 600.0):
            return
        self._last_purge = time.monotonic()
        cutoff = datetime.now(UTC) - timedelta(seconds=self._retention_s)
        async with self._sessionmaker() as session, session.begin():
            await session.execute(delete(OutboxEvent).where(OutboxEvent.published_at < cutoff))

    async def _run(self) -> None:
        backoff = 0.0
        while True:
            try:
                published = await self.relay_pending()
                if backoff and published:
                    logger.info("outbox: published %d pending events after an outage", published)
                backoff = 0.0
                await self._purge_published()
            except Exception as exc:
                if not backoff:
                    log = logger.warning if isinstance(exc, EventPublishError) else logger.exception
                    log("outbox: publishing failed, will retry: %s", exc)
                backoff = min(max(backoff * 2, self._min_backoff_s), self._max_backoff_s)
            try:
                await self._measure_backlog()
            except Exception as exc:  # noqa: BLE001 - a figure, not the relay's work
                logger.debug("outbox: measuring the backlog failed: %s", exc)
            if self._stopping:
                return
            await self._sleep(backoff or self._poll_interval_s, notify_wakes=not backoff)

    async def _sleep(self, delay_s: float, *, notify_wakes: bool) -> None:
        """Wait `delay_s`; `notify()` cuts it short only when `notify_wakes`."""
        deadline = time.monotonic() + delay_s
        while not self._urgent:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                break
            self._wake.clear()
            if notify_wakes:
                break
        self._urgent = False

    def _on_reconnect(self) -> None:
        self._urgent = True
        self._wake.set()
