"""The model layer's request parts in OpenAI's shapes, and OpenAI's logprobs in the model
layer's: what an OpenAI-compatible upstream is sent and answers."""

from __future__ import annotations

from typing import Any

from services.common.openai_chat import UpstreamLogprob
from services.worker.models.types import ChatMessage, ResponseFormat, TokenLogprob, Tool, ToolChoice, TopLogprob


def openai_message(message: ChatMessage) -> dict[str, Any]:
    """A message as OpenAI's `messages[]` entry: an assistant's tool calls with it, a `tool`
    message naming the call it answers."""
    entry: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.name:
        entry["name"] = message.name
    if message.tool_calls:
        entry["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in message.tool_calls
        ]
        entry["content"] = message.content or None  # OpenAI's shape of a turn of calls only
    if message.tool_call_id:
        entry["tool_call_id"] = message.tool_call_id
    return entry


def openai_tool(tool: Tool) -> dict[str, Any]:
    """A tool as OpenAI's `tools[]` entry, `strict` when asked."""
    entry = tool.to_openai()
    if tool.strict:
        entry["function"]["strict"] = True
    return entry


def openai_response_format(shape: ResponseFormat) -> dict[str, Any] | None:
    """OpenAI's `response_format`; None for free text (the upstream's default)."""
    if shape.type == "text":
        return None
    if shape.type == "json_object":
        return {"type": "json_object"}
    schema: dict[str, Any] = {"name": shape.name or "response", "schema": shape.schema or {}, "strict": shape.strict}
    if shape.description:
        schema["description"] = shape.description
    return {"type": "json_schema", "json_schema": schema}


def openai_tool_choice(choice: ToolChoice | None) -> str | dict[str, Any] | None:
    """OpenAI's `tool_choice`; None when unset (the upstream's default, `auto`)."""
    if choice is None:
        return None
    if choice.mode == "function":
        return {"type": "function", "function": {"name": choice.name}}
    return choice.mode


def token_logprob(entry: UpstreamLogprob) -> TokenLogprob:
    """An upstream's logprob entry as the model layer's."""
    return TokenLogprob(entry.token, entry.logprob, entry.utf8,
                        tuple(TopLogprob(token, logprob, raw) for token, logprob, raw in entry.top))
