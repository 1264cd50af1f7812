"""A chat request in the Anthropic Messages API's terms, and its streamed answer in ours.

`conversation` turns `ChatParams` into the request's `system`, `messages`, `tools` and
`tool_choice`: system (and developer) messages become `system`; assistant tool calls become
`tool_use` blocks; `tool` messages become `tool_result` blocks of a user turn (before any text
of that turn, as Anthropic requires); consecutive messages of one role are one turn.
`sampling` adds what the Messages API can do (temperature 0 to 1, top_p, top_k, stop
sequences, max_tokens, a `json_schema` response format as `output_config.format`) and
refuses, naming the field, what it cannot (n > 1, logprobs, penalties, logit_bias, seed, a
`json_object` response format): nothing is silently dropped. `MessagesStream`
turns the events of the answer into `ChatDelta`s: `text_delta` as text, each `tool_use` block
as a tool call whose first piece has the id and name and whose later pieces are its
`input_json_delta` text, and `stop_reason` as the finish reason.
"""

from __future__ import annotations

import json
from typing import Any

from services.common.assetspec import Generation
from services.common.errors import InvalidArgument
from services.worker.models.types import ChatDelta, ChatParams, FinishReason, ToolCallDelta, Usage

RUNTIME = "runtime anthropic"
DEFAULT_MAX_TOKENS = 4096
"""`max_tokens` of a request that sets none, on an asset whose `generation.max_tokens` is unset
(the Messages API requires one)."""

FINISH: dict[str, FinishReason] = {
    "end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "refusal": "stop",
    "max_tokens": "length", "model_context_window_exceeded": "length", "tool_use": "tool_calls",
}
"""Anthropic's `stop_reason` as our finish reason."""

TOOL_CHOICE = {"auto": "auto", "none": "none", "required": "any", "function": "tool"}


def conversation(params: ChatParams) -> dict[str, Any]:
    """`system`, `messages`, `tools` and `tool_choice` of a Messages request (what
    `count_tokens` takes too). Raises `InvalidArgument` naming the message at fault."""
    if params.prompt is not None:
        raise InvalidArgument(f"prompt: {RUNTIME} serves chat messages only, not raw completions")
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(params.messages):
        if message.role in ("system", "developer"):
            if message.content:
                system.append(message.content)
            continue
        role, blocks = _blocks(i, message.role, message.content, message.tool_calls, message.tool_call_id)
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    for turn in turns:  # tool results first in their turn
        turn["content"].sort(key=lambda block: block["type"] != "tool_result")
    body: dict[str, Any] = {"messages": turns}
    if system:
        body["system"] = "\n\n".join(system)
    if params.tools:
        body["tools"] = [{"name": tool.name, **({"description": tool.description} if tool.description else {}),
                          "input_schema": tool.parameters or {"type": "object", "properties": {}},
                          **({"strict": True} if tool.strict else {})}
                         for tool in params.tools]
        mode = params.effective_tool_choice
        if params.tool_choice is not None or not params.parallel_tool_calls:
            choice: dict[str, Any] = {"type": TOOL_CHOICE[mode]}
            if mode == "function" and params.tool_choice is not None:
                choice["name"] = params.tool_choice.name
            if not params.parallel_tool_calls and mode != "none":
                choice["disable_parallel_tool_use"] = True
            body["tool_choice"] = choice
    return body


def _blocks(i: int, role: str, content: str, tool_calls: tuple[Any, ...],
            tool_call_id: str) -> tuple[str, list[dict[str, Any]]]:
    """The turn role and content blocks of message `i`."""
    text: list[dict[str, Any]] = [{"type": "text", "text": content}] if content else []
    if role == "user":
        blocks = text
    elif role == "assistant":
        blocks = text + [{"type": "tool_use", "id": call.id, "name": call.name,
                          "input": _arguments(f"messages[{i}].tool_calls[{j}].arguments", call.arguments)}
                         for j, call in enumerate(tool_calls)]
    elif role == "tool":
        if not tool_call_id:
            raise InvalidArgument(f"messages[{i}].tool_call_id: a tool message must name the call it answers")
        result: dict[str, Any] = {"type": "tool_result", "tool_use_id": tool_call_id}
        return "user", [{**result, "content": content} if content else result]
    else:
        raise InvalidArgument(f"messages[{i}].role: {RUNTIME} takes system, developer, user, assistant "
                              f"and tool messages, not {role!r}")
    if not blocks:
        raise InvalidArgument(f"messages[{i}].content: must not be empty for {RUNTIME}")
    return role, blocks


def _arguments(field: str, arguments: str) -> dict[str, Any]:
    try:
        value = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        raise InvalidArgument(f"{field}: not valid JSON") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{field}: must be a JSON object")
    return value


def sampling(params: ChatParams, defaults: Generation) -> dict[str, Any]:
    """`max_tokens`, `temperature`, `top_p`, `top_k`, `stop_sequences` and `output_config` of a
    Messages request, the asset's generation defaults filling what the request leaves unset. Raises
    `InvalidArgument` naming a field the Messages API has no counterpart for."""
    absent = f"is not supported by {RUNTIME}"
    unsupported = [
        ("n", params.n > 1, f"{RUNTIME} answers one choice per request (n must be 1)"),
        ("logprobs", params.logprobs or params.top_logprobs > 0, absent),
        ("presence_penalty", params.presence_penalty != 0, absent),
        ("frequency_penalty", params.frequency_penalty != 0, absent),
        ("logit_bias", bool(params.logit_bias), absent),
        ("seed", params.seed is not None, absent),
        ("response_format", params.response_format.type == "json_object",
         f"json_object {absent}; send json_schema with the object's schema"),
    ]
    for name, present, reason in unsupported:
        if present:
            raise InvalidArgument(f"{name}: {reason}")
    temperature = params.temperature if params.temperature is not None else defaults.temperature
    if temperature is not None and temperature > 1:
        raise InvalidArgument(f"temperature: {RUNTIME} takes 0 to 1")
    top_p = params.top_p if params.top_p is not None else defaults.top_p
    fields: dict[str, Any] = {
        "max_tokens": params.max_tokens or defaults.max_tokens or DEFAULT_MAX_TOKENS,
        "temperature": temperature, "top_p": top_p, "top_k": params.top_k or None,
        "stop_sequences": list(params.stop) or None,
    }
    if params.response_format.type == "json_schema":
        fields["output_config"] = {"format": {"type": "json_schema", "schema": params.response_format.schema}}
    return {k: v for k, v in fields.items() if v is not None}


class MessagesStream:
    """Turns one streamed answer's events (`sse_events` payloads) into `ChatDelta`s; `last()`
    is the closing delta with the finish reason, stop sequence and usage."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.stop_reason = ""
        self.stop_sequence = ""
        self._calls: dict[int, int] = {}
        """Content block index → tool call index (tool calls count from 0 among themselves)."""
        self._arguments: dict[int, str] = {}
        """Tool call index → the arguments streamed so far, or its whole input at start."""
        self._streamed: set[int] = set()
        """Tool calls whose arguments came as `input_json_delta` pieces."""

    def feed(self, event: dict[str, Any]) -> list[ChatDelta]:
        """The deltas `event` carries (none for most events)."""
        kind = event.get("type")
        if kind == "message_start":
            self._usage((event.get("message") or {}).get("usage"))
        elif kind == "content_block_start":
            return self._block_start(int(event.get("index", 0)), event.get("content_block") or {})
        elif kind == "content_block_delta":
            return self._block_delta(int(event.get("index", 0)), event.get("delta") or {})
        elif kind == "content_block_stop":
            return self._block_stop(int(event.get("index", 0)))
        elif kind == "message_delta":
            delta = event.get("delta") or {}
            self.stop_reason = str(delta.get("stop_reason") or self.stop_reason)
            self.stop_sequence = str(delta.get("stop_sequence") or "")
            self._usage(event.get("usage"))
        return []

    def _block_start(self, index: int, block: dict[str, Any]) -> list[ChatDelta]:
        if block.get("type") == "text" and block.get("text"):
            return [ChatDelta(str(block["text"]))]
        if block.get("type") != "tool_use":
            return []
        call = self._calls[index] = len(self._calls)
        given = block.get("input")
        self._arguments[call] = json.dumps(given) if isinstance(given, dict) and given else ""
        start = ToolCallDelta(call, id=str(block.get("id") or ""), name=str(block.get("name") or ""))
        return [ChatDelta("", tool_calls=(start,))]

    def _block_delta(self, index: int, delta: dict[str, Any]) -> list[ChatDelta]:
        if delta.get("type") == "text_delta":
            return [ChatDelta(str(delta.get("text") or ""))] if delta.get("text") else []
        if delta.get("type") != "input_json_delta" or index not in self._calls:
            return []
        call, piece = self._calls[index], str(delta.get("partial_json") or "")
        if call not in self._streamed:  # pieces replace an input given whole at the start
            self._streamed.add(call)
            self._arguments[call] = ""
        self._arguments[call] += piece
        return [ChatDelta("", tool_calls=(ToolCallDelta(call, arguments=piece),))] if piece else []

    def _block_stop(self, index: int) -> list[ChatDelta]:
        call = self._calls.get(index)
        if call is None or (call in self._streamed and self._arguments[call]):
            return []
        # No pieces came: the input was given whole at the start, or is empty.
        whole = self._arguments[call] or "{}"
        self._arguments[call] = whole
        return [ChatDelta("", tool_calls=(ToolCallDelta(call, arguments=whole),))]

    def _usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        prompt = sum(int(usage.get(k) or 0) for k in
                     ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"))
        self.prompt_tokens = prompt or self.prompt_tokens
        self.completion_tokens = int(usage.get("output_tokens") or 0) or self.completion_tokens

    def last(self) -> ChatDelta:
        """The closing delta: finish reason (a stop for an unknown `stop_reason`), the stop
        sequence that ended the answer, and the usage."""
        finish = FINISH.get(self.stop_reason, "stop")
        if self._calls and finish == "stop" and self.stop_reason != "stop_sequence":
            finish = "tool_calls"  # a call was made: OpenAI's clients look for this reason
        return ChatDelta("", finish_reason=finish, stop_sequence=self.stop_sequence,
                         usage=Usage(self.prompt_tokens, self.completion_tokens))
