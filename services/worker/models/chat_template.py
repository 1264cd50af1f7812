"""Chat templates: what a tokenizer's template accepts, and turning requests into prompt ids."""

from __future__ import annotations

import json
import logging
from typing import Any

from services.common.errors import InvalidArgument
from services.worker.models.structured.tool_prompt import calls_as_text, result_as_user_text, tool_system_prompt
from services.worker.models.types import ChatMessage, ChatParams, ToolCallingMode

log = logging.getLogger(__name__)

_SYSTEM_PROBE = "rh-system-probe-5d1c"
_TOOL_PROBE = "rh_tool_probe_5d1c"


def _render(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict] | None = None) -> str:
    kwargs: dict[str, Any] = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template at all."""
    return bool(getattr(tokenizer, "chat_template", None))


def accepts_system_role(tokenizer: Any) -> bool:
    """Render a system message; a template that raises or drops its content does not accept it."""
    if not has_chat_template(tokenizer):
        return False
    messages = [{"role": "system", "content": _SYSTEM_PROBE}, {"role": "user", "content": "hi"}]
    try:
        return _SYSTEM_PROBE in _render(tokenizer, messages)
    except Exception:
        return False


def accepts_tools(tokenizer: Any) -> bool:
    """Render with a tool definition; the template accepts tools if the tool's name shows up."""
    if not has_chat_template(tokenizer):
        return False
    tool = {
        "type": "function",
        "function": {
            "name": _TOOL_PROBE,
            "description": "probe",
            "parameters": {"type": "object", "properties": {}},
        },
    }
    try:
        return _TOOL_PROBE in _render(tokenizer, [{"role": "user", "content": "hi"}], [tool])
    except Exception:
        return False


def tool_calling_mode(tokenizer: Any) -> ToolCallingMode:
    """How the model calls tools: through its template's tool slot (`template`), by constrained
    decoding after a system prompt describing them (`constrained`), or not at all ("": no chat
    template)."""
    if not has_chat_template(tokenizer):
        return ""
    return "template" if accepts_tools(tokenizer) else "constrained"


def accepts_tool_role(tokenizer: Any) -> bool:
    """Render a `tool` message; a template that raises or drops its content does not take the role."""
    if not has_chat_template(tokenizer):
        return False
    messages: list[dict[str, Any]] = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "", "tool_calls": [_probe_call()]},
                {"role": "tool", "content": _SYSTEM_PROBE, "tool_call_id": "call_probe", "name": _TOOL_PROBE}]
    try:
        return _SYSTEM_PROBE in _render(tokenizer, messages)
    except Exception:
        return False


def _probe_call() -> dict[str, Any]:
    return {"id": "call_probe", "type": "function", "function": {"name": _TOOL_PROBE, "arguments": {}}}


def fold_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Move system prompts into the first user turn, for templates without a system role."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [m for m in messages if m["role"] != "system"]
    if not system:
        return rest
    for i, message in enumerate(rest):
        if message["role"] == "user":
            rest[i] = {**message, "content": f"{system}\n\n{message['content']}"}
            return rest
    return [{"role": "user", "content": system}, *rest]


def _with_system(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """`text` merged into the first system message (one is added in front when there is none)."""
    if not text:
        return messages
    for i, message in enumerate(messages):
        if message["role"] == "system":
            return [*messages[:i], {**message, "content": f"{message['content']}\n\n{text}"}, *messages[i + 1:]]
    return [{"role": "system", "content": text}, *messages]


def _arguments(text: str) -> Any:
    """A call's arguments as templates expect them: an object (the text when it is not JSON)."""
    try:
        return json.loads(text) if text.strip() else {}
    except ValueError:
        return text


class PromptBuilder:
    """Turns a `ChatParams` into prompt token ids the way the model was trained to read them.

    Tools go through the template's tool slot when it has one (`tool_calling` "template"); else
    (`"constrained"`) they are described in the system prompt (`structured.tool_prompt`), earlier
    calls are shown as `<tool_call>` text and tool results as `tool` messages when the template
    takes the role, else as user messages.
    """

    def __init__(self, tokenizer: Any, supports_system_role: bool, tool_calling: str) -> None:
        self._tokenizer = tokenizer
        self._system = supports_system_role
        self._slot = tool_calling == "template"
        self._tool_role = self._slot or accepts_tool_role(tokenizer)

    def prompt_ids(self, params: ChatParams) -> list[int]:
        """Chat messages through the template (generation prompt added), or the raw prompt."""
        if params.prompt is not None:
            return list(self._tokenizer(params.prompt)["input_ids"])
        if not has_chat_template(self._tokenizer):
            raise InvalidArgument("this model has no chat template; send a raw 'prompt' instead")
        messages = self._messages(params.messages)
        tools = None
        if self._slot:
            tools = [t.to_openai() for t in params.tools] or None
        else:
            messages = _with_system(messages, tool_system_prompt(params))
        if not self._system:
            messages = fold_system(messages)
        try:
            text = _render(self._tokenizer, messages, tools)
        except Exception as exc:  # templates raise on roles or orders they refuse
            raise InvalidArgument(f"the chat template rejected the messages: {exc}") from None
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def _messages(self, messages: list[ChatMessage]) -> list[dict[str, Any]]:
        names = {call.id: call.name for m in messages for call in m.tool_calls}
        rendered: list[dict[str, Any]] = []
        for m in messages:
            entry: dict[str, Any] = {"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})}
            if m.tool_calls and self._slot:
                entry["tool_calls"] = [
                    {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": _arguments(c.arguments)}}
                    for c in m.tool_calls
                ]
            elif m.tool_calls:
                entry["content"] = "\n".join(p for p in (m.content, calls_as_text(m.tool_calls)) if p)
            if m.role == "tool":
                name = m.name or names.get(m.tool_call_id, "")
                if self._tool_role:
                    entry.update(tool_call_id=m.tool_call_id, **({"name": name} if name else {}))
                else:
                    entry = {"role": "user", "content": result_as_user_text(name, m.tool_call_id, m.content)}
            rendered.append(entry)
        return rendered
