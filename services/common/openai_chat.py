"""OpenAI's chat and completions request bodies, as this side sends them: the body
(`chat_body`, with `ChatOptions`) and its parts from plain values (`message_entry`,
`tool_entry`, `response_format_entry`, `tool_choice_entry`), which the worker builds from its
model layer's types and the router from a `ChatRequest`. The answers are `openai_answer`'s.

No HTTP here: `services.common.openai_upstream` sends the bodies and reads the answers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.common.errors import FieldProblem, InvalidArgument


def chat_body(
    model: str, *, messages: Sequence[dict[str, Any]] = (), prompt: str | None = None,
    temperature: float | None = None, top_p: float | None = None, max_tokens: int | None = None,
    seed: int | None = None, stop: Sequence[str] = (), tools: Sequence[dict[str, Any]] = (),
    stream: bool, options: ChatOptions | None = None,
) -> tuple[str, dict[str, Any]]:
    """The path (relative to the upstream's base URL) and body of a chat or raw completion.

    `messages` and `tools` are in OpenAI's shape already; a raw `prompt` (no messages) goes to
    `completions`, where `response_format` and the tool fields do not exist (`InvalidArgument`
    when given). Unset sampling fields are left out, so the upstream's defaults apply. A
    streamed request asks for the usage in its last event.
    """
    body: dict[str, Any] = {"model": model, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    chat = not (prompt is not None and not messages)
    if not chat:
        path, body["prompt"] = "completions", prompt
    else:
        path, body["messages"] = "chat/completions", list(messages)
        if tools:
            body["tools"] = list(tools)
    optional = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens,
                "seed": seed, "stop": list(stop) or None}
    body.update({k: v for k, v in optional.items() if v is not None})
    if options is not None:
        body.update(options.fields(chat=chat, tools=bool(tools)))
    return path, body


def message_entry(role: str, content: str, *, name: str = "", tool_calls: Iterable[tuple[str, str, str]] = (),
                  tool_call_id: str = "") -> dict[str, Any]:
    """OpenAI's `messages[]` entry: an assistant's tool calls ((id, name, arguments JSON text)
    each) with it, a `tool` message naming the call it answers."""
    entry: dict[str, Any] = {"role": role, "content": content}
    if name:
        entry["name"] = name
    calls = [{"id": call_id, "type": "function", "function": {"name": function, "arguments": arguments}}
             for call_id, function, arguments in tool_calls]
    if calls:
        entry["tool_calls"] = calls
        entry["content"] = content or None  # OpenAI's shape of a turn of calls only
    if tool_call_id:
        entry["tool_call_id"] = tool_call_id
    return entry


def tool_entry(name: str, description: str, parameters: Mapping[str, Any] | None, *,
               strict: bool = False) -> dict[str, Any]:
    """OpenAI's `tools[]` entry of a function, `strict` when asked; no parameters: an object
    with none."""
    function: dict[str, Any] = {"name": name, "description": description,
                                "parameters": dict(parameters or {"type": "object", "properties": {}})}
    if strict:
        function["strict"] = True
    return {"type": "function", "function": function}


def response_format_entry(kind: str, *, schema: Mapping[str, Any] | None = None, name: str = "",
                          strict: bool = False, description: str = "") -> dict[str, Any] | None:
    """OpenAI's `response_format` of `kind` (`json_object`, `json_schema` with the other
    fields); None for free text (`text`, or none: the upstream's default)."""
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        return None
    shape: dict[str, Any] = {"name": name or "response", "schema": dict(schema or {}), "strict": strict}
    if description:
        shape["description"] = description
    return {"type": "json_schema", "json_schema": shape}


def tool_choice_entry(mode: str, function_name: str = "") -> str | dict[str, Any] | None:
    """OpenAI's `tool_choice`: the mode (`auto`, `none`, `required`), or the named function
    for `function`; None when no mode is given (the upstream's default, `auto`)."""
    if mode == "function":
        return {"type": "function", "function": {"name": function_name}}
    return mode or None


def top_k_refusal(model: str) -> InvalidArgument:
    """What a request with `top_k` for an OpenAI-compatible upstream's `model` gets: OpenAI's
    API takes no top_k."""
    return InvalidArgument.from_problems([FieldProblem(
        "top_k", f"model '{model}' is served by an OpenAI-compatible upstream, which takes no top_k; "
                 "leave it out")])


@dataclass(frozen=True)
class ChatOptions:
    """The sampling and shaping fields of a chat request beyond the basics, OpenAI-shaped:
    `response_format` and `tool_choice` as OpenAI takes them (None: left out)."""

    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0
    n: int = 1
    response_format: dict[str, Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True

    def fields(self, *, chat: bool, tools: bool) -> dict[str, Any]:
        """The body fields that differ from OpenAI's defaults; `chat` False: for `completions`
        (its `logprobs` is the number of alternatives)."""
        body: dict[str, Any] = {}
        if self.presence_penalty:
            body["presence_penalty"] = self.presence_penalty
        if self.frequency_penalty:
            body["frequency_penalty"] = self.frequency_penalty
        if self.logit_bias:
            body["logit_bias"] = {str(token): bias for token, bias in self.logit_bias.items()}
        if self.n > 1:
            body["n"] = self.n
        if not chat:
            for name in ("response_format", "tool_choice"):
                if getattr(self, name) is not None:
                    raise InvalidArgument(f"{name}: needs messages; a raw prompt goes to the upstream's "
                                          "completions endpoint, which takes no " + name)
            if self.logprobs:
                body["logprobs"] = self.top_logprobs
            return body
        if self.logprobs:
            body["logprobs"] = True
            if self.top_logprobs:
                body["top_logprobs"] = self.top_logprobs
        if self.response_format is not None:
            body["response_format"] = self.response_format
        if tools and self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice
        if tools and not self.parallel_tool_calls:
            body["parallel_tool_calls"] = False
        return body
