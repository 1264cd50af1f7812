"""`GET /admin/v1/events`: the lifecycle events of the `ROUNDHOUSE_EVENTS` JetStream stream as
server-sent events, live, resumable (an admin key is needed, as for every `/admin/v1` route).

Each event is one SSE message: `id:` its stream sequence, `event:` its type (`model.loaded`...),
`data:` the `roundhouse.v1.Event` as proto3 JSON (as published). A client that reconnects with
`Last-Event-ID` (the header, or `?last_event_id=`) gets exactly the events after that one that
match its subject; without, it gets the events from now on (`?since=all`: every event the
stream still holds first). A comment line every `HEARTBEAT_S` keeps proxies from closing an idle
feed. The feed reads through an ephemeral ordered consumer of its own, made before the response
starts (so that a bad subject is a 400 and an unreachable stream a 503) and dropped however the
response ends, even when the client went away before its first byte. The feed ends as soon as
the router begins to drain.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator
from typing import Annotated, Any, Literal

import anyio
import nats.errors
import nats.js.errors
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from google.protobuf import json_format
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from starlette.types import Receive, Scope, Send

from services.common.drain import Drain
from services.common.errors import FieldProblem, InvalidArgument
from services.common.events import ALL_EVENTS, STREAM_NAME, EventBus, decode_event
from services.router.http.errors import HTTPProblem
from services.router.http.protocol import ErrorResponse

log = logging.getLogger(__name__)

HEARTBEAT_S = 15.0
CONSUMER_INACTIVE_S = 10.0
"""JetStream drops a feed's consumer this long after nobody reads it (the feed unsubscribes when
it ends; this also covers a router that dies with feeds open)."""
SUBJECT_PATTERN = r"^roundhouse\.events(\.([^\x00-\x20.*>\x7f]+|\*))*\.([^\x00-\x20.*>\x7f]+|\*|>)$"
"""A NATS subject filter inside `roundhouse.events.>`: tokens without spaces or dots, `*` for
any one token, `>` (last) for the rest."""
SEQUENCE_PATTERN = r"^[0-9]{1,19}$"

events_router = APIRouter(prefix="/admin/v1", tags=["admin"])


def _sequence(value: str | None, field: str) -> int | None:
    if value is None or value == "":
        return None
    if not value.isascii() or not value.isdigit() or len(value) > 19:
        raise InvalidArgument.from_problems([FieldProblem(field, "expected an event id (a stream sequence number)")])
    return int(value)


def _unavailable() -> HTTPProblem:
    return HTTPProblem(503, "The event stream is unavailable; retry later.", "events_unavailable",
                       "service_unavailable_error", headers={"Retry-After": "2"})


def sse_message(sequence: int, event_type: str, data: dict[str, Any]) -> str:
    """One SSE message (the JSON on one line, so one `data:` field)."""
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"id: {sequence}\nevent: {event_type}\ndata: {body}\n\n"


def _consumer(after: int | None, since: str) -> ConsumerConfig:
    if after is not None:
        return ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after + 1,
                              inactive_threshold=CONSUMER_INACTIVE_S)
    return ConsumerConfig(deliver_policy=DeliverPolicy.ALL if since == "all" else DeliverPolicy.NEW,
                          inactive_threshold=CONSUMER_INACTIVE_S)


async def _feed(subscription: Any, drain: Drain) -> AsyncGenerator[str, None]:
    """The SSE messages of the events `subscription` delivers, a heartbeat comment when none
    came for `HEARTBEAT_S`; ends when the drain begins (or the connection to NATS closes)."""
    drained = asyncio.ensure_future(drain.wait_begun())
    arrival: asyncio.Future[Any] | None = None
    try:
        while not drain.draining:
            arrival = asyncio.ensure_future(subscription.next_msg(timeout=HEARTBEAT_S))
            await asyncio.wait((arrival, drained), return_when=asyncio.FIRST_COMPLETED)
            if not arrival.done():
                return
            try:
                msg = arrival.result()
            except nats.errors.TimeoutError:
                yield ": keep-alive\n\n"
                continue
            except nats.errors.ConnectionClosedError:
                return
            try:
                event = decode_event(msg.data)
            except json_format.ParseError:
                log.warning("event feed: skipping an undecodable message on %s", msg.subject)
                continue
            yield sse_message(msg.metadata.sequence.stream, event.type, json_format.MessageToDict(event))
    finally:
        _drop(drained)
        if arrival is not None:
            _drop(arrival)


def _drop(waiting: asyncio.Future[Any]) -> None:
    """Cancel a wait whose outcome nobody reads (retrieved here, so never reported)."""
    if not waiting.done():
        waiting.add_done_callback(lambda done: done.cancelled() or done.exception())
        waiting.cancel()


class EventFeedResponse(StreamingResponse):
    """The feed as a streamed response that owns its subscription: the consumer is dropped
    however the response ends (the feed ended, the client went away mid-stream, or before
    the response even started, when the feed never ran)."""

    def __init__(self, subscription: Any, drain: Drain) -> None:
        self._subscription = subscription
        self._messages = _feed(subscription, drain)
        super().__init__(self._messages, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Stream the feed; then, whatever happened, close it and drop its consumer."""
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Shielded: a client that went away cancels this response, and its consumer must
            # still go.
            with anyio.CancelScope(shield=True):
                await self._messages.aclose()
                try:
                    await self._subscription.unsubscribe()
                except nats.errors.Error as exc:  # the connection is closing: the consumer goes with it
                    log.debug("event feed: unsubscribe failed: %r", exc)


@events_router.get(
    "/events", response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                     "description": "Server-sent events, one per lifecycle event, until the client leaves."},
               400: {"model": ErrorResponse, "description": "A parameter is invalid; `error.param` names it."},
               503: {"model": ErrorResponse, "description": "The event stream is unavailable; see Retry-After."}},
)
async def events(
    request: Request,
    subject: Annotated[str, Query(pattern=SUBJECT_PATTERN, max_length=256, description=(
        "A NATS subject filter inside `roundhouse.events.>`, e.g. `roundhouse.events.model.>`."))] = ALL_EVENTS,
    since: Annotated[Literal["", "all"], Query(description=(
        "`all`: start with every event the stream holds; default: only new ones."))] = "",
    last_event_id: Annotated[str | None, Query(pattern=SEQUENCE_PATTERN, description=(
        "Resume after this event id (as `Last-Event-ID` does; the header wins)."))] = None,
    last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID", description=(
        "Resume after this event id, as browsers send it when they reconnect."))] = None,
) -> StreamingResponse:
    """The lifecycle events (`model.*`, `job.*`, `asset.*`, `worker.*`, `key.*`) matching
    `subject`, live, as server-sent events; resumable with `Last-Event-ID`."""
    after = _sequence(last_event_id_header, "Last-Event-ID")
    if after is None:
        after = _sequence(last_event_id, "last_event_id")
    bus: EventBus | None = getattr(request.app.state, "bus", None)
    if bus is None or not bus.is_connected:
        raise _unavailable()
    js: JetStreamContext = bus.js
    try:
        subscription = await js.subscribe(subject, stream=STREAM_NAME, ordered_consumer=True,
                                          config=_consumer(after, since))
    except nats.js.errors.BadRequestError as exc:
        raise InvalidArgument.from_problems(
            [FieldProblem("subject", f"not a filter of the event stream ({exc.description})")]) from None
    except (nats.errors.Error, TimeoutError) as exc:
        log.warning("event feed: no consumer: %r", exc)
        raise _unavailable() from None
    return EventFeedResponse(subscription, request.app.state.drain)
