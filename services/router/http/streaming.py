"""Relaying a gateway chunk stream to an HTTP client, streamed (SSE) or collected.

Shared by chat and text completions: the first chunk is awaited before the response
starts, so a failure to admit, place or wake the model is a plain HTTP error; a failure
after that is a last `data: {"error": ...}` event. Whenever the client goes away the
gateway iterator is closed, which cancels the generation on the worker.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from roundhouse.v1 import inference_pb2
from services.common.errors import RoundhouseError, UpstreamError
from services.router.deadlines import REQUEST_TIMEOUT_HEADER, header_seconds
from services.router.http.auth import request_key
from services.router.http.choices import Answer, Finishes
from services.router.http.errors import ClientClosedRequest, error_payload
from services.router.http.protocol import FinishReason, UsageInfo, finish_reason
from services.router.routes.plan import Routed

if TYPE_CHECKING:
    from services.router.gateway import Gateway

log = logging.getLogger(__name__)

T = TypeVar("T")
ChunkStream = AsyncIterator[inference_pb2.ChatChunk]
DONE = b"data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> bytes:
    """One server-sent event carrying `payload` as JSON."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class EventEnvelope:
    """The fields every event of one stream repeats (`id`, `object`, `created`, `model`),
    rendered once; each event adds its own after them (`choices`, `usage`...)."""

    __slots__ = ("_head",)

    def __init__(self, **fixed: Any) -> None:
        self._head = b"data: " + orjson.dumps(fixed)[:-1] + b","

    def event(self, **fields: Any) -> bytes:
        """One server-sent event: the fixed fields, then `fields`, in order."""
        return self._head + orjson.dumps(fields)[1:] + b"\n\n"


class EventStreamResponse(StreamingResponse):
    """`text/event-stream` that always watches for the client's disconnect.

    Starlette skips that watch for servers speaking ASGI 2.4 and notices a gone client
    only at the next write; a queued or slow generation may not write for a long time.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                           **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass  # the client went away mid-write
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            # A stream cancelled while waiting to write is parked at a `yield`; close it
            # now so it releases the gateway stream instead of at garbage collection.
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()


def record(request_id: str, endpoint: str, fields: dict[str, Any]) -> None:
    """Log the informational fields a request carried (`user`, `metadata`, `store`): they
    change nothing in the answer, and are kept with the request id."""
    if fields:
        shown = " ".join(f"{name}={value!r}" for name, value in fields.items())
        log.info("request %s (%s): %s", request_id, endpoint, shown)


def client_timeout(request: Request) -> float | None:
    """The deadline the client asked for in `x-request-timeout` (seconds), if any; the gateway
    keeps the shorter of it and the request timeout. An invalid value is a 400 naming it."""
    return header_seconds(REQUEST_TIMEOUT_HEADER, request.headers.get(REQUEST_TIMEOUT_HEADER))


def routed_for(request: Request) -> Routed:
    """What the request will say of the route that answers it (kept in `request.state.routed`,
    so that an error response carries the attempts too), with what its `Cache-Control` asks:
    `no-cache`, not to be answered from a cache (its fresh answer may be kept); `no-store`,
    neither that nor to have its answer kept."""
    directives = {d.strip().split("=", 1)[0].lower()
                  for d in request.headers.get("cache-control", "").split(",")}
    store = "no-store" not in directives
    routed = Routed(no_cache="no-cache" in directives or not store, no_store=not store)
    request.state.routed = routed
    return routed


def mid_stream_error(exc: Exception, request_id: str) -> bytes:
    """The last event of a stream that failed after it started: OpenAI's error object, with
    the usage so far when known."""
    payload = error_payload(exc, request_id)
    used = exc.partial_usage if isinstance(exc, RoundhouseError) else None
    if used is not None:
        payload["usage"] = UsageInfo(prompt_tokens=used[0], completion_tokens=used[1],
                                     total_tokens=sum(used)).model_dump()
    return sse(payload)


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it and raising `ClientClosedRequest` if the client leaves.

    `work` runs in this task; a second one watches the connection and cancels this one when
    the client goes (one task per request, not two and a wait on both).
    """
    task = asyncio.current_task()
    assert task is not None
    watching = True
    gone = False

    def on_disconnect(watch: asyncio.Future[None]) -> None:
        nonlocal gone
        # Done callbacks run later than the future completes: `work` may have ended meanwhile.
        if watching and not watch.cancelled() and watch.exception() is None:
            gone = True
            task.cancel()

    watch = asyncio.ensure_future(_disconnected(request))
    watch.add_done_callback(on_disconnect)
    try:
        return await work
    except asyncio.CancelledError:
        if gone and task.uncancel() == 0:
            raise ClientClosedRequest() from None
        raise
    finally:
        watching = False
        watch.cancel()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def first_chunk(request: Request, chunks: ChunkStream) -> inference_pb2.ChatChunk:
    """The stream's first chunk; on any failure (client gone included) the stream is closed."""
    try:
        first = await until_disconnected(request, anext(chunks, None))
    except BaseException:
        await close(chunks)
        raise
    if first is None:
        raise UpstreamError("The model returned no output.")
    return first


async def collect(request: Request, chunks: ChunkStream, choices: int = 1) -> Answer:
    """The whole answer of a stream: its `choices` choices and its last chunk (usage, asset id)."""

    async def drain() -> Answer:
        answer = Answer(choices)
        async for chunk in chunks:
            answer.add(chunk)
        answer.ended()
        return answer

    try:
        return await until_disconnected(request, drain())
    finally:
        await close(chunks)


async def close(chunks: ChunkStream) -> None:
    """Close a gateway stream even from a cancelled task, so the worker stops promptly."""
    aclose = getattr(chunks, "aclose", None)
    if aclose is None:
        return
    with anyio.CancelScope(shield=True):
        await aclose()


class ChunkRenderer(ABC):
    """How one endpoint spells the events of a stream."""

    def opening(self, choices: int) -> list[bytes]:
        """Events sent before anything was generated (a completion's echoed prompt, per choice)."""
        return []

    @abstractmethod
    def piece(self, chunk: inference_pb2.ChatChunk) -> bytes | None:
        """The event carrying what `chunk` adds to its choice (text, tool-call pieces, log
        probabilities); None when it adds nothing."""

    @abstractmethod
    def finish(self, index: int, reason: FinishReason) -> bytes:
        """The event carrying choice `index`'s finish reason."""

    @abstractmethod
    def usage(self, usage: UsageInfo) -> bytes:
        """The trailing usage event (`stream_options.include_usage`)."""


async def relay(
    first: inference_pb2.ChatChunk,
    chunks: ChunkStream,
    renderer: ChunkRenderer,
    *,
    choices: int = 1,
    include_usage: bool,
    request_id: str,
) -> AsyncIterator[bytes]:
    """SSE events for a stream whose first chunk was already read, ending in `[DONE]`: each
    choice's pieces as they come, each choice's finish event when it ends (those the stream
    did not end, at its end), then the usage when asked.

    A failure midway ends the stream with an error event instead; in every case the
    gateway stream is closed when this generator is.
    """
    try:
        for event in renderer.opening(choices):
            yield event
        finishes = Finishes(choices)
        usage: inference_pb2.Usage | None = None
        chunk = first
        while True:
            if chunk.index >= choices:
                raise UpstreamError(f"the model answered choice {chunk.index} of {choices}")
            if (piece := renderer.piece(chunk)) is not None:
                yield piece
            if finishes.finished(chunk):
                yield renderer.finish(chunk.index, finish_reason(chunk.finish_reason))
            if chunk.HasField("usage"):
                usage = chunk.usage
            following = await anext(chunks, None)
            if following is None:
                break
            chunk = following
        for index, reason in finishes.unfinished(chunk):
            yield renderer.finish(index, reason)
        if include_usage:
            yield renderer.usage(UsageInfo.from_proto(usage or chunk.usage))
        yield DONE
    except Exception as exc:
        yield mid_stream_error(exc, request_id)
    finally:
        await close(chunks)


class GenerationServing(ABC):
    """Shared flow of chat and text completions: whole answer, or SSE after the first chunk.

    Subclasses say how a whole answer and a stream look; domain errors raised before the
    response starts propagate to the error handler.
    """

    endpoint: str

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def create(self, body: Any, request: Request) -> Response:
        """Serve one request (`body` has `to_proto`, `stream`, `model`, `choices`,
        `include_usage`, `recorded`) within the client's `x-request-timeout` when it sets one."""
        request_id: str = request.state.request_id
        timeout = client_timeout(request)
        record(request_id, self.endpoint, body.recorded())
        routed = routed_for(request)
        chunks = self.gateway.chat(body.to_proto(request_id), timeout=timeout, key=request_key(request),
                                   stream=body.stream, routed=routed)
        prefix = self._prefix(body)
        if not body.stream:
            answer = await collect(request, chunks, body.choices)
            whole = self._whole(body, answer, prefix)
            return Response(whole.model_dump_json(), media_type="application/json",
                            headers=routed.headers())
        first = await first_chunk(request, chunks)
        renderer = self._renderer(first.asset_id or body.model, prefix)
        return EventStreamResponse(relay(
            first, chunks, renderer, choices=body.choices, include_usage=body.include_usage,
            request_id=request_id,
        ), headers=routed.headers())

    def _prefix(self, body: Any) -> str:
        """Text that precedes each choice's completion (a completion's echoed prompt)."""
        return ""

    @abstractmethod
    def _renderer(self, model: str, prefix: str) -> ChunkRenderer:
        """How stream chunks look."""

    @abstractmethod
    def _whole(self, body: Any, answer: Answer, prefix: str) -> Any:
        """The whole answer as a response model."""
