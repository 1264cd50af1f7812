"""Lifecycle events on NATS JetStream: subjects, the `Event` envelope, and the bus.

Every event is a `roundhouse.v1.Event` published as proto3 JSON on
`roundhouse.events.<type>.<id>` into the `ROUNDHOUSE_EVENTS` stream, with header
`Nats-Msg-Id` set to its `event_id` so JetStream drops a re-published copy within the
stream's duplicate window. Events tied to a database change go through the outbox
(`services.common.outbox`) instead of being published directly.
Events carry the publisher's trace context and request id as headers (`traceparent`,
`x-request-id`...), and handlers run inside them (`delivered_in`).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime

import nats.errors
import nats.js.errors
from google.protobuf import json_format
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import PubAck, StorageType, StreamConfig

from roundhouse.v1 import events_pb2
from services.common import tracing

logger = logging.getLogger(__name__)

STREAM_NAME = "ROUNDHOUSE_EVENTS"
SUBJECT_PREFIX = "roundhouse.events"
ALL_EVENTS = f"{SUBJECT_PREFIX}.>"
STREAM_MAX_AGE_S = 7 * 24 * 3600.0
# Longer than JetStream's 2 min default: the outbox relay may re-publish after an outage.
STREAM_DUPLICATE_WINDOW_S = 600.0
# Heartbeats are liveness signals, not events to keep: core NATS, outside the stream.
HEARTBEAT_PREFIX = "roundhouse.heartbeat.worker"
ALL_HEARTBEATS = f"{HEARTBEAT_PREFIX}.>"

# Which envelope field names the entity an event type is about.
_ID_FIELD = {"model": "asset_id", "asset": "asset_id", "job": "job_id", "worker": "worker_id",
             "key": "key_name"}
_FORBIDDEN_IN_TOKEN = set(" \t\r\n*>")

EventHandler = Callable[[events_pb2.Event], Awaitable[None]]


class EventPublishError(RuntimeError):
    """An event was not stored by JetStream (NATS unreachable, no ack, or an error ack)."""


def subject_for(event: events_pb2.Event) -> str:
    """`roundhouse.events.<type>.<id>`; the id is the asset, job, worker or key (by name) the
    type is about."""
    kind, _, name = event.type.partition(".")
    field = _ID_FIELD.get(kind)
    if field is None or not name:
        raise ValueError(f"unknown event type {event.type!r}")
    ident = getattr(event, field)
    if not ident:
        raise ValueError(f"a {event.type} event needs {field}")
    if _FORBIDDEN_IN_TOKEN & set(ident):
        raise ValueError(f"{field} {ident!r} cannot be used in a NATS subject")
    return f"{SUBJECT_PREFIX}.{event.type}.{ident}"


def event_type_of(subject: str) -> str:
    """The event type (`job.succeeded`) an event subject (`roundhouse.events.job.succeeded.<id>`)
    names; empty for a subject outside the event stream."""
    if not subject.startswith(f"{SUBJECT_PREFIX}."):
        return ""
    kind_and_name = subject[len(SUBJECT_PREFIX) + 1:].split(".")[:2]
    return ".".join(kind_and_name) if len(kind_and_name) == 2 else ""


@contextmanager
def delivered_in(headers: Mapping[str, str] | None) -> Iterator[None]:
    """Run the block inside the trace and request a message's headers name (as it is, when
    they name none): wrap every handler of a delivered event in it."""
    headers = headers or {}
    with tracing.joined(headers.get("traceparent", ""), tracing.request_id_from(headers)):
        yield


def heartbeat_subject(worker_id: str) -> str:
    """`roundhouse.heartbeat.worker.<worker_id>`: where a worker's heartbeats go."""
    if not worker_id or _FORBIDDEN_IN_TOKEN & set(worker_id):
        raise ValueError(f"worker id {worker_id!r} cannot be used in a NATS subject")
    return f"{HEARTBEAT_PREFIX}.{worker_id}"


def new_event(
    type: str,
    source: str,
    *,
    asset_id: str = "",
    worker_id: str = "",
    job_id: str = "",
    request_id: str = "",
    key_name: str = "",
    model: events_pb2.ModelEventDetail | None = None,
    job: events_pb2.JobEventDetail | None = None,
    worker: events_pb2.WorkerEventDetail | None = None,
    asset: events_pb2.AssetEventDetail | None = None,
) -> events_pb2.Event:
    """Build an event with a fresh id and the current time; at most one detail may be given.

    Raises `ValueError` when the type is unknown or the id its subject needs is missing.
    """
    details = {"model": model, "job": job, "worker": worker, "asset": asset}
    given = {k: v for k, v in details.items() if v is not None}
    if len(given) > 1:
        raise ValueError(f"an event carries one detail, got {sorted(given)}")
    event = events_pb2.Event(
        event_id=str(uuid.uuid4()), type=type, source=source, asset_id=asset_id,
        worker_id=worker_id, job_id=job_id, request_id=request_id, key_name=key_name, **given,
    )
    event.time.FromDatetime(datetime.now(UTC))
    subject_for(event)
    return event


def encode_event(event: events_pb2.Event) -> bytes:
    """The event as published: proto3 JSON, UTF-8."""
    return json_format.MessageToJson(event, indent=None).encode()


def decode_event(msg_data: bytes) -> events_pb2.Event:
    """Parse a published event; fields added by newer publishers are ignored."""
    return json_format.Parse(msg_data, events_pb2.Event(), ignore_unknown_fields=True)


def stream_config() -> StreamConfig:
    """The `ROUNDHOUSE_EVENTS` stream: every event subject, on disk, kept for 7 days."""
    return StreamConfig(name=STREAM_NAME, subjects=[ALL_EVENTS], storage=StorageType.FILE,
                        max_age=STREAM_MAX_AGE_S, duplicate_window=STREAM_DUPLICATE_WINDOW_S)


class EventBus:
    """A NATS connection that publishes events to JetStream and checks every ack.

    The connection reconnects forever, so a NATS outage makes publishes fail (and the
    outbox keep its rows) but never closes the bus. Create it with `EventBus.connect`.
    """

    def __init__(self, nc: Client, publish_timeout: float) -> None:
        self._nc = nc
        self._js: JetStreamContext = nc.jetstream()
        self._publish_timeout = publish_timeout
        self._reconnect_listeners: list[Callable[[], None]] = []
        self._closing = False

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        name: str = "roundhouse",
        reconnect_time_wait: float = 2.0,
        publish_timeout: float = 5.0,
        ensure_stream: bool = True,
    ) -> EventBus:
        """Connect to NATS at `url` and make sure the event stream exists. Keeps retrying until
        the server answers (wrap it in a timeout to bound that)."""
        nc = Client()
        bus = cls(nc, publish_timeout)

        async def on_error(exc: Exception) -> None:
            logger.warning("NATS connection %s: %s", name, exc)

        async def on_disconnected() -> None:
            if not bus._closing:
                logger.warning("NATS connection %s lost; reconnecting", name)

        async def on_reconnected() -> None:
            logger.info("NATS connection %s restored", name)
            bus._fire_reconnected()

        await nc.connect(
            url, name=name, max_reconnect_attempts=-1,
            reconnect_time_wait=reconnect_time_wait,  # type: ignore[arg-type]
            error_cb=on_error, disconnected_cb=on_disconnected, reconnected_cb=on_reconnected,
        )
        if ensure_stream:
            await bus.ensure_stream()
        return bus

    @property
    def nc(self) -> Client:
        """The underlying NATS connection, for consumers that need more than this API."""
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        """The JetStream context of the connection (durable consumers, stream info)."""
        return self._js

    @property
    def is_connected(self) -> bool:
        """Whether the connection is up right now (False while reconnecting)."""
        return self._nc.is_connected

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        """Call `callback` (synchronously, on the loop) each time the connection comes back."""
        self._reconnect_listeners.append(callback)

    def _fire_reconnected(self) -> None:
        for callback in self._reconnect_listeners:
            try:
                callback()
            except Exception:
                logger.exception("reconnect listener failed")

    async def ensure_stream(self) -> None:
        """Create the event stream, or bring an existing one to the expected config."""
        config = stream_config()
        try:
            await self._js.stream_info(STREAM_NAME)
        except nats.js.errors.NotFoundError:
            try:
                await self._js.add_stream(config)
                return
            except nats.js.errors.BadRequestError:
                pass  # created concurrently by another process: update it below
        await self._js.update_stream(config)

    async def publish(self, event: events_pb2.Event) -> PubAck:
        """Publish one event, with the current trace context and request id as headers, and wait
        for JetStream's ack; raise `EventPublishError` if none."""
        return await self.publish_raw(subject_for(event), encode_event(event), event.event_id,
                                      trace=tracing.carrier())

    async def publish_raw(
        self, subject: str, payload: bytes, event_id: str, *, trace: Mapping[str, str] | None = None
    ) -> PubAck:
        """Publish already-encoded event bytes (the outbox path); same guarantees as `publish`.

        `trace` (a `tracing.carrier()`: `traceparent`, `x-request-id`...) goes along as headers.
        A duplicate (same `event_id` within the duplicate window) is acked and not stored
        twice. Fails at once while the connection is down rather than queueing the message.
        """
        headers = {k: v for k, v in (trace or {}).items() if v}
        headers["Nats-Msg-Id"] = event_id
        if not self.is_connected:
            raise EventPublishError(f"not connected to NATS; {subject} not published")
        try:
            ack = await self._publish_once(subject, payload, headers)
        except nats.js.errors.NoStreamResponseError:
            # The server lost the stream (restarted without its store): recreate, retry once.
            try:
                await self.ensure_stream()
                ack = await self._publish_once(subject, payload, headers)
            except (nats.errors.Error, TimeoutError) as exc:
                raise EventPublishError(f"{subject}: {exc!r}") from exc
        except (nats.errors.Error, TimeoutError) as exc:
            raise EventPublishError(f"{subject}: {exc!r}") from exc
        if ack.stream != STREAM_NAME:
            raise EventPublishError(f"{subject}: acked by stream {ack.stream!r}")
        return ack

    async def _publish_once(self, subject: str, payload: bytes, headers: dict[str, str]) -> PubAck:
        return await self._js.publish(subject, payload, timeout=self._publish_timeout,
                                      stream=STREAM_NAME, headers=headers)

    async def subscribe(
        self, subject: str, handler: EventHandler, *, queue: str = ""
    ) -> Subscription:
        """Core (not durable) subscription: `handler` gets each decoded event on `subject`.

        Sees only events published while subscribed; use a JetStream consumer (`js`) to
        read history or to survive restarts (with `delivered_in` around its handler). `handler`
        runs inside the trace and request the headers name; undecodable messages are skipped.
        """

        async def on_message(msg: Msg) -> None:
            try:
                event = decode_event(msg.data)
            except json_format.ParseError:
                logger.warning("dropping undecodable message on %s", msg.subject)
                return
            with delivered_in(msg.headers):
                await handler(event)

        return await self._nc.subscribe(subject, queue=queue, cb=on_message)

    async def close(self) -> None:
        """Drain subscriptions and pending publishes, then close the connection."""
        if self._nc.is_closed:
            return
        self._closing = True
        try:
            await self._nc.drain()
        except (nats.errors.Error, TimeoutError) as exc:
            logger.warning("NATS drain failed (%r); closing", exc)
            await self._nc.close()
