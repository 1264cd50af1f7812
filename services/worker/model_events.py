"""A worker's model events, published in order without holding up the work they report."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from services.common.events import EventBus
from services.worker.converters import model_event

log = logging.getLogger(__name__)

UNLOAD_EVENTS = {"evict": "model.evicted", "sleep": "model.sleeping"}
"""The event an unload publishes, by its reason; any other reason is `model.unloaded`."""


class ModelEvents:
    """Publishes `model.*` events best effort, each after the ones published before it.

    The caller never waits for NATS: a load starts while `model.loading` is on its way and
    answers before `model.loaded` is acknowledged. Without a bus nothing is published.
    """

    def __init__(self, bus: EventBus | None = None) -> None:
        self.bus = bus
        self._last: asyncio.Task[None] | None = None

    def publish(self, kind: str, asset_id: str, worker_id: str, **detail: Any) -> None:
        """Queue `kind` for `asset_id` behind the events published before it."""
        if self.bus is None:
            return
        event = model_event(kind, asset_id, worker_id, **detail)
        self._last = asyncio.create_task(self._send(self.bus, event, f"{kind} for {asset_id}", self._last),
                                         name=f"publish-{kind}-{asset_id}")

    @staticmethod
    async def _send(bus: EventBus, event: Any, what: str, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        try:
            await bus.publish(event)
        except Exception as exc:  # noqa: BLE001 - events are best effort; serving goes on
            log.warning("could not publish %s: %s", what, exc)

    async def sent(self) -> None:
        """Wait until every event published so far has been sent (or failed to be)."""
        if self._last is not None:
            await asyncio.wait([self._last])
