"""`GET /ui/events`: the live feed the admin UI's pages listen to, as server-sent events.

Each event published on NATS (`roundhouse.events.>`) becomes one SSE message whose `event:` is
the event's kind (`model`, `job`, `worker`, `asset`, `key`: what a page fragment re-fetches on)
and whose `data:` is the event as one line of the live event log, already rendered as HTML. The
feed is live only (a page that opens it re-fetches its fragments once, so nothing that happened
before is missed); `GET /admin/v1/events` is the resumable feed for API clients. A comment goes
out every `heartbeat_s` so proxies keep the connection open.

The feed lasts as long as its session: it ends at once on logout, when a `key.revoked` event
names the session's key, and at the first heartbeat or key event after the session is otherwise
over (its key expired or refused, idle). It also ends when the client goes away or the router
begins to drain.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC

import anyio
import nats.errors
from google.protobuf import json_format
from jinja2 import Environment

from roundhouse.v1 import events_pb2
from services.common.drain import Drain
from services.common.events import ALL_EVENTS, EventBus
from services.common.operation_names import type_name
from services.router.ui.freshness import PictureRefresh
from services.router.ui.session import UiSession, UiSessions

log = logging.getLogger(__name__)

HEARTBEAT_S = 15.0
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

    def __init__(self, templates: Environment, drain: Drain, pictures: PictureRefresh, *,
                 heartbeat_s: float = HEARTBEAT_S) -> None:
        """`pictures` hears of every event but a key's (and of every feed opened): the views
        refresh what they show after it."""
        self._line = templates.get_template("_event.html")
        self._drain = drain
        self._pictures = pictures
        self._heartbeat_s = heartbeat_s

    def render(self, event: events_pb2.Event) -> str:
        """One SSE message for `event`."""
        when = event.time.ToDatetime(tzinfo=UTC).strftime("%H:%M:%S") if event.HasField("time") else ""
        html = self._line.render(time=when, type=event.type, subject=event_subject(event),
                                 summary=event_summary(event), source=event.source)
        data = " ".join(html.split())  # one `data:` line: newlines would split the message
        return f"event: {event_kind(event)}\ndata: {data}\n\n"

    async def stream(self, bus: EventBus | None, session: UiSession, sessions: UiSessions) -> AsyncIterator[str]:
        """SSE messages of `bus`'s events (none without a bus) while `session` lasts and the
        router does not drain (the server cancels it when the client leaves)."""
        pending: asyncio.Queue[events_pb2.Event | None] = asyncio.Queue(MAX_PENDING)

        async def keep(event: events_pb2.Event) -> None:
            if event_kind(event) != "key":
                self._pictures.changed()
            try:
                pending.put_nowait(event)
            except asyncio.QueueFull:
                log.warning("admin UI feed: a client fell behind; asking it to reload")
                while not pending.empty():
                    pending.get_nowait()
                pending.put_nowait(None)

        subscription = await bus.subscribe(ALL_EVENTS, keep) if bus is not None else None
        self._pictures.changed()  # the page re-fetches its fragments once the feed is open
        ends = [asyncio.ensure_future(self._drain.wait_begun()), asyncio.ensure_future(session.closed.wait())]
        next_event: asyncio.Future[events_pb2.Event | None] | None = None
        loop = asyncio.get_running_loop()
        try:
            yield ": connected\n\n"
            beat_at = loop.time() + self._heartbeat_s
            while True:
                next_event = next_event or asyncio.ensure_future(pending.get())
                await asyncio.wait([next_event, *ends], timeout=max(0.0, beat_at - loop.time()),
                                   return_when=asyncio.FIRST_COMPLETED)
                if any(end.done() for end in ends):
                    return
                if next_event.done():
                    event = next_event.result()
                    next_event = None
                    if event is None:
                        yield f"event: {RESYNC}\ndata: {RESYNC}\n\n"
                        continue
                    if event_kind(event) == "key" and not await _outlives(event, session, sessions):
                        return
                    yield self.render(event)
                    continue
                beat_at = loop.time() + self._heartbeat_s
                if not await sessions.still_open(session):
                    return
                yield ": heartbeat\n\n"
        finally:
            for task in (*ends, next_event):
                if task is not None:
                    task.cancel()
            if subscription is not None:
                # Shielded: a client that went away cancels this feed, and its subscription must still go.
                with anyio.CancelScope(shield=True):
                    try:
                        await subscription.unsubscribe()
                    except nats.errors.Error as exc:  # the connection is closing: the subscription goes with it
                        log.debug("admin UI feed: unsubscribe failed: %r", exc)


async def _outlives(event: events_pb2.Event, session: UiSession, sessions: UiSessions) -> bool:
    """Whether `session` is still signed in after the key event `event`; a revocation of its
    own key closes it at once (the key cache may not have heard of it yet)."""
    if event.type == "key.revoked" and session.key is not None and event.key_name == session.key.name:
        sessions.close(session)
        return False
    return await sessions.still_open(session)
