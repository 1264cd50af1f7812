"""Serving `POST /v1/chat/completions` from the gateway's chunk stream."""

from __future__ import annotations

from roundhouse.v1 import inference_pb2
from services.router.http.chat.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    DeltaMessage,
)
from services.router.http.protocol import FinishReason, UsageInfo, finish_reason, new_id, now
from services.router.http.streaming import ChunkRenderer, GenerationServing

ENDPOINT = "chat"


class ChatRenderer(ChunkRenderer):
    """`chat.completion.chunk` events of one response; the role comes first."""

    def __init__(self, model: str) -> None:
        self.id, self.created, self.model = new_id("chatcmpl"), now(), model

    def _chunk(self, delta: DeltaMessage, reason: FinishReason | None = None) -> dict:
        chunk = ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model,
            choices=[ChatCompletionChunkChoice(delta=delta, finish_reason=reason)],
        ).model_dump()
        # OpenAI leaves unset delta fields out rather than sending nulls.
        chunk["choices"][0]["delta"] = delta.model_dump(exclude_none=True)
        return chunk

    def opening(self) -> list[dict]:
        """The assistant role, with empty content."""
        return [self._chunk(DeltaMessage(role="assistant", content=""))]

    def delta(self, text: str) -> dict:
        """New text."""
        return self._chunk(DeltaMessage(content=text))

    def finish(self, reason: FinishReason) -> dict:
        """An empty delta with the finish reason."""
        return self._chunk(DeltaMessage(), reason)

    def usage(self, usage: UsageInfo) -> dict:
        """No choices, only the usage."""
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage
        ).model_dump()


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
