"""`POST /v1/messages` and `POST /v1/messages/count_tokens`: Anthropic's request and response
shapes.

A request converts itself to a `roundhouse.v1.ChatRequest` (`to_proto`): the system prompt
becomes a system message; an assistant's `tool_use` blocks its tool calls (the input as JSON
arguments); each `tool_result` block a `tool` message answering its call; `tool_choice` `any`
is `required` and `tool` a named function. Unlike OpenAI, Anthropic refuses fields it does not
know, and so does this API: anything not declared here is a 400 naming it.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from roundhouse.v1 import inference_pb2
from services.common.inference_requests import (
    MAX_MESSAGES,
    MAX_NAME_CHARS,
    MAX_STOP_SEQUENCES,
    MAX_TOKENS_LIMIT,
    MAX_TOOLS,
)
from services.router.http.anthropic.content import (
    AnthropicModel,
    Cached,
    MessageParam,
    Text,
    TextBlockParam,
    ToolChoice,
    ToolChoiceNone,
    ToolChoiceTool,
    ToolParam,
    tool_choice_mode,
)
from services.router.http.errors import UNSUPPORTED
from services.router.http.protocol import AS_INT, OpenAIRequestBody
from services.router.http.sampling import Unsupported

MAX_TOP_K = 2**32 - 1
TOOLS_GIVEN: dict[str, Any] = {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}}
REQUEST_RULES: list[dict[str, Any]] = [
    {"if": {"required": ["tool_choice"],
            "properties": {"tool_choice": {"required": ["type"], "properties": {"type": {"enum": ["any", "tool"]}}}}},
     "then": TOOLS_GIVEN},
]
FORMAT_RULE: dict[str, Any] = {
    "if": {"allOf": [TOOLS_GIVEN, {"required": ["output_config"], "properties": {"output_config": {
        "type": "object", "required": ["format"], "properties": {"format": {"type": "object"}}}}}]},
    "then": {"required": ["tool_choice"], "properties": {"tool_choice": {
        "type": "object", "properties": {"type": {"const": "none"}}}}},
}


def _rules(rules: list[dict[str, Any]]) -> Any:
    def add(schema: dict[str, Any]) -> None:
        schema["allOf"] = rules

    return add


NoThinking = Annotated[dict[str, Any] | None, Unsupported(
    {"type": "disabled"},
    accepted=[{"type": "object", "properties": {"type": {"const": "disabled"}}, "required": ["type"],
               "additionalProperties": False}],
    hint='leave it out or send {"type": "disabled"}: extended thinking is not implemented')]


class MessagesInput(OpenAIRequestBody):
    """What both endpoints take: the model, the conversation, the system prompt and tools."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_rules(REQUEST_RULES))
    UNKNOWN: ClassVar[str] = "{field}: not a parameter of the Messages API here"

    model: Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
    messages: Annotated[list[MessageParam], Field(
        min_length=1, max_length=MAX_MESSAGES - 1,
        description="Oldest first; the last message must be the user's. A final assistant message, "
                    "which Anthropic's API takes as a prefill that the answer continues, is refused "
                    "with a 400: an answer here always starts a new assistant turn. A conversation "
                    f"holds at most {MAX_MESSAGES} messages, the system prompt one of them and each "
                    "`tool_result` block one of its own.")]
    system: Text | list[TextBlockParam] | None = None
    tools: Annotated[list[ToolParam], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    thinking: NoThinking = None

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in data:
                if name not in cls.model_fields:
                    raise PydanticCustomError(UNSUPPORTED, cls.UNKNOWN, {"field": name})
        return data

    @model_validator(mode="after")
    def _coherent(self) -> MessagesInput:
        if self.messages[-1].role != "user":
            raise ValueError("messages: the last message must be a user message; a final assistant "
                             "message (a prefill for the answer to continue) is not supported")
        size = (self.system is not None) + sum(m.worker_messages() for m in self.messages)
        if size > MAX_MESSAGES:
            raise ValueError(f"messages: the conversation comes to {size} messages (the system prompt "
                             f"and each tool_result block count as one); at most {MAX_MESSAGES} fit")
        choice = self.tool_choice
        if choice is not None and choice.type in ("any", "tool") and not self.tools:
            raise ValueError(f"tool_choice: {choice.type!r} needs tools")
        if isinstance(choice, ToolChoiceTool) and choice.name not in {t.name for t in self.tools or []}:
            raise ValueError(f"tool_choice.name: no tool is named {choice.name!r}")
        return self

    def conversation_proto(self, request: inference_pb2.ChatRequest) -> inference_pb2.ChatRequest:
        """Fill `request` with the system prompt, messages, tools and tool choice."""
        if self.system is not None:
            system = self.system if isinstance(self.system, str) else "\n".join(b.text for b in self.system)
            request.messages.append(inference_pb2.ChatMessage(role="system", content=system))
        for message in self.messages:
            request.messages.extend(message.to_proto())
        if self.tools:
            request.tools.extend(tool.to_proto() for tool in self.tools)
            choice = self.tool_choice
            if choice is not None:
                request.tool_choice.mode = tool_choice_mode(choice)
                if isinstance(choice, ToolChoiceTool):
                    request.tool_choice.function_name = choice.name
                if not isinstance(choice, ToolChoiceNone) and choice.disable_parallel_tool_use is not None:
                    request.parallel_tool_calls = not choice.disable_parallel_tool_use
        return request


class Metadata(AnthropicModel):
    """About the request: `user_id` is recorded as its end user."""

    user_id: Annotated[str, Field(max_length=MAX_NAME_CHARS, json_schema_extra={
        "pattern": "^[^\\u0000]*$"})] | None = None


class JSONOutputFormat(AnthropicModel):
    """An answer that is JSON following `schema`, enforced while the model writes it."""

    type: Literal["json_schema"]
    schema_: Annotated[dict[str, Any], Field(alias="schema")]

    def to_proto(self) -> inference_pb2.ResponseFormat:
        """The format as the worker takes it."""
        return inference_pb2.ResponseFormat(type="json_schema", schema_json=json.dumps(self.schema_),
                                            name="output", strict=True)


NoEffort = Annotated[str | None, Unsupported(hint="leave it out: effort levels are not implemented")]


class OutputConfig(AnthropicModel):
    """How the answer is shaped."""

    format: JSONOutputFormat | None = None
    effort: NoEffort = None


class MessagesRequest(MessagesInput):
    """The body of `POST /v1/messages`."""

    model_config = ConfigDict(json_schema_extra=_rules([*REQUEST_RULES, FORMAT_RULE]))

    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT), AS_INT]
    stop_sequences: Annotated[list[Annotated[str, Field(min_length=1)]],
                              Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    stream: bool = False
    temperature: Annotated[float, Field(ge=0, le=1)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1, description="0 keeps only the most likely token.")] | None = None
    top_k: Annotated[int, Field(ge=0, le=MAX_TOP_K, description="0: no limit."), AS_INT] | None = None
    metadata: Metadata | None = None
    output_config: OutputConfig | None = None
    cache_control: Cached = None
    service_tier: Annotated[Literal["auto", "standard_only"] | None, Field(
        description="Accepted; there is one tier.")] = None

    def to_proto(self, request_id: str) -> inference_pb2.ChatRequest:
        """The request as the router's gateway takes it."""
        user = self.metadata.user_id if self.metadata and self.metadata.user_id else ""
        request = inference_pb2.ChatRequest(model=self.model, request_id=request_id, user=user,
                                            max_tokens=self.max_tokens)
        request.stop.extend(self.stop_sequences or [])
        if self.temperature is not None:
            request.temperature = self.temperature
        if self.top_p is not None:
            request.top_p = self.top_p
        if self.top_k is not None:
            request.top_k = self.top_k
        if self.output_config is not None and self.output_config.format is not None:
            request.response_format.CopyFrom(self.output_config.format.to_proto())
        return self.conversation_proto(request)

    @model_validator(mode="after")
    def _format_without_tools(self) -> MessagesRequest:
        calls = self.tools and not isinstance(self.tool_choice, ToolChoiceNone)
        if calls and self.output_config is not None and self.output_config.format is not None:
            raise ValueError("output_config.format: cannot be combined with tools the model may "
                             "call; leave one out, or send tool_choice none")
        return self

    def recorded(self) -> dict[str, Any]:
        """`metadata` and `service_tier`, those the caller set, to be logged with the request."""
        fields: dict[str, Any] = {}
        if self.metadata is not None:
            fields["metadata"] = self.metadata.model_dump(exclude_none=True)
        if self.service_tier is not None:
            fields["service_tier"] = self.service_tier
        return fields


class CountTokensRequest(MessagesInput):
    """The body of `POST /v1/messages/count_tokens`."""

    def to_proto(self, request_id: str) -> inference_pb2.ChatRequest:
        """The request as the router's gateway counts it."""
        return self.conversation_proto(inference_pb2.ChatRequest(model=self.model, request_id=request_id))


class AnthropicResponse(BaseModel):
    """Base of every response body."""

    model_config = ConfigDict(extra="forbid")


class TextBlock(AnthropicResponse):
    """Text the model wrote."""

    type: Literal["text"] = "text"
    text: str


class ToolUseBlock(AnthropicResponse):
    """A tool call the model made; `input` follows the tool's `input_schema`."""

    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class Usage(AnthropicResponse):
    """Token counts: the prompt (system, tools and template included) and the answer."""

    input_tokens: int
    output_tokens: int


class Message(AnthropicResponse):
    """A whole answer (`stream: false`)."""

    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[Annotated[TextBlock | ToolUseBlock, Field(discriminator="type")]]
    stop_reason: StopReason | None
    stop_sequence: str | None = None
    usage: Usage


class TokenCount(AnthropicResponse):
    """What `count_tokens` answers."""

    input_tokens: int
