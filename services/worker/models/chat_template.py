"""Chat templates: what a tokenizer's template accepts, and turning requests into prompt ids."""

from __future__ import annotations

import logging
from typing import Any

from services.common.errors import InvalidArgument
from services.worker.models.types import ChatMessage, ChatParams

log = logging.getLogger(__name__)

_SYSTEM_PROBE = "rh-system-probe-5d1c"
_TOOL_PROBE = "rh_tool_probe_5d1c"


def _render(tokenizer: Any, messages: list[dict[str, str]], tools: list[dict] | None = None) -> str:
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


def fold_system(messages: list[ChatMessage]) -> list[ChatMessage]:
    """Move system prompts into the first user turn, for templates without a system role."""
    system = "\n\n".join(m.content for m in messages if m.role == "system")
    rest = [m for m in messages if m.role != "system"]
    if not system:
        return rest
    for i, message in enumerate(rest):
        if message.role == "user":
            rest[i] = ChatMessage("user", f"{system}\n\n{message.content}", message.name)
            return rest
    return [ChatMessage("user", system), *rest]


class PromptBuilder:
    """Turns a `ChatParams` into prompt token ids the way the model was trained to read them."""

    def __init__(self, tokenizer: Any, supports_system_role: bool, supports_tools: bool) -> None:
        self._tokenizer = tokenizer
        self._system = supports_system_role
        self._tools = supports_tools

    def prompt_ids(self, params: ChatParams) -> list[int]:
        """Chat messages through the template (generation prompt added), or the raw prompt."""
        if params.prompt is not None:
            return list(self._tokenizer(params.prompt)["input_ids"])
        if not has_chat_template(self._tokenizer):
            raise InvalidArgument("this model has no chat template; send a raw 'prompt' instead")
        if params.tools and not self._tools:
            raise InvalidArgument("this model's chat template does not accept tools")
        messages = params.messages if self._system else fold_system(params.messages)
        rendered = [{"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})} for m in messages]
        tools = [t.to_openai() for t in params.tools] or None
        try:
            text = _render(self._tokenizer, rendered, tools)
        except Exception as exc:  # templates raise on roles or orders they refuse
            raise InvalidArgument(f"the chat template rejected the messages: {exc}") from None
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])
