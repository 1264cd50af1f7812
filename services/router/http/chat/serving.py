"""Serving `POST /v1/chat/completions` from the gateway's chunk stream."""

from __future__ import annotations

from typing import Any

from roundhouse.v1 import inference_pb2
from services.router.http.chat.protocol import ChatCompletionRequest
from services.router.http.chat.responses import (
    ChatCompletionChoice,
    ChatCompletionMessage,
    ChatCompletionResponse,
    ChoiceLogprobs,
    FunctionCallOut,
    ToolCallOut,
)
from services.router.http.choices import Answer, ChoiceParts
from services.router.http.logprobs import chat_logprobs
from services.router.http.protocol import FinishReason, UsageInfo, new_id, now
from services.router.http.streaming import ChunkRenderer, EventEnvelope, GenerationServing

ENDPOINT = "chat"
CHUNK = "chat.completion.chunk"


def tool_call_pieces(chunk: inference_pb2.ChatChunk) -> list[dict[str, Any]]:
    """A chunk's tool-call pieces as OpenAI streams them: a call's first piece (the one with
    its id) with its index, id, type and name; later pieces with the index and arguments."""
    pieces: list[dict[str, Any]] = []
    for piece in chunk.tool_calls:
        if piece.id:
            pieces.append({"index": piece.index, "id": piece.id, "type": "function",
                           "function": {"name": piece.name, "arguments": piece.arguments}})
        else:
            pieces.append({"index": piece.index, "function": {"arguments": piece.arguments}})
    return pieces


class ChatRenderer(ChunkRenderer):
    """`chat.completion.chunk` events of one response (`ChatCompletionChunk`), each choice's
    role first, as OpenAI opens them: a choice that starts with text (or ends before anything)
    opens with an event of its own, `{"role": "assistant", "content": "", "refusal": null}`; one
    that starts with a tool call opens with that call's first piece, `{"role": "assistant",
    "content": null, "tool_calls": [...], "refusal": null}`.

    The fields every event repeats are rendered once (`EventEnvelope`); unset delta fields are
    left out rather than sent as nulls, as OpenAI does.
    """

    def __init__(self, model: str) -> None:
        self.envelope = EventEnvelope(id=new_id("chatcmpl"), object=CHUNK, created=now(), model=model)
        self._opened: set[int] = set()

    def _opening(self, index: int, deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`deltas` of choice `index`, its role announced first when they are its first."""
        if index in self._opened:
            return deltas
        self._opened.add(index)
        if deltas and "tool_calls" in deltas[0]:
            return [{"role": "assistant", "content": None, **deltas[0], "refusal": None}, *deltas[1:]]
        return [{"role": "assistant", "content": "", "refusal": None}, *deltas]

    def _chunk(self, delta: dict[str, Any], reason: FinishReason | None = None, index: int = 0,
               logprobs: dict[str, Any] | None = None) -> bytes:
        return self.envelope.event(
            choices=[{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}],
            usage=None, system_fingerprint=None)

    def piece(self, chunk: inference_pb2.ChatChunk) -> bytes | None:
        """New text, or tool-call pieces, of the chunk's choice, with their log probabilities
        (after the choice's role when these are its first). Each tool-call piece is an event of
        its own, as OpenAI streams them (a call's first piece, with its name, apart from its
        arguments); the log probabilities ride on the last."""
        deltas: list[dict[str, Any]] = [{"content": chunk.delta}] if chunk.delta else []
        deltas += [{"tool_calls": [piece]} for piece in tool_call_pieces(chunk)]
        logprobs = chat_logprobs(chunk.logprobs) if chunk.logprobs else None
        if not deltas and logprobs is None:
            return None
        deltas = self._opening(chunk.index, deltas) or [{}]
        return b"".join(self._chunk(delta, index=chunk.index, logprobs=logprobs if n == len(deltas) - 1 else None)
                        for n, delta in enumerate(deltas))

    def finish(self, index: int, reason: FinishReason) -> bytes:
        """An empty delta with choice `index`'s finish reason (after its role, when nothing of
        the choice came before)."""
        opening = b"".join(self._chunk(delta, index=index) for delta in self._opening(index, []))
        return opening + self._chunk({}, reason, index=index)

    def usage(self, usage: UsageInfo) -> bytes:
        """No choices, only the usage."""
        return self.envelope.event(choices=[], usage=usage.model_dump(), system_fingerprint=None)


def whole_choice(parts: ChoiceParts, fallback: int, logprobs: bool) -> ChatCompletionChoice:
    """One choice of a whole answer: its text (null when it only called tools), its calls, its
    log probabilities when asked, its finish reason."""
    calls = [ToolCallOut(id=call.id, function=FunctionCallOut(name=call.name, arguments="".join(call.arguments)))
             for call in parts.tool_calls()]
    content = parts.content
    message = ChatCompletionMessage(content=None if calls and not content else content, tool_calls=calls)
    return ChatCompletionChoice(
        index=parts.index, message=message, finish_reason=parts.finish(fallback),
        logprobs=ChoiceLogprobs.model_validate(chat_logprobs(parts.logprobs)) if logprobs else None)


class ChatServing(GenerationServing):
    """Runs chat completions through the gateway and answers in OpenAI's shape."""

    endpoint = ENDPOINT

    def _renderer(self, model: str, prefix: str) -> ChunkRenderer:
        return ChatRenderer(model)

    def _whole(self, body: ChatCompletionRequest, answer: Answer, prefix: str) -> ChatCompletionResponse:
        last = answer.ended()
        return ChatCompletionResponse(
            id=new_id("chatcmpl"),
            created=now(),
            model=last.asset_id or body.model,
            choices=[whole_choice(parts, last.finish_reason, bool(body.logprobs)) for parts in answer.choices],
            usage=answer.usage,
        )
