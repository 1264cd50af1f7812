"""A route's response cache as the gateway uses it: which requests it may answer, and the
answers it keeps (a chat's whole answer as one chunk, an embedding reply as it came; a chat
with several choices is not kept).

The entries live in the shared store (`services.router.cache.ResponseCache`, NATS JetStream
key-value), so every router replica answers from what any of them kept. A hit costs the
caller no tokens: no model ran. Keeping an answer never delays the response: it is written
in the background once the answer is whole.
"""

from __future__ import annotations

import asyncio
import logging

from google.protobuf.message import DecodeError, Message

from roundhouse.v1 import inference_pb2
from services.common.asset_proto import AssetRecord
from services.common.assetspec import Generation
from services.common.keys import KeyRecord
from services.common.routespec import RouteSpec
from services.router.cache import SHARED_SCOPE, ResponseCache, cache_key, chat_cacheable, greedy

log = logging.getLogger(__name__)


class RouteCaching:
    """Looks answers up in, and keeps them in, the routes' shared response cache."""

    def __init__(self, store: ResponseCache | None) -> None:
        """`store`: None when the router runs without one (no route is then cached)."""
        self._store = store
        self._writes: set[asyncio.Task[bool]] = set()

    def key(self, route: RouteSpec, record: AssetRecord, request: Message,
            key: KeyRecord | None) -> str | None:
        """The entry `request` to `route` answered by `record` would have; None when the
        route has no cache, or the request may not be cached (a sampled chat). Entries are the
        route's own: another route answered by the same asset keeps its own, with its own TTL."""
        cache = route.cache
        if cache is None or self._store is None:
            return None
        if isinstance(request, inference_pb2.ChatRequest) and not chat_cacheable(
                request, applied_generation(record), cache):
            return None
        scope = SHARED_SCOPE if cache.scope == "shared" else (key.key_id if key is not None else "")
        return cache_key(record.spec.asset_id, record.revision, f"{route.asset_id}/{scope}", request)

    async def lookup(self, route: RouteSpec, entry: str, reply: type[Message]) -> Message | None:
        """The kept answer of type `reply` under `entry`; None on a miss (or an entry that
        does not parse: a miss, not an error)."""
        assert self._store is not None
        data = await self._store.get(route.asset_id, entry)
        if data is None:
            return None
        answer = reply()
        try:
            answer.ParseFromString(data)
        except DecodeError:
            log.warning("route %s: cache entry %s does not parse; ignored", route.asset_id, entry)
            return None
        return answer

    def keep(self, route: RouteSpec, entry: str, answer: Message) -> None:
        """Write `answer` under `entry` in the background (bounded by the route's
        `max_bytes`, then the store's)."""
        assert self._store is not None and route.cache is not None
        write = asyncio.ensure_future(self._store.put(
            route.asset_id, entry, answer.SerializeToString(), ttl_s=route.cache.ttl_s,
            max_bytes=route.cache.max_bytes))
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)

    async def flush(self) -> None:
        """Wait for the writes under way (at shutdown, and for a caller that must see its
        answer kept)."""
        if self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)


def whole_chat(asset_id: str, chunks: list[inference_pb2.ChatChunk]) -> inference_pb2.ChatChunk:
    """A streamed answer of one choice as the one chunk the cache keeps: all of its text, its
    tool calls whole (each one piece: id, name and all of its arguments), its tokens' log
    probabilities, and the last chunk's finish reason, stop sequence and usage."""
    last = chunks[-1]
    whole = inference_pb2.ChatChunk(delta="".join(c.delta for c in chunks), finish_reason=last.finish_reason,
                                    stop_sequence=last.stop_sequence, usage=last.usage, asset_id=asset_id)
    calls: dict[int, inference_pb2.ToolCallDelta] = {}
    for chunk in chunks:
        whole.logprobs.extend(chunk.logprobs)
        for piece in chunk.tool_calls:
            call = calls.setdefault(piece.index, inference_pb2.ToolCallDelta(index=piece.index))
            call.id, call.name = call.id or piece.id, call.name or piece.name
            call.arguments += piece.arguments
    whole.tool_calls.extend(calls[i] for i in sorted(calls))
    return whole


def decodes_greedily(request: inference_pb2.ChatRequest, record: AssetRecord) -> bool:
    """Whether the chat is decoded greedily by the asset (the same prompt always gets the same
    answer; see `cache.greedy`)."""
    return greedy(request, applied_generation(record))


def applied_generation(record: AssetRecord) -> Generation:
    """The generation defaults the asset's runtime applies to a request that sets none: a
    remote (`runtime: openai`) asset passes the request on as it is, so none of its own."""
    return Generation() if record.spec.runtime == "openai" else record.spec.generation
