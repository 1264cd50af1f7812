"""Sending one admitted request to a worker that holds its asset, and on to another when that
one cannot take it.

A request goes to the holder with free slots (see `WorkerPool.pick`), woken first when none
holds it, with its deadline (the call's gRPC timeout) and what is left of its queue budget
(`QueueBudget.metadata`). Before its first chunk, a refusal ends the request only when no other
worker may serve it:

- `Overloaded` (the worker's slots and queue are full, or the budget ran out there): another
  holder with free slots, if any; else the refusal is the answer (429);
- `ShuttingDown`, unreachable or not ready there: that worker is left out for this request and
  another holder (or a wake elsewhere) is tried; none, 503;
- `NotFound` (the model moved or was evicted since the picture): the picture is refreshed and
  the request placed again, once; a second time is 503 with Retry-After, never 404.

Once the first chunk has come, a failure is the request's answer. Between two chunks a worker
or upstream may stay silent `stream_idle_timeout_s` at most (the first may also wait the
queue budget). However a request ends, its call is cancelled.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncGenerator
from contextlib import aclosing

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from roundhouse.v1 import inference_pb2
from services.common.asset_proto import AssetRecord
from services.common.errors import (
    DeadlineExceeded,
    ModelNotReady,
    NotFound,
    Overloaded,
    RoundhouseError,
    ShuttingDown,
    UpstreamError,
)
from services.common.grpc_client import domain_error
from services.common.workerpool import WorkerHandle, WorkerPool
from services.router.admission import QueueBudget
from services.router.deadlines import Deadline
from services.router.metrics import RequestMetrics
from services.router.metrics.spans import failed, start, step
from services.router.remote import RemoteUpstreams
from services.router.usage import UsageTicket
from services.router.waking import ModelWaker

MAX_TRIES = 4
"""Workers one request is sent to at most before the last refusal is its answer."""


class Dispatcher:
    """Places admitted requests on workers (or their remote upstream) and relays the answer."""

    def __init__(self, workers: WorkerPool, waker: ModelWaker, remote: RemoteUpstreams, *,
                 stream_idle_timeout_s: float, metrics: RequestMetrics | None = None) -> None:
        """`metrics`: where wakes are counted (None: nowhere)."""
        self._workers = workers
        self._waker = waker
        self._remote = remote
        self._idle_s = stream_idle_timeout_s
        self._metrics = metrics

    async def chat(self, record: AssetRecord, request: inference_pb2.ChatRequest, *, deadline: Deadline,
                   queue: QueueBudget, ticket: UsageTicket, stream: bool, may_wake: bool = True,
                   ) -> AsyncGenerator[inference_pb2.ChatChunk, None]:
        """The chunks of the request's answer (`request.model` is the asset id). `stream=False`:
        a remote upstream is asked for the whole text, which comes as one chunk. `may_wake`
        False: `ModelNotReady` rather than a wake when no worker holds the asset."""
        asset_id = record.spec.asset_id
        tries = _Tries(self._workers, asset_id)
        while True:
            worker = await self._place(record, tries, deadline, queue, ticket, may_wake)
            if self._remote.skips_worker(record, worker.address):
                async with aclosing(self._remote_chat(record, request, worker, deadline, ticket,
                                                      stream)) as pieces:
                    async for chunk in pieces:
                        yield chunk
                return
            # The span ends with the stream, so it is never made current (that would outlive
            # a `yield`): the call alone is started inside it, and carries it to the worker.
            span = start("dispatch", _dispatch_attributes(asset_id, worker), kind=SpanKind.CLIENT)
            call: grpc.aio.UnaryStreamCall | None = None
            worker.in_flight[asset_id] += 1
            started = False
            try:
                token = otel_context.attach(trace.set_span_in_context(span)) if span.is_recording() else None
                try:
                    call = worker.inference.Chat(request, timeout=deadline.remaining(),
                                                 metadata=queue.metadata())
                finally:
                    if token is not None:
                        otel_context.detach(token)
                ticket.mark_dispatched()
                with self._workers.tracking(worker, call):
                    chunks, source = aiter(call), f"the worker serving '{asset_id}'"
                    wait = queue.left() + self._idle_s
                    while (chunk := await deadline.next_chunk(chunks, wait, source)) is not None:
                        started = True
                        yield chunk
                        wait = self._idle_s
                return
            except (grpc.aio.AioRpcError, ModelNotReady) as exc:
                error = self._worker_error(exc, worker, asset_id, deadline)
                failed(span, error)
                if started:
                    raise error from None
                await tries.after(worker, error)
            except BaseException as exc:
                failed(span, exc)
                raise
            finally:
                if call is not None:
                    call.cancel()
                worker.in_flight[asset_id] -= 1
                span.end()

    async def embed(self, record: AssetRecord, request: inference_pb2.EmbedRequest, *, deadline: Deadline,
                    queue: QueueBudget, ticket: UsageTicket, may_wake: bool = True,
                    ) -> inference_pb2.EmbedResponse:
        """The vectors of the request (`request.model` is the asset id); `may_wake` as for
        `chat`."""
        asset_id = record.spec.asset_id
        tries = _Tries(self._workers, asset_id)
        while True:
            worker = await self._place(record, tries, deadline, queue, ticket, may_wake)
            worker.in_flight[asset_id] += 1
            try:
                with step("dispatch", _dispatch_attributes(asset_id, worker), kind=SpanKind.CLIENT,
                          current=True):
                    try:
                        call = worker.inference.Embed(request, timeout=deadline.remaining(),
                                                      metadata=queue.metadata())
                        ticket.mark_dispatched()
                        with self._workers.tracking(worker, call):
                            return await call
                    except (grpc.aio.AioRpcError, ModelNotReady) as exc:
                        raise self._worker_error(exc, worker, asset_id, deadline) from None
            except RoundhouseError as error:  # the worker's refusal: try another
                await tries.after(worker, error)
            finally:
                worker.in_flight[asset_id] -= 1

    async def count_tokens(self, record: AssetRecord, request: inference_pb2.ChatRequest, *,
                           deadline: Deadline, queue: QueueBudget, ticket: UsageTicket,
                           ) -> inference_pb2.TokenCount:
        """The prompt tokens of the request as a worker holding the asset counts them (woken
        first when none does); placed and retried as `embed` is, a remote asset's included."""
        asset_id = record.spec.asset_id
        tries = _Tries(self._workers, asset_id)
        while True:
            worker = await self._place(record, tries, deadline, queue, ticket, True)
            try:
                with step("dispatch", _dispatch_attributes(asset_id, worker), kind=SpanKind.CLIENT,
                          current=True):
                    try:
                        call = worker.inference.CountTokens(request, timeout=deadline.remaining())
                        with self._workers.tracking(worker, call):
                            return await call
                    except (grpc.aio.AioRpcError, ModelNotReady) as exc:
                        raise self._worker_error(exc, worker, asset_id, deadline) from None
            except RoundhouseError as error:  # the worker's refusal: try another
                await tries.after(worker, error)

    async def _place(self, record: AssetRecord, tries: _Tries, deadline: Deadline, queue: QueueBudget,
                     ticket: UsageTicket, may_wake: bool) -> WorkerHandle:
        """A worker for the request, waking the asset if needed (and allowed); a wake's time is
        not taken from the queue budget."""
        held = self._workers.pick(record.spec.asset_id, tries.excluded)
        if held is not None:  # the common case: no wait, so no deadline scope to set up
            return held
        if not may_wake:
            raise ModelNotReady(f"model '{record.spec.asset_id}' is not loaded, and this request "
                                "may not wake it")
        loop = asyncio.get_running_loop()
        began, woke = loop.time(), False

        def on_wake() -> None:
            nonlocal woke
            woke = True
            ticket.mark_woke()

        try:
            async with deadline.bounding(f"waiting for model '{record.spec.asset_id}' to wake"):
                worker = await self._waker.place(record, exclude=tries.excluded, on_wake=on_wake)
        finally:
            if woke and self._metrics is not None:
                self._metrics.woke(record, loop.time() - began)
        if woke:
            queue.postpone(loop.time() - began)
        return worker

    async def _remote_chat(self, record: AssetRecord, request: inference_pb2.ChatRequest,
                           worker: WorkerHandle, deadline: Deadline, ticket: UsageTicket, stream: bool,
                           ) -> AsyncGenerator[inference_pb2.ChatChunk, None]:
        asset_id = record.spec.asset_id
        ticket.mark_dispatched()
        worker.in_flight[asset_id] += 1
        span = start("dispatch", {**_dispatch_attributes(asset_id, worker), "roundhouse.remote": True},
                     kind=SpanKind.CLIENT)
        try:
            async with aclosing(self._remote.chat(record, request, stream=stream,
                                                  timeout=deadline.remaining())) as pieces:
                # A whole answer comes as one piece, after all of it was generated.
                wait, source = (self._idle_s if stream else math.inf), f"the upstream of '{asset_id}'"
                while (chunk := await deadline.next_chunk(pieces, wait, source)) is not None:
                    if chunk.HasField("usage"):  # the last chunk says which revision answered
                        chunk.revision = record.revision
                    yield chunk
                    wait = self._idle_s
        except BaseException as exc:
            failed(span, exc)
            raise
        finally:
            worker.in_flight[asset_id] -= 1
            span.end()

    def _worker_error(self, exc: grpc.aio.AioRpcError | ModelNotReady, worker: WorkerHandle,
                      asset_id: str, deadline: Deadline) -> RoundhouseError:
        if isinstance(exc, ModelNotReady):
            return exc  # the worker was declared dead during the call (see `WorkerPool.tracking`)
        error = domain_error(
            exc, unavailable=f"the worker serving '{asset_id}' is unavailable; retry later"
        )
        if isinstance(error, DeadlineExceeded):  # the call's only deadline is the request's
            return deadline.exceeded(f"waiting for the worker serving '{asset_id}'")
        if isinstance(error, ShuttingDown):
            self._workers.note_draining(worker)
        # A remote asset's upstream failing says nothing about the worker that relayed it.
        elif exc.code() == grpc.StatusCode.UNAVAILABLE and not isinstance(error, UpstreamError):
            worker.info = None  # stop routing there until a refresh reaches it again
        return error


def _dispatch_attributes(asset_id: str, worker: WorkerHandle) -> dict[str, str]:
    return {"roundhouse.asset_id": asset_id, "server.address": worker.address}


class _Tries:
    """The workers one request was sent to, and whether to send it on after a refusal."""

    def __init__(self, workers: WorkerPool, asset_id: str) -> None:
        self._workers = workers
        self._asset_id = asset_id
        self.excluded: set[str] = set()
        """Addresses of the workers that cannot take this request."""
        self._tries = 0
        self._not_found = 0

    async def after(self, worker: WorkerHandle, error: RoundhouseError) -> None:
        """Return to try again after `worker` refused the request before its first chunk;
        raise the request's answer when there is nowhere else to go."""
        self._tries += 1
        if self._tries >= MAX_TRIES:
            raise error from None
        if isinstance(error, NotFound):
            self._not_found += 1
            if self._not_found > 1:
                raise ModelNotReady(f"model '{self._asset_id}' moved off its workers while this "
                                    "request was being placed; retry later", retry_after_s=1.0)
            await self._workers.refresh(worker)
            return
        if isinstance(error, Overloaded):
            self.excluded.add(worker.address)
            other = self._workers.pick(self._asset_id, self.excluded)
            if other is None or other.free_slots(self._asset_id) <= 0:
                raise error from None
            return
        if isinstance(error, ShuttingDown | ModelNotReady):
            self.excluded.add(worker.address)
            return
        raise error from None
