"""`POST /v1/completions`: the OpenAI (legacy) text completion shapes.

A prompt is sent to the model as is, with no chat template (`ChatRequest.prompt`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, WithJsonSchema, field_validator

from roundhouse.v1 import inference_pb2
from services.common.inference_requests import MAX_TEXT_CHARS
from services.router.http.protocol import FinishReason, Integer, OpenAIResponse, UsageInfo
from services.router.http.sampling import SamplingFields, Unsupported

TEXT: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": MAX_TEXT_CHARS}
PROMPT_SCHEMA: dict[str, Any] = {
    "anyOf": [TEXT, {"type": "array", "items": TEXT, "minItems": 1, "maxItems": 1}],
    "description": "One text prompt (or a list holding exactly one); token prompts are not supported.",
}
BestOfOne = Annotated[Integer | None, Unsupported(
    1, accepted=[{"type": "integer", "const": 1}],
    hint="only best_of=1 is supported (no candidates to choose from)")]
NoLogprobs = Annotated[Integer | None, Unsupported(
    hint="leave it out or send null: log probabilities are not returned")]
NoSuffix = Annotated[str | None, Unsupported(
    "", accepted=[{"type": "string", "maxLength": 0}],
    hint='leave it out or send "": text after the completion (insertion) is not implemented')]


class CompletionRequest(SamplingFields):
    """The body of `POST /v1/completions`; one text prompt per request."""

    prompt: Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS), WithJsonSchema(PROMPT_SCHEMA)]
    echo: bool = False
    best_of: BestOfOne = None
    logprobs: NoLogprobs = None
    suffix: NoSuffix = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and value and not isinstance(value[0], str):
            raise ValueError("token prompts are not supported; send text")
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("exactly one prompt per request is supported")
            value = value[0]
        return value

    def to_proto(self, request_id: str) -> inference_pb2.ChatRequest:
        """The request as the router's gateway takes it."""
        request = self.sampling_proto(request_id)
        request.prompt = self.prompt
        return request


class CompletionChoice(OpenAIResponse):
    """The one choice of a completion or of one streamed chunk."""

    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(OpenAIResponse):
    """A whole completion, or (object unchanged, as OpenAI does) one streamed chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None
