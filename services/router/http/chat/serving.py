"""Serving `POST /v1/chat/completions` from the gateway's chunk stream."""

from __future__ import annotations

from typing import Any

from roundhouse.v1 import inference_pb2
from services.router.http.chat.protocol import (
    ChatCompletionChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
)
from services.router.http.protocol import FinishReason, UsageInfo, finish_reason, new_id, now
from services.router.http.streaming import ChunkRenderer, EventEnvelope, GenerationServing

ENDPOINT = "chat"
CHUNK = "chat.completion.chunk"


class ChatRenderer(ChunkRenderer):
    """`chat.completion.chunk` events of one response (`ChatCompletionChunk`), the role first.

    The fields every event repeats are rendered once (`EventEnvelope`); unset delta fields are
    left out rather than sent as nulls, as OpenAI does.
    """

    def __init__(self, model: str) -> None:
        self.envelope = EventEnvelope(id=new_id("chatcmpl"), object=CHUNK, created=now(), model=model)

    def _chunk(self, delta: dict[str, Any], reason: FinishReason | None = None) -> bytes:
        return self.envelope.event(
            choices=[{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}],
            usage=None, system_fingerprint=None)

    def opening(self) -> list[bytes]:
        """The assistant role, with empty content."""
        return [self._chunk({"role": "assistant", "content": ""})]

    def delta(self, text: str) -> bytes:
        """New text."""
        return self._chunk({"content": text})

    def finish(self, reason: FinishReason) -> bytes:
        """An empty delta with the finish reason."""
        return self._chunk({}, reason)

    def usage(self, usage: UsageInfo) -> bytes:
        """No choices, only the usage."""
        return self.envelope.event(choices=[], usage=usage.model_dump(), system_fingerprint=None)


class ChatServing(GenerationServing):
    """Runs chat completions through the gateway and answers in OpenAI's shape."""

    endpoint = ENDPOINT

    def _renderer(self, model: str, prefix: str) -> ChunkRenderer:
        return ChatRenderer(model)

    def _whole(self, body: ChatCompletionRequest, text: str,
               last: inference_pb2.ChatChunk) -> ChatCompletionResponse:
        return ChatCompletionResponse(
            id=new_id("chatcmpl"),
            created=now(),
            model=last.asset_id or body.model,
            choices=[ChatCompletionChoice(
                message=ChatCompletionMessage(content=text),
                finish_reason=finish_reason(last.finish_reason),
            )],
            usage=UsageInfo.from_proto(last.usage),
        )
