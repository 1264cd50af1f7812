"""Which workers are alive: heartbeats in, `worker.down` out when they stop.

Workers heartbeat on `roundhouse.heartbeat.worker.<id>` with their `WorkerInfo`. A worker
not heard from for `dead_after_s` is declared dead at once: the pool stops routing to it,
its calls in flight are cancelled (their clients get 503), and, by the services that
announce (the routers), `worker.down` (reason `heartbeat_missed`) is published. Its next
heartbeat brings it back.

Every router sees the same silence, and every one takes the worker out of its own pool, but
one `worker.down` is published per death: the routers race to create the death's key in a
JetStream key-value bucket (`create` fails when the key exists), and only the winner
announces. A death is named by the worker's id, its incarnation (the `started_at` of its last
picture: a restarted process is a new one) and how many times this incarnation came back
after being declared dead (a worker stopped and resumed dies anew). The event's id derives
from the same name, so even a re-published copy is dropped by the stream.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable

import nats.errors
import nats.js.errors
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from roundhouse.v1 import events_pb2, worker_pb2
from services.common.events import ALL_HEARTBEATS, EventBus, EventPublishError, new_event
from services.common.tasks import cancel_and_wait
from services.common.workerpool import WorkerHandle, WorkerPool

log = logging.getLogger(__name__)

WORKER_DOWN = "roundhouse.events.worker.down.>"
DEATHS_BUCKET = "roundhouse_worker_deaths"
"""The key-value bucket where routers claim the announcement of a worker's death."""
DEATHS_TTL_S = 24 * 3600.0
"""How long a claimed death is remembered (well past any race between routers)."""
_DEATH_EVENTS = uuid.UUID("5b0c39a4-52a3-4f5e-9a55-6f1b1c0de0a1")
"""Namespace of the ids of `worker.down` events, derived from the death they announce."""


class WorkerLiveness:
    """Feeds heartbeats into a `WorkerPool` and declares silent workers dead."""

    def __init__(
        self, pool: WorkerPool, bus: EventBus, *, dead_after_s: float, announce: bool = True,
        on_down: Callable[[WorkerHandle], None] | None = None,
    ) -> None:
        """`announce`: publish `worker.down` (the routers do; one of them wins each death).
        `on_down(worker)` is called whenever a worker is taken out of the pool (after its
        death is announced, where this service announces)."""
        self._pool = pool
        self._bus = bus
        self._dead_after_s = dead_after_s
        self._announce = announce
        self._on_down = on_down
        self._last_seen: dict[str, float] = {}
        self._comebacks: Counter[tuple[str, int]] = Counter()
        """Per (worker id, incarnation): times it came back after being declared dead."""
        self._deaths: KeyValue | None = None
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
        known = self._pool.find(worker_id=info.worker_id, address=info.address)
        if known is not None and known.down and _incarnation(known.last_info) == _incarnation(info):
            self._comebacks[(info.worker_id, _incarnation(info))] += 1
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
        period = min(self._dead_after_s / 4, 0.5)
        while True:
            due = time.monotonic() + period
            await asyncio.sleep(period)
            if time.monotonic() - due > period:
                # This process was stopped or starved, not the workers: the heartbeats they sent
                # meanwhile are still unread. Judge them from now on.
                log.info("worker liveness check ran %.1fs late; restarting the deadlines",
                         time.monotonic() - due)
                self._forgive()
                continue
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
        """Take the worker out of the pool, announce its death when this service announces and
        wins the claim, then tell `on_down`."""
        held = self._pool.mark_down(worker, cancel_calls=True)
        log.warning("worker %s at %s %s; taken out of the pool", worker.worker_id, worker.address, why)
        if self._announce:
            await self._announce_death(worker, held)
        self._lost(worker)

    async def _announce_death(self, worker: WorkerHandle, held: list[str]) -> None:
        last = worker.last_info or worker_pb2.WorkerInfo()
        incarnation = _incarnation(last)
        death = (f"{hashlib.sha256(worker.worker_id.encode()).hexdigest()[:32]}.{incarnation}."
                 f"{self._comebacks[(worker.worker_id, incarnation)]}")
        try:
            if not await self._claim(death):
                log.info("worker.down for %s announced by another router", worker.worker_id)
                return
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("could not claim the death of %s (%r); announcing it anyway", worker.worker_id, exc)
        detail = events_pb2.WorkerEventDetail(
            address=worker.address, memory_budget_bytes=last.memory_budget_bytes,
            reason="heartbeat_missed", asset_ids=held)
        event = new_event("worker.down", "router", worker_id=worker.worker_id, worker=detail)
        event.event_id = str(uuid.uuid5(_DEATH_EVENTS, death))
        try:
            await self._bus.publish(event)
        except (EventPublishError, ValueError) as exc:
            log.warning("could not publish worker.down for %s: %s", worker.worker_id, exc)

    async def _claim(self, death: str) -> bool:
        """Create the death's key; False when another router created it first."""
        if self._deaths is None:
            self._deaths = await _open_bucket(self._bus)
        try:
            await self._deaths.create(death, b"")
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        return True


async def _open_bucket(bus: EventBus) -> KeyValue:
    """The deaths bucket, created by whichever router needs it first."""
    try:
        return await bus.js.key_value(DEATHS_BUCKET)
    except nats.js.errors.BucketNotFoundError:
        pass
    try:
        return await bus.js.create_key_value(KeyValueConfig(
            bucket=DEATHS_BUCKET, history=1, ttl=DEATHS_TTL_S, storage=StorageType.FILE))
    except nats.js.errors.BadRequestError:  # created by another router meanwhile
        return await bus.js.key_value(DEATHS_BUCKET)


def _incarnation(info: worker_pb2.WorkerInfo | None) -> int:
    """Which process of a worker a picture is from: its start, in microseconds."""
    return info.started_at.ToMicroseconds() if info is not None else 0
