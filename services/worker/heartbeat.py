"""A worker's presence on NATS: `worker.up`, periodic heartbeats, `worker.down` at shutdown.

Heartbeats carry the `WorkerInfo` proto on the core subject
`roundhouse.heartbeat.worker.<worker_id>`; they are not stored. A model that fails is
reported by an extra heartbeat at once, and so is the start of a drain, so routers stop
sending requests without waiting for the next one. Each heartbeat's `seq` is higher than
that of the picture before it (see `ModelHost.info`). Everything here is best effort: a NATS
outage never stops the worker from serving.
"""

from __future__ import annotations

import asyncio
import logging

from roundhouse.v1 import events_pb2
from services.common.events import EventBus, heartbeat_subject, new_event
from services.common.tasks import cancel_and_wait
from services.worker.converters import worker_info
from services.worker.service import ModelHost

log = logging.getLogger(__name__)


class Heartbeat:
    """Announces one worker and keeps telling the router it is alive and what it holds."""

    def __init__(self, host: ModelHost, bus: EventBus, interval_s: float) -> None:
        self._host = host
        self._bus = bus
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self._due = asyncio.Event()
        host.on_change(self.beat_soon)

    def start(self) -> None:
        """Publish `worker.up`, then a heartbeat every interval, in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="worker-heartbeat")

    async def stop(self) -> None:
        """Stop the heartbeats and publish `worker.down` (reason `shutdown`)."""
        if self._task is None:
            return
        task, self._task = self._task, None
        await cancel_and_wait(task)
        await self._announce("worker.down", reason="shutdown")

    async def beat(self) -> None:
        """Publish one heartbeat now; skipped while NATS is unreachable."""
        if not self._bus.is_connected:
            return
        payload = worker_info(self._host.info()).SerializeToString()
        try:
            await self._bus.nc.publish(heartbeat_subject(self._host.worker_id), payload)
        except Exception as exc:  # noqa: BLE001 - liveness is best effort; serving goes on
            log.debug("heartbeat not sent: %r", exc)

    def beat_soon(self) -> None:
        """Send the next heartbeat now rather than at its turn (what the worker holds changed)."""
        self._due.set()

    async def _run(self) -> None:
        await self._announce("worker.up")
        while True:
            self._due.clear()  # before the snapshot: a change after it asks for another beat
            await self.beat()
            try:
                await asyncio.wait_for(self._due.wait(), self._interval_s)
            except TimeoutError:
                pass

    async def _announce(self, kind: str, reason: str = "") -> None:
        state = self._host.info()
        detail = events_pb2.WorkerEventDetail(
            address=state.address, memory_budget_bytes=state.memory_budget_bytes,
            reason=reason, asset_ids=[m.asset_id for m in state.models],
        )
        try:
            await self._bus.publish(new_event(kind, "worker", worker_id=state.worker_id, worker=detail))
        except Exception as exc:  # noqa: BLE001 - events are best effort; serving goes on
            log.warning("could not publish %s for %s: %s", kind, state.worker_id, exc)
