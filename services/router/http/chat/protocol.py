"""`POST /v1/chat/completions`: the OpenAI request and response shapes.

The request converts itself to a `roundhouse.v1.ChatRequest` (`to_proto`).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Field, WithJsonSchema, field_validator, model_validator
from pydantic_core import PydanticCustomError

from roundhouse.v1 import inference_pb2
from services.common.inference_requests import (
    FUNCTION_NAME,
    MAX_MESSAGES,
    MAX_NAME_CHARS,
    MAX_TEXT_CHARS,
    MAX_TOKENS_LIMIT,
    MAX_TOOLS,
)
from services.router.http.errors import UNSUPPORTED
from services.router.http.protocol import (
    AS_INT,
    FinishReason,
    Integer,
    OpenAIRequest,
    OpenAIResponse,
    StreamOptions,
    UsageInfo,
)
from services.router.http.sampling import STREAM_OPTIONS_RULE, SamplingFields, Unsupported

Role = Literal["system", "developer", "user", "assistant", "tool"]
NOT_NULL: dict[str, Any] = {"not": {"type": "null"}}
HAS_CONTENT: dict[str, Any] = {"required": ["content"], "properties": {"content": NOT_NULL}}
# A message needs content, but an assistant's earlier turn may hold only tool calls.
CONTENT_RULE: dict[str, Any] = {
    "if": {"properties": {"role": {"const": "assistant"}}},
    "then": {"anyOf": [HAS_CONTENT, {"required": ["tool_calls"],
                                     "properties": {"tool_calls": {"type": "array", "minItems": 1}}}]},
    "else": HAS_CONTENT,
}
TOOL_CHOICES = ("none", "auto")
TOOL_CHOICE_SCHEMA: dict[str, Any] = {
    "anyOf": [{"enum": list(TOOL_CHOICES)}, {"type": "null"}],
    "description": "'none' or 'auto' ('auto' only with tools); forcing a call ('required' or a "
                   "named function) is not supported yet and is refused with a 400.",
}
TOOL_CHOICE_RULE: dict[str, Any] = {
    "if": {"required": ["tool_choice"], "properties": {"tool_choice": {"const": "auto"}}},
    "then": {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}},
}


def _content_schema(schema: dict[str, Any]) -> None:
    # The validator takes a plain string too (see `_string_or_parts`).
    schema["anyOf"].insert(0, {"type": "string", "maxLength": MAX_TEXT_CHARS})


class ContentPart(OpenAIRequest):
    """One part of a message's content; only text parts are supported."""

    type: Annotated[str, WithJsonSchema({"const": "text", "description": "Only text parts."})]
    text: Annotated[str, Field(max_length=MAX_TEXT_CHARS)]

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        kind = value.get("type") if isinstance(value, dict) else None
        if isinstance(kind, str) and kind != "text":
            raise ValueError(f"content part type {kind!r} is not supported; only 'text' is")
        return value


class ChatMessage(OpenAIRequest):
    """One message of the conversation."""

    model_config = ConfigDict(json_schema_extra=CONTENT_RULE)

    role: Role
    content: Annotated[list[ContentPart] | None, Field(json_schema_extra=_content_schema)] = None
    name: Annotated[str, Field(max_length=MAX_NAME_CHARS)] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _string_or_parts(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [{"type": "text", "text": value}]
        if value is None or isinstance(value, list):
            return value
        raise ValueError("must be a string or a list of content parts")

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise PydanticCustomError("missing", "content: is required")
        return self

    def text(self) -> str:
        """The content as one string; an assistant's earlier tool calls are kept as JSON."""
        text = "\n".join(part.text for part in self.content or [])
        if not text and self.tool_calls:
            text = json.dumps(self.tool_calls)
        return text

    def to_proto(self) -> inference_pb2.ChatMessage:
        """This message as the worker takes it (`developer` reads as `system`)."""
        role = "system" if self.role == "developer" else self.role
        return inference_pb2.ChatMessage(role=role, content=self.text(), name=self.name or "")


class FunctionDefinition(OpenAIRequest):
    """A function the model may call."""

    name: Annotated[str, Field(pattern=FUNCTION_NAME)]
    description: Annotated[str, Field(max_length=MAX_TEXT_CHARS)] | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(OpenAIRequest):
    """A tool offered to the model; OpenAI defines only function tools."""

    type: Literal["function"]
    function: FunctionDefinition

    def to_proto(self) -> inference_pb2.Tool:
        """This tool as the worker takes it."""
        fn = self.function
        return inference_pb2.Tool(
            name=fn.name,
            description=fn.description or "",
            parameters_json=json.dumps(fn.parameters) if fn.parameters is not None else "",
        )


NoStructuredOutput = Annotated[dict[str, Any] | None, Unsupported(
    {"type": "text"},
    accepted=[{"type": "object", "properties": {"type": {"const": "text"}}, "required": ["type"],
               "additionalProperties": False}],
    hint='leave it out or send {"type": "text"}: structured output (json_object, json_schema) '
         "is not implemented")]
NoLogprobs = Annotated[bool | None, Unsupported(
    False, accepted=[{"type": "boolean", "const": False}],
    hint="leave it out or send false: log probabilities are not returned")]
NoTopLogprobs = Annotated[Integer | None, Unsupported(
    0, accepted=[{"type": "integer", "const": 0}],
    hint="leave it out or send 0: log probabilities are not returned")]
ParallelToolCalls = Annotated[bool | None, Unsupported(
    True, accepted=[{"type": "boolean", "const": True}],
    hint="leave it out or send true: limiting the model to one tool call is not implemented")]
NoReasoning = Annotated[str | None, Unsupported(
    hint="leave it out: reasoning effort is not implemented")]
ServiceTier = Annotated[str | None, Unsupported(
    "auto", "default", accepted=[{"enum": ["auto", "default"]}],
    hint="leave it out or send 'auto' or 'default': there is one tier")]
TextOnly = Annotated[list[str] | None, Unsupported(
    ["text"], accepted=[{"type": "array", "items": {"const": "text"}, "minItems": 1, "maxItems": 1}],
    hint='leave it out or send ["text"]: only text is produced')]
NoAudio = Annotated[Any, Unsupported(hint="leave it out: audio output is not implemented")]
NoPrediction = Annotated[Any, Unsupported(hint="leave it out: predicted outputs are not implemented")]
NoWebSearch = Annotated[Any, Unsupported(hint="leave it out: web search is not implemented")]
NoFunctions = Annotated[Any, Unsupported(
    hint="leave it out: the deprecated functions are not implemented (tools are)")]
NoFunctionCall = Annotated[Any, Unsupported(
    hint="leave it out: the deprecated function_call is not implemented (tool_choice is)")]


class ChatCompletionRequest(SamplingFields):
    """The body of `POST /v1/chat/completions`."""

    SCHEMA_RULES: ClassVar[list[dict[str, Any]]] = [STREAM_OPTIONS_RULE, TOOL_CHOICE_RULE]

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT), AS_INT] | None = None
    tools: Annotated[list[ChatTool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Annotated[str | dict[str, Any] | None, WithJsonSchema(TOOL_CHOICE_SCHEMA)] = None
    metadata: Annotated[
        dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None,
        Field(max_length=16, description="Up to 16 key-value pairs: accepted and recorded with "
                                         "the request (logged with its id)."),
    ] = None
    store: Annotated[bool | None, Field(
        description="Accepted and recorded with the request; nothing is stored for later "
                    "retrieval.")] = None
    response_format: NoStructuredOutput = None
    logprobs: NoLogprobs = None
    top_logprobs: NoTopLogprobs = None
    parallel_tool_calls: ParallelToolCalls = None
    reasoning_effort: NoReasoning = None
    service_tier: ServiceTier = None
    modalities: TextOnly = None
    audio: NoAudio = None
    prediction: NoPrediction = None
    web_search_options: NoWebSearch = None
    functions: NoFunctions = None
    function_call: NoFunctionCall = None

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, value: Any) -> Any:
        if value is None or value in TOOL_CHOICES:
            return value
        if value == "required" or isinstance(value, dict):
            raise PydanticCustomError(
                UNSUPPORTED, "not supported yet: forcing a tool call ('required' or a named "
                             "function) is not implemented; send 'auto' or 'none'")
        raise ValueError("must be 'none' or 'auto'")

    @model_validator(mode="after")
    def _auto_needs_tools(self) -> ChatCompletionRequest:
        if self.tool_choice == "auto" and not self.tools:
            raise ValueError("tool_choice: 'auto' needs tools; leave it out or send 'none'")
        return self

    def recorded(self) -> dict[str, Any]:
        """`user`, `metadata` and `store`, those the caller set."""
        fields = super().recorded()
        if self.metadata is not None:
            fields["metadata"] = self.metadata
        if self.store is not None:
            fields["store"] = self.store
        return fields

    def to_proto(self, request_id: str) -> inference_pb2.ChatRequest:
        """The request as the router's gateway takes it."""
        request = self.sampling_proto(request_id)
        request.messages.extend(m.to_proto() for m in self.messages)
        request.tools.extend(t.to_proto() for t in self.tools or [])
        if self.max_completion_tokens is not None:
            request.max_tokens = self.max_completion_tokens
        return request


class ChatCompletionMessage(OpenAIResponse):
    """The assistant's reply."""

    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(OpenAIResponse):
    """The one choice of a non-streamed response."""

    index: int = 0
    message: ChatCompletionMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletionResponse(OpenAIResponse):
    """A whole chat completion (`stream: false`)."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaMessage(OpenAIResponse):
    """What a streamed chunk adds to the reply."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionChunkChoice(OpenAIResponse):
    """The one choice of a streamed chunk."""

    index: int = 0
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(OpenAIResponse):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


__all__ = [
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatMessage",
    "ChatTool",
    "StreamOptions",
]
