"""`POST /v1/completions`: the OpenAI (legacy) text completion shapes.

A prompt is sent to the model as is, with no chat template (`ChatRequest.prompt`).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, WithJsonSchema, field_validator, model_validator

from roundhouse.v1 import inference_pb2
from services.common.inference_requests import MAX_TEXT_CHARS
from services.router.http.protocol import AS_INT, FinishReason, Integer, OpenAIResponse, UsageInfo
from services.router.http.sampling import STREAM_OPTIONS_RULE, SamplingFields, Unsupported

MAX_LOGPROBS = 5
"""Most alternatives per position the legacy `logprobs` may ask for (OpenAI's bound)."""

TEXT: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": MAX_TEXT_CHARS}
PROMPT_SCHEMA: dict[str, Any] = {
    "anyOf": [TEXT, {"type": "array", "items": TEXT, "minItems": 1, "maxItems": 1}],
    "description": "One text prompt (or a list holding exactly one); token prompts are not supported.",
}
BestOfOne = Annotated[Integer | None, Unsupported(
    1, accepted=[{"type": "integer", "const": 1}],
    hint="only best_of=1 is supported (no candidates to choose from)")]
ECHO_RULE: dict[str, Any] = {
    "if": {"required": ["echo", "logprobs"],
           "properties": {"echo": {"const": True}, "logprobs": {"type": "integer"}}},
    "then": {"not": {}},
}
"""`echo` and `logprobs` exclude each other: the prompt's own log probabilities are not computed."""
NoSuffix = Annotated[str | None, Unsupported(
    "", accepted=[{"type": "string", "maxLength": 0}],
    hint='leave it out or send "": text after the completion (insertion) is not implemented')]


class CompletionRequest(SamplingFields):
    """The body of `POST /v1/completions`; one text prompt per request."""

    SCHEMA_RULES: ClassVar[list[dict[str, Any]]] = [STREAM_OPTIONS_RULE, ECHO_RULE]

    prompt: Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS), WithJsonSchema(PROMPT_SCHEMA)]
    echo: Annotated[bool, Field(description="Each choice's text starts with the prompt. Not with logprobs.")] = False
    best_of: BestOfOne = None
    logprobs: Annotated[
        Annotated[int, Field(ge=0, le=MAX_LOGPROBS), AS_INT] | None,
        Field(description=f"Return each generated token's log probability, with the this many (0-"
                          f"{MAX_LOGPROBS}) most likely tokens at each position."),
    ] = None
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

    @model_validator(mode="after")
    def _echo_without_logprobs(self) -> CompletionRequest:
        if self.echo and self.logprobs is not None:
            raise ValueError("echo: not supported together with logprobs (the prompt's log "
                             "probabilities are not computed)")
        return self

    def to_proto(self, request_id: str) -> inference_pb2.ChatRequest:
        """The request as the router's gateway takes it."""
        request = self.sampling_proto(request_id)
        request.prompt = self.prompt
        if self.logprobs is not None:
            request.logprobs, request.top_logprobs = True, self.logprobs
        return request


class CompletionLogprobs(OpenAIResponse):
    """A choice's log probabilities, in the legacy shape."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(OpenAIResponse):
    """One choice of a completion or of one streamed chunk."""

    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
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
