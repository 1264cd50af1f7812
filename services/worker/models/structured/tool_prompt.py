"""Tools in the prompt of a model whose chat template has no tool slot.

Such a model is told about the tools in a system message (name, description, parameter schema)
and about the `<tool_call>` format its calls take; its earlier calls are shown as that text, and
tool results as `tool` messages when its template takes the role, else as user messages.
"""

from __future__ import annotations

import json

from services.worker.models.structured.spec import CALL_CLOSE, CALL_OPEN, CALL_SEPARATOR
from services.worker.models.types import ChatParams, Tool, ToolCall

_FORMAT = (
    CALL_OPEN + '{"name": "<function name>", "arguments": <the arguments as a JSON object>}' + CALL_CLOSE
)


def tool_system_prompt(params: ChatParams) -> str:
    """The system text describing the request's tools and how to call them ("" without tools or
    with tool choice `none`)."""
    choice = params.effective_tool_choice
    if choice == "none":
        return ""
    tools = params.tools
    if choice == "function" and params.tool_choice is not None:
        tools = [t for t in params.tools if t.name == params.tool_choice.name]
    lines = ["You can call these functions (one JSON description per line):"]
    lines += [json.dumps(_description(t), ensure_ascii=False) for t in tools]
    lines.append("")
    lines.append(f"To call a function, answer with a block like this one for each call:\n{_FORMAT}")
    if choice == "auto":
        lines.append("Call a function only when it helps; otherwise answer in plain text.")
    elif choice == "function" and params.tool_choice is not None:
        lines.append(f"Call the function {params.tool_choice.name} now.")
    else:
        lines.append("Call one of the functions now.")
    if not params.parallel_tool_calls or choice == "function":
        lines.append("Make at most one call.")
    return "\n".join(lines)


def _description(tool: Tool) -> dict[str, object]:
    entry: dict[str, object] = {"name": tool.name}
    if tool.description:
        entry["description"] = tool.description
    entry["parameters"] = tool.parameters or {"type": "object", "properties": {}}
    return entry


def calls_as_text(calls: tuple[ToolCall, ...]) -> str:
    """An assistant's earlier calls as the `<tool_call>` blocks it would have generated."""
    blocks = []
    for call in calls:
        blocks.append(CALL_OPEN + '{"name": ' + json.dumps(call.name) + ', "arguments": '
                      + (call.arguments.strip() or "{}") + "}" + CALL_CLOSE)
    return CALL_SEPARATOR.join(blocks)


def result_as_user_text(name: str, call_id: str, content: str) -> str:
    """A tool result for a template without a `tool` role."""
    return f"Result of {name or 'the call'} (call {call_id}): {content}"
