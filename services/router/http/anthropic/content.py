"""The parts of a Messages API conversation: messages and their content blocks, tools and the
tool choice, each converting itself to its `roundhouse.v1` counterpart."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from roundhouse.v1 import inference_pb2
from services.common.inference_requests import FUNCTION_NAME, MAX_TEXT_CHARS
from services.router.http.errors import UNSUPPORTED

BLOCK_ID = r"^[A-Za-z0-9_-]{1,256}$"
BLOCK_TYPES = ("text", "tool_use", "tool_result")
ERROR_PREFIX = "Error: "
"""How a `tool_result` with `is_error` reads to the model."""


class AnthropicModel(BaseModel):
    """Base of the request's parts: strict JSON types, and unknown fields refused."""

    model_config = ConfigDict(extra="forbid", strict=True)


class CacheControl(AnthropicModel):
    """A prompt-caching breakpoint. Accepted wherever Anthropic takes one; it changes nothing,
    since there is no prompt cache for a client to mark here."""

    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


Cached = Annotated[CacheControl | None, Field(description="Accepted; it changes nothing.")]
Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]


class TextBlockParam(AnthropicModel):
    """Text in a message or in the system prompt."""

    type: Literal["text"]
    text: Text
    cache_control: Cached = None


class ToolUseBlockParam(AnthropicModel):
    """An earlier tool call of the assistant."""

    type: Literal["tool_use"]
    id: Annotated[str, Field(pattern=BLOCK_ID)]
    name: Annotated[str, Field(pattern=FUNCTION_NAME)]
    input: dict[str, Any]
    cache_control: Cached = None

    def to_proto(self) -> inference_pb2.ToolCall:
        """This call as the worker takes it: its input as JSON arguments."""
        return inference_pb2.ToolCall(id=self.id, name=self.name, arguments=json.dumps(self.input))


class ToolResultBlockParam(AnthropicModel):
    """What a tool call returned, in a user message."""

    type: Literal["tool_result"]
    tool_use_id: Annotated[str, Field(pattern=BLOCK_ID)]
    content: Text | list[TextBlockParam] | None = None
    is_error: Annotated[bool | None, Field(
        description=f"The model reads the result prefixed with {ERROR_PREFIX!r}.")] = None
    cache_control: Cached = None

    def to_proto(self) -> inference_pb2.ChatMessage:
        """A `tool` message answering the call."""
        content = self.content if isinstance(self.content, str) else "\n".join(
            block.text for block in self.content or [])
        if self.is_error:
            content = ERROR_PREFIX + content
        return inference_pb2.ChatMessage(role="tool", content=content, tool_call_id=self.tool_use_id)


ROLE_BLOCKS = {"user": ["text", "tool_result"], "assistant": ["text", "tool_use"], "system": ["text"]}
ROLE_RULES: dict[str, Any] = {"allOf": [
    {"if": {"properties": {"role": {"const": role}}},
     "then": {"properties": {"content": {"anyOf": [
         {"type": "string"}, {"type": "array", "items": {"properties": {"type": {"enum": kinds}}}}]}}}}
    for role, kinds in ROLE_BLOCKS.items()]}
"""What the validator refuses, in the schema: each role's blocks."""

ContentBlock = Annotated[TextBlockParam | ToolUseBlockParam | ToolResultBlockParam,
                         Field(discriminator="type")]


class MessageParam(AnthropicModel):
    """One turn of the conversation: a string, or content blocks (text, `tool_use` in an
    assistant's turn, `tool_result` in a user's; a `system` turn is text only)."""

    model_config = ConfigDict(json_schema_extra=ROLE_RULES)

    role: Literal["user", "assistant", "system"]
    content: Text | list[ContentBlock]

    @field_validator("content", mode="before")
    @classmethod
    def _known_blocks(cls, value: Any) -> Any:
        for n, block in enumerate(value if isinstance(value, list) else []):
            kind = block.get("type") if isinstance(block, dict) else None
            if isinstance(kind, str) and kind not in BLOCK_TYPES:
                raise PydanticCustomError(
                    UNSUPPORTED, "content[{n}]: of type '{kind}', which is not supported; only "
                                 "text, tool_use and tool_result blocks are", {"n": n, "kind": kind})
        return value

    @model_validator(mode="after")
    def _blocks_fit_the_role(self) -> MessageParam:
        allowed = {"user": ("text", "tool_result"), "assistant": ("text", "tool_use"), "system": ("text",)}
        for n, block in enumerate(self.content if isinstance(self.content, list) else []):
            if block.type not in allowed[self.role]:
                raise ValueError(f"content[{n}]: a {block.type} block cannot be in a {self.role} message")
        return self

    def worker_messages(self) -> int:
        """How many messages `to_proto` makes of this turn."""
        if isinstance(self.content, str) or self.role != "user":
            return 1
        results = sum(isinstance(b, ToolResultBlockParam) for b in self.content)
        has_text = any(isinstance(b, TextBlockParam) for b in self.content)
        return results + (1 if has_text or not results else 0)

    def to_proto(self) -> list[inference_pb2.ChatMessage]:
        """The turn as the worker takes it: a user's tool results are `tool` messages (first,
        as Anthropic has them), then its text; an assistant's tool uses are its tool calls."""
        if isinstance(self.content, str):
            return [inference_pb2.ChatMessage(role=self.role, content=self.content)]
        text = "\n".join(b.text for b in self.content if isinstance(b, TextBlockParam))
        if self.role == "system":
            return [inference_pb2.ChatMessage(role="system", content=text)]
        if self.role == "assistant":
            calls = [b.to_proto() for b in self.content if isinstance(b, ToolUseBlockParam)]
            return [inference_pb2.ChatMessage(role="assistant", content=text, tool_calls=calls)]
        results = [b.to_proto() for b in self.content if isinstance(b, ToolResultBlockParam)]
        has_text = any(isinstance(b, TextBlockParam) for b in self.content)
        user = [inference_pb2.ChatMessage(role="user", content=text)] if has_text or not results else []
        return results + user


class ToolParam(AnthropicModel):
    """A tool the model may call: its input is a JSON object following `input_schema`."""

    type: Literal["custom"] | None = None
    name: Annotated[str, Field(pattern=FUNCTION_NAME)]
    description: Annotated[str, Field(max_length=MAX_TEXT_CHARS)] | None = None
    input_schema: Annotated[dict[str, Any], Field(json_schema_extra={
        "properties": {"type": {"const": "object"}}, "required": ["type"]})]
    cache_control: Cached = None
    strict: Annotated[bool | None, Field(
        description="Whether calls must follow `input_schema` exactly; on local models they always "
                    "do (the schema is enforced while the model writes), and remote upstreams get "
                    "the flag.")] = None

    @field_validator("input_schema")
    @classmethod
    def _object_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value.get("type") != "object":
            raise ValueError("input_schema: must be a JSON Schema of type 'object'")
        return value

    def to_proto(self) -> inference_pb2.Tool:
        """This tool as the worker takes it."""
        return inference_pb2.Tool(name=self.name, description=self.description or "",
                                  parameters_json=json.dumps(self.input_schema), strict=bool(self.strict))


Parallel = Annotated[bool | None, Field(description="True: at most one tool call.")]


class ToolChoiceAuto(AnthropicModel):
    """The model decides whether to call tools."""

    type: Literal["auto"]
    disable_parallel_tool_use: Parallel = None


class ToolChoiceAny(AnthropicModel):
    """The model calls one or more of the tools."""

    type: Literal["any"]
    disable_parallel_tool_use: Parallel = None


class ToolChoiceTool(AnthropicModel):
    """The model calls the tool named (one of `tools`)."""

    type: Literal["tool"]
    name: Annotated[str, Field(pattern=FUNCTION_NAME)]
    disable_parallel_tool_use: Parallel = None


class ToolChoiceNone(AnthropicModel):
    """The model calls no tool."""

    type: Literal["none"]


ToolChoice = Annotated[ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone,
                       Field(discriminator="type")]
_MODES = {"auto": "auto", "any": "required", "tool": "function", "none": "none"}


def tool_choice_mode(choice: ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone) -> str:
    """The worker's tool-choice mode for Anthropic's choice (`any` is `required`, `tool` a
    named `function`)."""
    return _MODES[choice.type]
