"""Events on a real nats-server: JetStream publishing, dedupe, and the Postgres outbox."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy
from polling import wait_until
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from roundhouse.v1 import events_pb2
from services.common.db import OutboxEvent
from services.common.events import (
    STREAM_NAME,
    EventBus,
    EventPublishError,
    decode_event,
    new_event,
    subject_for,
)
from services.common.outbox import OutboxRelay, add_to_outbox


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[EventBus]:
    bus = await EventBus.connect(nats_url, name="test-events")
    yield bus
    await bus.close()


async def read_stream(bus: EventBus, subject: str, count: int) -> list:
    """The first `count` stored messages on `subject`, in stream order."""
    sub = await bus.js.pull_subscribe(
        subject, stream=STREAM_NAME,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=30.0),
    )
    try:
        msgs: list = []
        while len(msgs) < count:
            msgs += await sub.fetch(count - len(msgs), timeout=5)
        return msgs
    finally:
        await sub.unsubscribe()


async def stored_count(bus: EventBus, subject: str) -> int:
    info = await bus.js.stream_info(STREAM_NAME, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


def test_subjects_name_the_entity_the_event_is_about() -> None:
    assert subject_for(new_event("model.loaded", "worker", asset_id="m1")) == (
        "roundhouse.events.model.loaded.m1"
    )
    assert subject_for(new_event("asset.deleted", "registry", asset_id="m1")) == (
        "roundhouse.events.asset.deleted.m1"
    )
    assert subject_for(new_event("job.progress", "jobs", job_id="j1", asset_id="m1")) == (
        "roundhouse.events.job.progress.j1"
    )
    assert subject_for(new_event("worker.down", "router", worker_id="w1")) == (
        "roundhouse.events.worker.down.w1"
    )
    with pytest.raises(ValueError, match="needs job_id"):
        new_event("job.queued", "jobs", asset_id="m1")
    with pytest.raises(ValueError, match="unknown event type"):
        new_event("thing.happened", "jobs", asset_id="m1")
    with pytest.raises(ValueError, match="one detail"):
        new_event("model.loaded", "worker", asset_id="m1",
                  model=events_pb2.ModelEventDetail(), job=events_pb2.JobEventDetail())


async def test_publish_stores_proto_json_with_msg_id(bus: EventBus) -> None:
    asset_id = f"pub-{uuid.uuid4().hex[:8]}"
    event = new_event("model.loaded", "worker", asset_id=asset_id, request_id="r-1",
                      model=events_pb2.ModelEventDetail(load_seconds=0.25, memory_bytes=1024))
    ack = await bus.publish(event)
    assert ack.stream == STREAM_NAME and not ack.duplicate

    [msg] = await read_stream(bus, subject_for(event), 1)
    assert msg.subject == f"roundhouse.events.model.loaded.{asset_id}"
    assert msg.headers["Nats-Msg-Id"] == event.event_id
    assert json.loads(msg.data)["model"]["loadSeconds"] == 0.25
    assert decode_event(msg.data) == event


async def test_republishing_an_event_is_deduplicated(bus: EventBus) -> None:
    event = new_event("worker.up", "worker", worker_id=f"w-{uuid.uuid4().hex[:8]}")
    first = await bus.publish(event)
    second = await bus.publish(event)
    assert second.duplicate and second.seq == first.seq
    assert await stored_count(bus, subject_for(event)) == 1


async def test_core_subscription_gets_decoded_events(bus: EventBus) -> None:
    job_id = str(uuid.uuid4())
    got: asyncio.Queue[events_pb2.Event] = asyncio.Queue()

    async def handler(event: events_pb2.Event) -> None:
        await got.put(event)

    sub = await bus.subscribe(f"roundhouse.events.job.*.{job_id}", handler)
    await bus.nc.flush()
    event = new_event("job.progress", "jobs", job_id=job_id,
                      job=events_pb2.JobEventDetail(progress=40, message="downloading"))
    await bus.publish(event)
    assert await asyncio.wait_for(got.get(), 5) == event
    await sub.unsubscribe()


async def _published(sessionmaker: async_sessionmaker[AsyncSession], ids: list[str]) -> bool:
    async with sessionmaker() as session:
        rows = (await session.scalars(
            select(OutboxEvent).where(OutboxEvent.event_id.in_([uuid.UUID(i) for i in ids]))
        )).all()
    return len(rows) == len(ids) and all(r.published_at is not None for r in rows)


async def test_outbox_delivers_events_committed_while_nats_was_down(
    nats_factory, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    server = nats_factory()
    bus = await EventBus.connect(server.url, name="test-outbox", reconnect_time_wait=0.1)
    relay = OutboxRelay(sessionmaker, bus, max_backoff_s=0.5)
    relay.start()
    try:
        server.stop()

        async def disconnected() -> bool:
            return not bus.is_connected

        await wait_until(disconnected)
        job_id = str(uuid.uuid4())
        events = [new_event("job.queued", "jobs", job_id=job_id)]
        events += [new_event("job.progress", "jobs", job_id=job_id,
                             job=events_pb2.JobEventDetail(progress=p)) for p in (10, 50, 90)]
        events += [new_event("job.succeeded", "jobs", job_id=job_id)]
        for event in events:
            async with sessionmaker() as session, session.begin():
                add_to_outbox(session, event)
            relay.notify()
        with pytest.raises(EventPublishError):
            await bus.publish(new_event("worker.up", "worker", worker_id="w"))
        assert not await _published(sessionmaker, [e.event_id for e in events])

        server.start()
        await wait_until(lambda: _published(sessionmaker, [e.event_id for e in events]))
        msgs = await read_stream(bus, f"roundhouse.events.job.*.{job_id}", len(events))
        assert [decode_event(m.data) for m in msgs] == events
        assert [m.headers["Nats-Msg-Id"] for m in msgs] == [e.event_id for e in events]
    finally:
        await relay.stop()
        await bus.close()


async def test_outbox_never_publishes_a_rolled_back_event(
    bus: EventBus, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    # A long poll interval: only notify() can make the relay publish within the deadline.
    relay = OutboxRelay(sessionmaker, bus, poll_interval_s=60.0)
    relay.start()
    try:
        rolled_back = new_event("asset.applied", "registry", asset_id=f"rb-{uuid.uuid4().hex[:8]}")
        with pytest.raises(RuntimeError):
            async with sessionmaker() as session, session.begin():
                add_to_outbox(session, rolled_back)
                await session.flush()
                raise RuntimeError("the change it reports failed")
        committed = new_event("asset.applied", "registry", asset_id=f"ok-{uuid.uuid4().hex[:8]}")
        async with sessionmaker() as session, session.begin():
            add_to_outbox(session, committed)
        relay.notify()
        await wait_until(lambda: _published(sessionmaker, [committed.event_id]), timeout=5)

        assert await stored_count(bus, subject_for(committed)) == 1
        assert await stored_count(bus, subject_for(rolled_back)) == 0
        async with sessionmaker() as session:
            assert await session.scalar(
                select(OutboxEvent).where(OutboxEvent.event_id == uuid.UUID(rolled_back.event_id))
            ) is None
    finally:
        await relay.stop()
