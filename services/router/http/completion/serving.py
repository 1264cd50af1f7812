"""Serving `POST /v1/completions`: a raw prompt, no chat template, text back."""

from __future__ import annotations

from typing import Any

from roundhouse.v1 import inference_pb2
from services.router.http.choices import Answer
from services.router.http.completion.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from services.router.http.logprobs import completion_logprobs
from services.router.http.protocol import FinishReason, UsageInfo, new_id, now
from services.router.http.streaming import ChunkRenderer, EventEnvelope, GenerationServing

ENDPOINT = "completions"
OBJECT = "text_completion"


class CompletionRenderer(ChunkRenderer):
    """`text_completion` events of one streamed response (`CompletionResponse` each), the fields
    every event repeats rendered once (`EventEnvelope`)."""

    def __init__(self, model: str, echo: str = "") -> None:
        self.envelope = EventEnvelope(id=new_id("cmpl"), object=OBJECT, created=now(), model=model)
        self.echo = echo
        self._offsets: dict[int, int] = {}
        """Per choice, where its next text starts (for the legacy `text_offset`)."""

    def _chunk(self, choices: list[dict[str, Any]], usage: UsageInfo | None = None) -> bytes:
        return self.envelope.event(choices=choices, usage=usage.model_dump() if usage else None,
                                   system_fingerprint=None)

    def _text(self, index: int, text: str, logprobs: dict[str, Any] | None = None) -> bytes:
        return self._chunk([{"index": index, "text": text, "logprobs": logprobs, "finish_reason": None}])

    def opening(self, choices: int = 1) -> list[bytes]:
        """The prompt itself at the start of each choice, when the request asked for it to be
        echoed."""
        return [self._text(i, self.echo) for i in range(choices)] if self.echo else []

    def piece(self, chunk: inference_pb2.ChatChunk) -> bytes | None:
        """New text of the chunk's choice, with its tokens' log probabilities when asked."""
        if not chunk.delta and not chunk.logprobs:
            return None
        offset = self._offsets.get(chunk.index, len(self.echo))
        self._offsets[chunk.index] = offset + len(chunk.delta)
        logprobs = completion_logprobs(chunk.logprobs, chunk.delta, offset) if chunk.logprobs else None
        return self._text(chunk.index, chunk.delta, logprobs)

    def finish(self, index: int, reason: FinishReason) -> bytes:
        """No text, choice `index`'s finish reason."""
        return self._chunk([{"index": index, "text": "", "logprobs": None, "finish_reason": reason}])

    def usage(self, usage: UsageInfo) -> bytes:
        """No choices, only the usage."""
        return self._chunk([], usage)


class CompletionServing(GenerationServing):
    """Runs text completions through the gateway and answers in OpenAI's shape."""

    endpoint = ENDPOINT

    def _prefix(self, body: CompletionRequest) -> str:
        return body.prompt if body.echo else ""

    def _renderer(self, model: str, prefix: str) -> ChunkRenderer:
        return CompletionRenderer(model, prefix)

    def _whole(self, body: CompletionRequest, answer: Answer, prefix: str) -> CompletionResponse:
        last = answer.ended()
        return CompletionResponse(
            id=new_id("cmpl"),
            created=now(),
            model=last.asset_id or body.model,
            choices=[CompletionChoice(
                index=parts.index, text=prefix + parts.content, finish_reason=parts.finish(last.finish_reason),
                logprobs=None if body.logprobs is None else CompletionLogprobs.model_validate(
                    completion_logprobs(parts.logprobs, parts.content, len(prefix))),
            ) for parts in answer.choices],
            usage=answer.usage,
        )
