"""`POST /v1/chat/completions`: the OpenAI request and response shapes.

The request converts itself to a `roundhouse.v1.ChatRequest` (`to_proto`); what shapes the
answer (`response_format`, `tool_choice`) is in `shaping`.
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
    MAX_TOP_LOGPROBS,
)
from services.router.http.chat.shaping import (
    SHAPING_RULES,
    FunctionChoice,
    ResponseFormat,
    ToolChoice,
    choice_proto,
    format_proto,
)
from services.router.http.protocol import (
    AS_INT,
    OpenAIRequest,
    StreamOptions,
)
from services.router.http.sampling import STREAM_OPTIONS_RULE, SamplingFields, Unsupported

Role = Literal["system", "developer", "user", "assistant", "tool"]
NOT_NULL: dict[str, Any] = {"not": {"type": "null"}}
HAS_CONTENT: dict[str, Any] = {"required": ["content"], "properties": {"content": NOT_NULL}}
# A message needs content, but an assistant's earlier turn may hold only tool calls; a tool's
# answer names the call it answers.
MESSAGE_RULES: list[dict[str, Any]] = [
    {"if": {"properties": {"role": {"const": "assistant"}}},
     "then": {"anyOf": [HAS_CONTENT, {"required": ["tool_calls"],
                                      "properties": {"tool_calls": {"type": "array", "minItems": 1}}}]},
     "else": HAS_CONTENT},
    {"if": {"properties": {"role": {"const": "tool"}}},
     "then": {"required": ["tool_call_id"], "properties": {"tool_call_id": {"type": "string"}}}},
]


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


class CalledFunction(OpenAIRequest):
    """The function an earlier tool call called, and its arguments as JSON text."""

    name: Annotated[str, Field(max_length=MAX_NAME_CHARS)]
    arguments: Annotated[str, Field(max_length=MAX_TEXT_CHARS)]


class MessageToolCall(OpenAIRequest):
    """A tool call of an earlier assistant turn, as the API answered it."""

    id: Annotated[str, Field(max_length=MAX_NAME_CHARS)]
    type: Literal["function"]
    function: CalledFunction

    def to_proto(self) -> inference_pb2.ToolCall:
        """This call as the worker takes it."""
        return inference_pb2.ToolCall(id=self.id, name=self.function.name, arguments=self.function.arguments)


def _message_rules(schema: dict[str, Any]) -> None:
    schema["allOf"] = list(MESSAGE_RULES)


class ChatMessage(OpenAIRequest):
    """One message of the conversation."""

    model_config = ConfigDict(json_schema_extra=_message_rules)

    role: Role
    content: Annotated[list[ContentPart] | None, Field(json_schema_extra=_content_schema)] = None
    name: Annotated[str, Field(max_length=MAX_NAME_CHARS)] | None = None
    tool_calls: Annotated[list[MessageToolCall] | None, Field(
        max_length=MAX_TOOLS, description="An assistant turn's tool calls.")] = None
    tool_call_id: Annotated[str | None, Field(
        max_length=MAX_NAME_CHARS, description="A tool message: the id of the call it answers.")] = None

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
        if self.role == "tool" and self.tool_call_id is None:
            raise PydanticCustomError("missing", "tool_call_id: is required in a tool message")
        return self

    def text(self) -> str:
        """The content as one string."""
        return "\n".join(part.text for part in self.content or [])

    def to_proto(self) -> inference_pb2.ChatMessage:
        """This message as the worker takes it (`developer` reads as `system`)."""
        role = "system" if self.role == "developer" else self.role
        return inference_pb2.ChatMessage(
            role=role, content=self.text(), name=self.name or "", tool_call_id=self.tool_call_id or "",
            tool_calls=[call.to_proto() for call in self.tool_calls or []])


class FunctionDefinition(OpenAIRequest):
    """A function the model may call."""

    name: Annotated[str, Field(pattern=FUNCTION_NAME)]
    description: Annotated[str, Field(max_length=MAX_TEXT_CHARS)] | None = None
    parameters: Annotated[dict[str, Any] | None, Field(
        description="A JSON Schema of the arguments (an object); absent: any JSON object.")] = None
    strict: Annotated[bool | None, Field(
        description="Accepted either way: a local model's arguments always follow the schema.")] = None


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
            strict=bool(fn.strict),
        )


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

    SCHEMA_RULES: ClassVar[list[dict[str, Any]]] = [STREAM_OPTIONS_RULE, *SHAPING_RULES]

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT), AS_INT] | None = None
    tools: Annotated[list[ChatTool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice = None
    parallel_tool_calls: Annotated[bool | None, Field(
        description="false: at most one tool call per choice. Only with tools.")] = None
    metadata: Annotated[
        dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None,
        Field(max_length=16, description="Up to 16 key-value pairs: accepted and recorded with "
                                         "the request (logged with its id)."),
    ] = None
    store: Annotated[bool | None, Field(
        description="Accepted and recorded with the request; nothing is stored for later "
                    "retrieval.")] = None
    response_format: Annotated[ResponseFormat | None, Field(
        description="text (the default), json_object (the answer is a JSON object) or json_schema "
                    "(JSON that validates against the schema), enforced while decoding. Not with "
                    "tool calls (send tool_choice 'none').")] = None
    logprobs: Annotated[bool | None, Field(
        description="Return the log probability of each generated token (after logit_bias and "
                    "penalties, before temperature and top_p).")] = None
    top_logprobs: Annotated[
        Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS), AS_INT] | None,
        Field(description=f"With logprobs: also the 0-{MAX_TOP_LOGPROBS} most likely tokens at each "
                          "position."),
    ] = None
    reasoning_effort: NoReasoning = None
    service_tier: ServiceTier = None
    modalities: TextOnly = None
    audio: NoAudio = None
    prediction: NoPrediction = None
    web_search_options: NoWebSearch = None
    functions: NoFunctions = None
    function_call: NoFunctionCall = None

    @model_validator(mode="after")
    def _shaping(self) -> ChatCompletionRequest:
        names = {tool.function.name for tool in self.tools or []}
        choice = self.tool_choice
        if choice not in (None, "none") and not names:
            shown = choice.function.name if isinstance(choice, FunctionChoice) else choice
            raise ValueError(f"tool_choice: {shown!r} needs tools; leave it out or send 'none'")
        if isinstance(choice, FunctionChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice: function {choice.function.name!r} is not among the tools")
        if self.parallel_tool_calls is not None and not names:
            raise ValueError("parallel_tool_calls: only allowed when tools are given")
        if (self.response_format is not None and self.response_format.type != "text" and names
                and choice != "none"):
            raise ValueError("response_format: a JSON answer cannot be combined with tool calls; "
                             "send tool_choice 'none' or leave response_format out")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
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
        if self.response_format is not None:
            request.response_format.CopyFrom(format_proto(self.response_format))
        if self.tool_choice is not None:
            request.tool_choice.CopyFrom(choice_proto(self.tool_choice))
        if self.parallel_tool_calls is not None:
            request.parallel_tool_calls = self.parallel_tool_calls
        request.logprobs = bool(self.logprobs)
        request.top_logprobs = self.top_logprobs or 0
        return request


__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "ChatTool",
    "StreamOptions",
]
