"""Which workers are alive: heartbeats in, `worker.down` out when they stop.

Workers heartbeat on `roundhouse.heartbeat.worker.<id>` with their `WorkerInfo`. A worker
not heard from for `dead_after_s` is declared dead at once: the pool stops routing to it,
its calls in flight are cancelled (their clients get 503), and, by the service that
announces (the router), `worker.down` (reason `heartbeat_missed`) is published once. Its
next heartbeat brings it back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from roundhouse.v1 import events_pb2, worker_pb2
from services.common.events import ALL_HEARTBEATS, EventBus, new_event
from services.common.tasks import cancel_and_wait
from services.common.workerpool import WorkerHandle, WorkerPool

log = logging.getLogger(__name__)

WORKER_DOWN = "roundhouse.events.worker.down.>"


class WorkerLiveness:
    """Feeds heartbeats into a `WorkerPool` and declares silent workers dead."""

    def __init__(
        self, pool: WorkerPool, bus: EventBus, *, dead_after_s: float, announce: bool = True,
        on_down: Callable[[WorkerHandle], None] | None = None,
    ) -> None:
        """`announce`: publish `worker.down` (one service per deployment should).
        `on_down(worker)` is called whenever a worker is taken out of the pool."""
        self._pool = pool
        self._bus = bus
        self._dead_after_s = dead_after_s
        self._announce = announce
        self._on_down = on_down
        self._last_seen: dict[str, float] = {}
        self._subscriptions: list[Subscription] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listen for heartbeats and shutdown announcements; watch the deadlines."""
        self._subscriptions = [
            await self._bus.nc.subscribe(ALL_HEARTBEATS, cb=self._on_heartbeat),
            await self._bus.subscribe(WORKER_DOWN, self._on_worker_down),
        ]
        # Heartbeats could not arrive while NATS was away: restart every deadline.
        self._bus.on_reconnect(self._forgive)
        self._task = asyncio.create_task(self._watch_forever(), name="worker-liveness")

    async def stop(self) -> None:
        """Stop watching and listening."""
        if self._task is not None:
            task, self._task = self._task, None
            await cancel_and_wait(task)
        for subscription in self._subscriptions:
            try:
                await subscription.unsubscribe()
            except Exception:  # noqa: BLE001 - the connection may already be closing
                pass

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            info = worker_pb2.WorkerInfo.FromString(msg.data)
        except DecodeError:
            log.warning("dropping undecodable heartbeat on %s", msg.subject)
            return
        if not info.worker_id or not info.address:
            return
        self._pool.observe(info)
        self._last_seen[info.worker_id] = time.monotonic()

    async def _on_worker_down(self, event: events_pb2.Event) -> None:
        worker = self._pool.find(worker_id=event.worker_id, address=event.worker.address)
        if event.source != "worker":
            # Another service's verdict: a service that does not announce adopts it.
            if worker is not None and not worker.down and not self._announce:
                await self._declare_dead(worker, f"declared down by the {event.source}")
            return
        if worker is not None:
            log.info("worker %s is shutting down", event.worker_id)
            # Requests already running may finish within the worker's grace period.
            self._pool.mark_down(worker, cancel_calls=False)
            self._last_seen.pop(event.worker_id, None)
            self._lost(worker)

    def _lost(self, worker: WorkerHandle) -> None:
        if self._on_down is not None:
            try:
                self._on_down(worker)
            except Exception:
                log.exception("handling the loss of worker %s failed", worker.worker_id)

    def _forgive(self) -> None:
        now = time.monotonic()
        for worker_id in self._last_seen:
            self._last_seen[worker_id] = now

    async def _watch_forever(self) -> None:
        while True:
            await asyncio.sleep(min(self._dead_after_s / 4, 0.5))
            if self._bus.is_connected:
                await self.check()

    async def check(self) -> None:
        """Declare dead every worker whose last heartbeat is older than the deadline."""
        now = time.monotonic()
        for worker_id, seen in list(self._last_seen.items()):
            if now - seen <= self._dead_after_s:
                continue
            del self._last_seen[worker_id]
            worker = self._pool.find(worker_id=worker_id)
            if worker is not None and not worker.down:
                await self._declare_dead(worker, f"missed its heartbeats for {now - seen:.1f}s")

    async def _declare_dead(self, worker: WorkerHandle, why: str) -> None:
        held = self._pool.mark_down(worker, cancel_calls=True)
        last = worker.last_info or worker_pb2.WorkerInfo()
        log.warning("worker %s at %s %s; taken out of the pool", worker.worker_id, worker.address, why)
        self._lost(worker)
        if not self._announce:
            return
        detail = events_pb2.WorkerEventDetail(
            address=worker.address, memory_budget_bytes=last.memory_budget_bytes,
            reason="heartbeat_missed", asset_ids=held)
        try:
            await self._bus.publish(new_event("worker.down", "router", worker_id=worker.worker_id,
                                              worker=detail))
        except Exception as exc:  # noqa: BLE001 - routing already moved on; the event is best effort
            log.warning("could not publish worker.down for %s: %s", worker.worker_id, exc)
