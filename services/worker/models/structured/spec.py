"""What grammar a chat request's answer must follow, as a grammar engine description.

`grammar_spec` turns a request's `response_format` and `tools` / `tool_choice` /
`parallel_tool_calls` into an xgrammar structural tag (plain JSON data), or None when the answer
is free text. The description is the cache key of the compiled grammar: requests with the same
schemas and tools share one compilation.

Tool calls use one format everywhere (the Hermes / Qwen one):

    <tool_call>
    {"name": "<function>", "arguments": {...}}
    </tool_call>

several calls being several blocks separated by a newline. By tool choice: `none` leaves the
text free; `auto` allows text whose first character is not `<`, or one or more blocks;
`required` one or more blocks; `function` exactly one block for that function. Arguments follow
each tool's `parameters` schema (any JSON object when it has none).
"""

from __future__ import annotations

import json
from typing import Any

from services.worker.models.types import ChatParams, Tool

CALL_OPEN = "<tool_call>\n"
CALL_CLOSE = "\n</tool_call>"
CALL_SEPARATOR = "\n"
MAX_WHITESPACE = 16
"""Whitespace characters allowed in a row inside JSON: room for indented output, but a model
cannot spin on whitespace forever."""

_ANY_OBJECT: dict[str, Any] = {"type": "object"}
_FREE_TEXT = r"[^<][\s\S]*"


def call_header(name: str) -> str:
    """The text of a call up to its arguments."""
    return CALL_OPEN + '{"name": ' + json.dumps(name) + ', "arguments": '


def json_format(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON value following `schema`, as a structural tag element (whitespace bounded)."""
    return {"type": "json_schema_bounded", "schema": schema}


def _call(tool: Tool) -> dict[str, Any]:
    return {"type": "sequence", "elements": [
        {"type": "const_string", "value": call_header(tool.name)},
        json_format(tool.parameters or _ANY_OBJECT),
        {"type": "const_string", "value": "}" + CALL_CLOSE},
    ]}


def _calls(tools: list[Tool], parallel: bool) -> dict[str, Any]:
    one = _call(tools[0]) if len(tools) == 1 else {"type": "or", "elements": [_call(t) for t in tools]}
    if not parallel:
        return one
    more = {"type": "star", "content": {"type": "sequence", "elements": [
        {"type": "const_string", "value": CALL_SEPARATOR}, one]}}
    return {"type": "sequence", "elements": [one, more]}


def grammar_spec(params: ChatParams) -> dict[str, Any] | None:
    """The grammar the request's answer must follow, or None for free text.

    The request is valid (`ChatParams.validate`): response_format and tool calls are not both
    asked for.
    """
    response = params.response_format
    if response.type == "json_object":
        return json_format(_ANY_OBJECT)
    if response.type == "json_schema":
        return json_format(response.schema or _ANY_OBJECT)
    choice = params.effective_tool_choice
    if choice == "none":
        return None
    if choice == "function":
        assert params.tool_choice is not None
        chosen = [t for t in params.tools if t.name == params.tool_choice.name]
        return _calls(chosen, parallel=False)
    calls = _calls(params.tools, params.parallel_tool_calls)
    if choice == "required":
        return calls
    return {"type": "or", "elements": [{"type": "regex", "pattern": _FREE_TEXT}, calls]}


def spec_key(spec: dict[str, Any]) -> str:
    """The cache key of a grammar: its canonical JSON text."""
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))
