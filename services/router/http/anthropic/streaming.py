"""A gateway chunk stream as the Messages API answers it: Anthropic's server-sent events, or
one whole message.

A stream is `message_start`, then per content block `content_block_start`, its deltas
(`text_delta`, or `input_json_delta` pieces of a tool call's input) and `content_block_stop`,
then `message_delta` (stop reason, usage) and `message_stop`; one `ping` follows the first
block's start. A failure after the stream started is a last `error` event in Anthropic's
error shape. Text and tool calls become blocks in the order the model produced them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.requests import Request

from roundhouse.v1 import inference_pb2
from services.common.errors import UpstreamError
from services.router.http.anthropic.errors import anthropic_error_payload
from services.router.http.anthropic.protocol import Message, StopReason, TextBlock, ToolUseBlock, Usage
from services.router.http.streaming import ChunkStream, close, until_disconnected


def sse_event(name: str, payload: dict[str, Any]) -> bytes:
    """One server-sent event named `name` carrying `payload` (whose `type` is the name)."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def stop_reason(chunk: inference_pb2.ChatChunk) -> StopReason:
    """The worker's finish reason in Anthropic's words."""
    if chunk.finish_reason == inference_pb2.FINISH_REASON_TOOL_CALLS:
        return "tool_use"
    if chunk.finish_reason == inference_pb2.FINISH_REASON_LENGTH:
        return "max_tokens"
    return "stop_sequence" if chunk.stop_sequence else "end_turn"


def usage(chunk: inference_pb2.ChatChunk) -> Usage:
    """The usage a chunk reports (zeros when it reports none)."""
    return Usage(input_tokens=chunk.usage.prompt_tokens, output_tokens=chunk.usage.completion_tokens)


class MessageEvents:
    """The events of one streamed message, fed chunk by chunk."""

    def __init__(self, message_id: str, model: str) -> None:
        self.message_id, self.model = message_id, model
        self.index = -1
        self.open: str | None = None
        """The kind of the block being written (`text` or `tool_use`); None between blocks."""
        self.call: int | None = None
        """The tool call (its index among the choice's calls) the open block writes."""
        self.pinged = False

    def start(self, first: inference_pb2.ChatChunk) -> bytes:
        """`message_start`: the message with no content yet. The input tokens are known here
        only when the first chunk reports usage; `message_delta` always carries them."""
        message: dict[str, Any] = {
            "id": self.message_id, "type": "message", "role": "assistant", "model": self.model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": first.usage.prompt_tokens, "output_tokens": 0}}
        return sse_event("message_start", {"type": "message_start", "message": message})

    def chunk(self, chunk: inference_pb2.ChatChunk) -> list[bytes]:
        """The events a chunk's text and tool-call pieces make."""
        events: list[bytes] = []
        if chunk.delta:
            if self.open != "text":
                events += self._begin({"type": "text", "text": ""})
            events.append(self._delta({"type": "text_delta", "text": chunk.delta}))
        for piece in chunk.tool_calls:
            if self.open != "tool_use" or piece.index != self.call or piece.id:
                events += self._begin({"type": "tool_use", "id": piece.id, "name": piece.name, "input": {}})
                self.call = piece.index
            if piece.arguments:
                events.append(self._delta({"type": "input_json_delta", "partial_json": piece.arguments}))
        return events

    def finish(self, last: inference_pb2.ChatChunk) -> list[bytes]:
        """The open block's end, `message_delta` with the stop reason and usage, `message_stop`."""
        events = self._end()
        if not self.pinged:
            events.append(self._ping())
        delta = {"stop_reason": stop_reason(last), "stop_sequence": last.stop_sequence or None}
        events.append(sse_event("message_delta", {"type": "message_delta", "delta": delta,
                                                  "usage": usage(last).model_dump()}))
        events.append(sse_event("message_stop", {"type": "message_stop"}))
        return events

    def _begin(self, block: dict[str, Any]) -> list[bytes]:
        events = self._end()
        self.index += 1
        self.open = block["type"]
        events.append(sse_event("content_block_start", {"type": "content_block_start",
                                                        "index": self.index, "content_block": block}))
        if not self.pinged:
            events.append(self._ping())
        return events

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return sse_event("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                                 "delta": delta})

    def _end(self) -> list[bytes]:
        if self.open is None:
            return []
        self.open = None
        return [sse_event("content_block_stop", {"type": "content_block_stop", "index": self.index})]

    def _ping(self) -> bytes:
        self.pinged = True
        return sse_event("ping", {"type": "ping"})


async def message_events(first: inference_pb2.ChatChunk, chunks: ChunkStream, events: MessageEvents,
                         *, request_id: str) -> AsyncIterator[bytes]:
    """The whole event stream of a message whose first chunk was already read; a failure
    midway ends it with an `error` event. The gateway stream is closed when this generator is."""
    try:
        yield events.start(first)
        chunk = first
        while True:
            for event in events.chunk(chunk):
                yield event
            following = await anext(chunks, None)
            if following is None:
                break
            chunk = following
        for event in events.finish(chunk):
            yield event
    except Exception as exc:
        yield sse_event("error", anthropic_error_payload(exc, request_id))
    finally:
        await close(chunks)


class MessageBuilder:
    """A whole message's content blocks, assembled from chunks in the order they came."""

    def __init__(self) -> None:
        self.blocks: list[dict[str, Any]] = []
        self.last: inference_pb2.ChatChunk | None = None

    def add(self, chunk: inference_pb2.ChatChunk) -> None:
        """Append a chunk's text and tool-call pieces."""
        self.last = chunk
        if chunk.delta:
            if not self.blocks or self.blocks[-1]["type"] != "text":
                self.blocks.append({"type": "text", "text": ""})
            self.blocks[-1]["text"] += chunk.delta
        for piece in chunk.tool_calls:
            block = self.blocks[-1] if self.blocks else None
            if block is None or block["type"] != "tool_use" or block["call"] != piece.index or piece.id:
                block = {"type": "tool_use", "call": piece.index, "id": piece.id, "name": piece.name,
                         "arguments": ""}
                self.blocks.append(block)
            block["arguments"] += piece.arguments

    def message(self, message_id: str, model: str) -> Message:
        """The message; a tool call whose arguments are not a JSON object is an upstream error."""
        if self.last is None:
            raise UpstreamError("The model returned no output.")
        content: list[TextBlock | ToolUseBlock] = []
        for block in self.blocks:
            if block["type"] == "text":
                content.append(TextBlock(text=block["text"]))
                continue
            try:
                arguments = json.loads(block["arguments"] or "{}")
            except ValueError:
                arguments = None
            if not isinstance(arguments, dict):
                raise UpstreamError(f"The model's call of {block['name']!r} has arguments that are "
                                    "not a JSON object.")
            content.append(ToolUseBlock(id=block["id"], name=block["name"], input=arguments))
        return Message(id=message_id, model=self.last.asset_id or model, content=content,
                       stop_reason=stop_reason(self.last), stop_sequence=self.last.stop_sequence or None,
                       usage=usage(self.last))


async def collect_message(request: Request, chunks: ChunkStream, builder: MessageBuilder) -> MessageBuilder:
    """Feed the whole stream to `builder`, stopping (and closing the stream) if the client leaves."""

    async def drain() -> MessageBuilder:
        async for chunk in chunks:
            builder.add(chunk)
        return builder

    try:
        return await until_disconnected(request, drain())
    finally:
        await close(chunks)
