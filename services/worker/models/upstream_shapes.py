"""The model layer's request parts in OpenAI's shapes, and OpenAI's logprobs in the model
layer's: what an OpenAI-compatible upstream is sent and answers. The shapes themselves are
`services.common.openai_chat`'s, which the router's direct path uses too."""

from __future__ import annotations

from typing import Any

from services.common.openai_answer import UpstreamLogprob
from services.common.openai_chat import (
    message_entry,
    response_format_entry,
    tool_choice_entry,
    tool_entry,
)
from services.worker.models.types import ChatMessage, ResponseFormat, TokenLogprob, Tool, ToolChoice, TopLogprob


def openai_message(message: ChatMessage) -> dict[str, Any]:
    """A message as OpenAI's `messages[]` entry: an assistant's tool calls with it, a `tool`
    message naming the call it answers."""
    return message_entry(message.role, message.content, name=message.name,
                         tool_calls=[(c.id, c.name, c.arguments) for c in message.tool_calls],
                         tool_call_id=message.tool_call_id)


def openai_tool(tool: Tool) -> dict[str, Any]:
    """A tool as OpenAI's `tools[]` entry, `strict` when asked."""
    return tool_entry(tool.name, tool.description, tool.parameters, strict=tool.strict)


def openai_response_format(shape: ResponseFormat) -> dict[str, Any] | None:
    """OpenAI's `response_format`; None for free text (the upstream's default)."""
    return response_format_entry(shape.type, schema=shape.schema, name=shape.name, strict=shape.strict,
                                 description=shape.description)


def openai_tool_choice(choice: ToolChoice | None) -> str | dict[str, Any] | None:
    """OpenAI's `tool_choice`; None when unset (the upstream's default, `auto`)."""
    return None if choice is None else tool_choice_entry(choice.mode, choice.name)


def token_logprob(entry: UpstreamLogprob) -> TokenLogprob:
    """An upstream's logprob entry as the model layer's."""
    return TokenLogprob(entry.token, entry.logprob, entry.utf8,
                        tuple(TopLogprob(token, logprob, raw) for token, logprob, raw in entry.top))
