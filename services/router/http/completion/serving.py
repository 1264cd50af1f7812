"""Serving `POST /v1/completions`: a raw prompt, no chat template, text back."""

from __future__ import annotations

from typing import Any

from roundhouse.v1 import inference_pb2
from services.router.http.completion.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
)
from services.router.http.protocol import FinishReason, UsageInfo, finish_reason, new_id, now
from services.router.http.streaming import ChunkRenderer, EventEnvelope, GenerationServing

ENDPOINT = "completions"
OBJECT = "text_completion"


class CompletionRenderer(ChunkRenderer):
    """`text_completion` events of one streamed response (`CompletionResponse` each), the fields
    every event repeats rendered once (`EventEnvelope`)."""

    def __init__(self, model: str, echo: str = "") -> None:
        self.envelope = EventEnvelope(id=new_id("cmpl"), object=OBJECT, created=now(), model=model)
        self.echo = echo

    def _chunk(self, choices: list[dict[str, Any]], usage: UsageInfo | None = None) -> bytes:
        return self.envelope.event(choices=choices, usage=usage.model_dump() if usage else None,
                                   system_fingerprint=None)

    def opening(self) -> list[bytes]:
        """The prompt itself, when the request asked for it to be echoed."""
        return [self.delta(self.echo)] if self.echo else []

    def delta(self, text: str) -> bytes:
        """New text."""
        return self._chunk([{"index": 0, "text": text, "logprobs": None, "finish_reason": None}])

    def finish(self, reason: FinishReason) -> bytes:
        """No text, the finish reason."""
        return self._chunk([{"index": 0, "text": "", "logprobs": None, "finish_reason": reason}])

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

    def _whole(self, body: CompletionRequest, text: str,
               last: inference_pb2.ChatChunk) -> CompletionResponse:
        return CompletionResponse(
            id=new_id("cmpl"),
            created=now(),
            model=last.asset_id or body.model,
            choices=[CompletionChoice(
                text=text, finish_reason=finish_reason(last.finish_reason))],
            usage=UsageInfo.from_proto(last.usage),
        )
