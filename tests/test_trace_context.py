"""Trace context and request ids through NATS, the outbox and the jobs service.

A parent span comes from an SDK tracer of the test's own (the global provider stays unset, as in
a service without an exporter): what is published or submitted inside it must reach the
subscriber, or run, inside the same trace and as part of the same request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from jobs_harness import add_model, copy_model, jobs_settings, running_jobs, submit, uid, watch_until_done
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from registry_harness import RunningRegistry

from roundhouse.v1 import events_pb2, jobs_pb2
from services.common.db.engine import make_engine, make_sessionmaker
from services.common.events import EventBus, new_event
from services.common.outbox import OutboxRelay, add_to_outbox
from services.common.tracing import current_request_id, request_id_scope

TRACER = TracerProvider().get_tracer("test")


@dataclass
class Delivery:
    """An event as a subscriber's handler saw it, with the trace and request it ran in."""

    event: events_pb2.Event
    trace_id: int
    request_id: str


@dataclass
class Deliveries:
    """What a subscriber received, in arrival order."""

    seen: list[Delivery] = field(default_factory=list)
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def handle(self, event: events_pb2.Event) -> None:
        """Subscription handler: note the trace and request it runs in."""
        context = trace.get_current_span().get_span_context()
        async with self.arrived:
            self.seen.append(Delivery(event, context.trace_id, current_request_id()))
            self.arrived.notify_all()

    async def first(self, type: str, **fields: str) -> Delivery:
        """The first delivery of that type whose event has those fields, waiting for it."""
        def found() -> Delivery | None:
            return next((d for d in self.seen if d.event.type == type and all(
                getattr(d.event, k) == v for k, v in fields.items())), None)

        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(lambda: found() is not None), 30)
        delivery = found()
        assert delivery is not None
        return delivery


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[EventBus]:
    connected = await EventBus.connect(nats_url, name="test-trace-context")
    yield connected
    await connected.close()


async def subscribed(bus: EventBus, subject: str) -> Deliveries:
    deliveries = Deliveries()
    await bus.subscribe(subject, deliveries.handle)
    await bus.nc.flush()
    return deliveries


async def test_an_event_published_in_a_span_is_handled_in_its_trace_and_request(bus: EventBus) -> None:
    deliveries = await subscribed(bus, "roundhouse.events.worker.down.>")
    worker_id = uid("w")
    with TRACER.start_as_current_span("publisher") as span, request_id_scope("req-event"):
        await bus.publish(new_event("worker.down", "test", worker_id=worker_id))
    untraced = uid("w")
    await bus.publish(new_event("worker.down", "test", worker_id=untraced))

    delivery = await deliveries.first("worker.down", worker_id=worker_id)
    assert delivery.trace_id == span.get_span_context().trace_id
    assert delivery.request_id == "req-event"
    other = await deliveries.first("worker.down", worker_id=untraced)
    assert (other.trace_id, other.request_id) == (0, "")


async def test_an_outbox_event_is_published_in_the_trace_of_the_transaction_that_wrote_it(
    bus: EventBus, db_dsn: str
) -> None:
    deliveries = await subscribed(bus, "roundhouse.events.worker.down.>")
    engine = make_engine(db_dsn)
    sessions = make_sessionmaker(engine)
    relay = OutboxRelay(sessions, bus)
    relay.start()
    worker_id = uid("w")
    try:
        with TRACER.start_as_current_span("writer") as span, request_id_scope("req-outbox"):
            async with sessions() as session, session.begin():
                add_to_outbox(session, new_event("worker.down", "test", worker_id=worker_id))
        relay.notify()
        delivery = await deliveries.first("worker.down", worker_id=worker_id)
    finally:
        await relay.stop()
        await engine.dispose()

    assert delivery.trace_id == span.get_span_context().trace_id
    assert delivery.request_id == "req-outbox"


@pytest.mark.usefixtures("no_leftover_operations")
async def test_an_operation_runs_in_the_trace_and_request_that_submitted_it(
    registry: RunningRegistry, bus: EventBus, db_dsn: str, nats_url: str, tiny_llama: Path,
    tmp_path: Path,
) -> None:
    asset_id = await add_model(registry, copy_model(tiny_llama, tmp_path / "sources"))
    deliveries = await subscribed(bus, "roundhouse.events.job.>")
    async with running_jobs(jobs_settings(db_dsn, nats_url, tmp_path, registry.address)) as jobs:
        with TRACER.start_as_current_span("submitter") as span, request_id_scope("req-install"):
            op = await jobs.stub.SubmitOperation(submit(asset_id))
        final = (await watch_until_done(jobs.stub, op.operation_id))[-1]
        assert final.status == jobs_pb2.OPERATION_STATUS_SUCCEEDED
        # Written by the executor as it runs the operation, not by the submission.
        progress = await deliveries.first("job.progress", job_id=op.operation_id)
        succeeded = await deliveries.first("job.succeeded", job_id=op.operation_id)

    trace_id = span.get_span_context().trace_id
    assert (progress.trace_id, progress.request_id) == (trace_id, "req-install")
    assert (succeeded.trace_id, succeeded.request_id) == (trace_id, "req-install")
