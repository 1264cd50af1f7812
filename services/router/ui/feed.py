"""`GET /ui/events`: the live feed the admin UI's pages listen to, as server-sent events.

Each event published on NATS (`roundhouse.events.>`) becomes one SSE message whose `event:` is
the event's kind (`model`, `job`, `worker`, `asset`, `key`: what a page fragment re-fetches on)
and whose `data:` is the event as one line of the live event log, already rendered as HTML. The
feed is live only (a page that opens it re-fetches its fragments once, so nothing that happened
before is missed); `GET /admin/v1/events` is the resumable feed for API clients. A comment goes
out every `heartbeat_s` so proxies keep the connection open, and the feed ends when the client
goes away or the router begins to drain.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC

from google.protobuf import json_format
from jinja2 import Environment

from roundhouse.v1 import events_pb2
from services.common.drain import Drain
from services.common.events import ALL_EVENTS, EventBus
from services.common.operation_names import type_name

log = logging.getLogger(__name__)

HEARTBEAT_S = 15.0
DRAIN_CHECK_S = 1.0
MAX_PENDING = 1000
RESYNC = "resync"
"""Sent instead of the events a slow client missed: the page re-fetches everything."""


def event_kind(event: events_pb2.Event) -> str:
    """`model` for `model.loaded`...: the SSE event name pages listen for."""
    return event.type.partition(".")[0]


def event_summary(event: events_pb2.Event) -> str:
    """What the event says beyond its type and subject, in a few words."""
    detail = event.WhichOneof("detail")
    if detail == "job":
        job = event.job
        parts = [type_name(job.type), f"{job.progress}%"]
        parts += [text for text in (job.message, job.error) if text]
        return " ".join(parts)
    if detail is not None:
        body = json_format.MessageToDict(getattr(event, detail), preserving_proto_field_name=True)
        return " ".join(f"{name}={value}" for name, value in body.items()
                        if isinstance(value, str | int | float | bool))  # the spec and lists stay out
    return ""


def event_subject(event: events_pb2.Event) -> str:
    """What the event is about: the asset, operation, worker or key."""
    return event.asset_id or event.job_id or event.worker_id or event.key_name


class EventFeed:
    """Turns the bus's events into the UI's SSE messages (see the module docstring)."""

    def __init__(self, templates: Environment, drain: Drain, *, heartbeat_s: float = HEARTBEAT_S) -> None:
        self._line = templates.get_template("_event.html")
        self._drain = drain
        self._heartbeat_s = heartbeat_s

    def render(self, event: events_pb2.Event) -> str:
        """One SSE message for `event`."""
        when = event.time.ToDatetime(tzinfo=UTC).strftime("%H:%M:%S") if event.HasField("time") else ""
        html = self._line.render(time=when, type=event.type, subject=event_subject(event),
                                 summary=event_summary(event), source=event.source)
        data = " ".join(html.split())  # one `data:` line: newlines would split the message
        return f"event: {event_kind(event)}\ndata: {data}\n\n"

    async def stream(self, bus: EventBus | None) -> AsyncIterator[str]:
        """SSE messages of `bus`'s events (none without a bus) until the router drains (the
        server cancels it when the client leaves)."""
        pending: asyncio.Queue[events_pb2.Event | None] = asyncio.Queue(MAX_PENDING)

        async def keep(event: events_pb2.Event) -> None:
            try:
                pending.put_nowait(event)
            except asyncio.QueueFull:
                log.warning("admin UI feed: a client fell behind; asking it to reload")
                while not pending.empty():
                    pending.get_nowait()
                pending.put_nowait(None)

        subscription = await bus.subscribe(ALL_EVENTS, keep) if bus is not None else None
        try:
            yield ": connected\n\n"
            since_beat = 0.0
            while not self._drain.draining:
                try:
                    event = await asyncio.wait_for(pending.get(), DRAIN_CHECK_S)
                except TimeoutError:
                    since_beat += DRAIN_CHECK_S
                    if since_beat >= self._heartbeat_s:
                        since_beat = 0.0
                        yield ": heartbeat\n\n"
                    continue
                yield self.render(event) if event is not None else f"event: {RESYNC}\ndata: {RESYNC}\n\n"
        finally:
            if subscription is not None:
                await subscription.unsubscribe()
