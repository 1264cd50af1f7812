"""`POST /v1/chat/completions`: the OpenAI response shapes, whole and streamed.

What the published schema documents; the streamed events are rendered straight to JSON by
`serving.ChatRenderer`, in exactly these shapes (unset delta fields left out, but for the
nulls OpenAI sends in a choice's first delta: `refusal`, and `content` when the choice opens
with a tool call).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from services.router.http.protocol import FinishReason, OpenAIResponse, UsageInfo


class FunctionCallOut(OpenAIResponse):
    """The function a tool call calls, with its arguments as JSON text."""

    name: str
    arguments: str


class ToolCallOut(OpenAIResponse):
    """A tool call the assistant made."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatCompletionMessage(OpenAIResponse):
    """The assistant's reply: text, or (content null) tool calls; as OpenAI does, `tool_calls`
    is left out when there are none, and `refusal` (null) and `annotations` (empty) are sent."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: Annotated[list[ToolCallOut], Field(
        exclude_if=lambda calls: not calls, description="Left out when the reply calls no tool.")] = []
    refusal: None = None
    annotations: Annotated[list[dict[str, Any]], Field(
        max_length=0, description="Always empty: there is no web search to cite.")] = []


class TopLogprobOut(OpenAIResponse):
    """A likely token at one position, with its log probability and UTF-8 bytes."""

    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(TopLogprobOut):
    """A generated token's log probability, with the most likely tokens at its position."""

    top_logprobs: list[TopLogprobOut]


class ChoiceLogprobs(OpenAIResponse):
    """A choice's log probabilities (`logprobs: true`)."""

    content: list[TokenLogprobOut] | None
    refusal: list[TokenLogprobOut] | None = None


class ChatCompletionChoice(OpenAIResponse):
    """One choice of a non-streamed response."""

    index: int = 0
    message: ChatCompletionMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletionResponse(OpenAIResponse):
    """A whole chat completion (`stream: false`): `n` choices, in index order."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class FunctionDelta(OpenAIResponse):
    """A piece of a streamed tool call's function: its name first, then arguments text."""

    name: str | None = None
    arguments: str | None = None


class ToolCallDeltaOut(OpenAIResponse):
    """A piece of a streamed tool call: the first has its id, type and name; later ones the
    same index and more arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta


class DeltaMessage(OpenAIResponse):
    """What a streamed chunk adds to a choice."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDeltaOut] | None = None
    refusal: Annotated[None, Field(description="Null, in each choice's first delta (as OpenAI sends it).")] = None


class ChatCompletionChunkChoice(OpenAIResponse):
    """One choice's piece in a streamed chunk."""

    index: int = 0
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
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


__all__ = ["ChatCompletionChunk", "ChatCompletionResponse", "ChoiceLogprobs", "ToolCallOut"]
