"""`POST /v1/chat/completions`: the OpenAI request and response shapes.

The request converts itself to a `roundhouse.v1.ChatRequest` (`to_proto`).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from roundhouse.v1 import inference_pb2
from services.router.http.protocol import (
    FinishReason,
    OpenAIRequest,
    OpenAIResponse,
    StreamOptions,
    UsageInfo,
)
from services.router.http.sampling import SamplingFields

Role = Literal["system", "developer", "user", "assistant", "tool"]
FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class ContentPart(OpenAIRequest):
    """One part of a message's content; only text parts are supported."""

    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> ContentPart:
        if self.type != "text":
            raise ValueError(f"content part type {self.type!r} is not supported; only 'text' is")
        if self.text is None:
            raise ValueError("a text content part needs 'text'")
        return self


class ChatMessage(OpenAIRequest):
    """One message of the conversation."""

    role: Role
    content: list[ContentPart] | None = None
    name: Annotated[str, Field(max_length=256)] | None = None
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
        text = "\n".join(part.text or "" for part in self.content or [])
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
    description: str | None = None
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


class ChatCompletionRequest(SamplingFields):
    """The body of `POST /v1/chat/completions`."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = None
    tools: list[ChatTool] | None = None
    logprobs: bool | None = None

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        if self.logprobs:
            raise ValueError("logprobs: not supported")
        return self

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
