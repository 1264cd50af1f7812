"""OpenAI's chat and completions answers as this side reads them: taken apart into pieces of
text, tool calls and logprobs per choice, streamed (`StreamedAnswer`) or whole
(`whole_answer`). The requests are `openai_chat`'s.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import orjson

FinishReason = Literal["stop", "length", "tool_calls"]


@dataclass(frozen=True, slots=True)
class UpstreamUsage:
    """Token counts the upstream reported."""

    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class UpstreamToolCall:
    """A piece of a tool call, as OpenAI streams them: the first piece of a call has its `id`
    and `name` (and no arguments), later ones more `arguments` text."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(frozen=True, slots=True)
class UpstreamLogprob:
    """A token's log probability and UTF-8 bytes, with the most likely alternatives (as
    (token, logprob, bytes) entries, most likely first)."""

    token: str
    logprob: float
    utf8: bytes = b""
    top: tuple[tuple[str, float, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class UpstreamText:
    """A piece of an answer (streamed), or a whole one, of choice `index`: its text, tool-call
    pieces and logprobs, and on a choice's last piece the finish reason; the answer's last
    piece has the usage (all choices), when the upstream reported it."""

    text: str
    finish_reason: FinishReason | None = None
    usage: UpstreamUsage | None = None
    index: int = 0
    tool_calls: tuple[UpstreamToolCall, ...] = ()
    logprobs: tuple[UpstreamLogprob, ...] = ()


class StreamedAnswer:
    """An upstream's streamed answer taken apart event by event: `pieces(event)` for each
    event, then `endings()` once the stream ends.

    Tool-call pieces are passed on as OpenAI streams them: a call the upstream sends whole
    becomes a first piece (id and name) and a piece of arguments; a choice that called tools
    finishes with `tool_calls` whatever the upstream said.
    """

    def __init__(self) -> None:
        self._finishes: dict[int, FinishReason | None] = {}
        self._calling: set[int] = set()
        self.usage: UpstreamUsage | None = None

    def pieces(self, event: dict[str, Any]) -> Iterator[UpstreamText]:
        """The text, tool-call pieces and logprobs an event carries, one piece per choice."""
        self.usage = _usage(event.get("usage")) or self.usage
        for choice in _dicts(event.get("choices")):
            index = _index(choice.get("index"))
            delta = choice.get("delta")
            delta = delta if isinstance(delta, dict) else {}
            text = delta.get("content") or choice.get("text") or ""
            calls = _tool_call_pieces(delta.get("tool_calls"))
            logprobs = _logprobs(choice.get("logprobs"))
            self._finishes[index] = _finish(choice.get("finish_reason")) or self._finishes.get(index)
            if calls:
                self._calling.add(index)
            if text or calls or logprobs:
                yield UpstreamText(str(text), index=index, tool_calls=calls, logprobs=logprobs)

    def endings(self) -> Iterator[UpstreamText]:
        """Per choice seen (choice 0 at least), in index order, a piece with no text and its
        finish reason (`stop` when the upstream gave none); the last one has the usage."""
        indices = sorted(self._finishes) or [0]
        for n, index in enumerate(indices):
            finish = "tool_calls" if index in self._calling else self._finishes.get(index) or "stop"
            yield UpstreamText("", finish, self.usage if n == len(indices) - 1 else None, index=index)


def whole_answer(data: dict[str, Any]) -> list[UpstreamText]:
    """Every choice of an answer that did not stream, whole, in index order (at least one);
    the usage is on each, tool calls are whole (one piece each)."""
    usage = _usage(data.get("usage"))
    answers = [_whole_choice(choice, usage) for choice in _dicts(data.get("choices"))]
    return sorted(answers, key=lambda a: a.index) or [UpstreamText("", "stop", usage)]


def _finish(value: Any) -> FinishReason | None:
    """OpenAI's finish reason as one of ours: `length` and `tool_calls` (`function_call`, its
    old name) stay, any other reason is a stop."""
    if not value:
        return None
    if value in ("tool_calls", "function_call"):
        return "tool_calls"
    return "length" if value == "length" else "stop"


def _dicts(value: Any) -> list[dict[str, Any]]:
    """The objects of a JSON list (anything else in it, or a value that is no list, ignored)."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _index(value: Any, default: int = 0) -> int:
    return value if isinstance(value, int) and value >= 0 else default


def _whole_choice(choice: dict[str, Any], usage: UpstreamUsage | None) -> UpstreamText:
    """A choice of an answer that did not stream; its tool calls whole, one piece each."""
    message = choice.get("message")
    message = message if isinstance(message, dict) else {}
    text = message.get("content") or choice.get("text") or ""
    calls = tuple(
        UpstreamToolCall(_index(call.get("index"), n), str(call.get("id") or ""), *_function(call))
        for n, call in enumerate(_dicts(message.get("tool_calls")))
    )
    finish = "tool_calls" if calls else _finish(choice.get("finish_reason")) or "stop"
    return UpstreamText(str(text), finish, usage, index=_index(choice.get("index")), tool_calls=calls,
                        logprobs=_logprobs(choice.get("logprobs")))


def _function(call: dict[str, Any]) -> tuple[str, str]:
    """A tool call's function name and arguments text (arguments sent as an object: its JSON)."""
    function = call.get("function")
    function = function if isinstance(function, dict) else {}
    arguments = function.get("arguments") or ""
    if not isinstance(arguments, str):
        arguments = orjson.dumps(arguments).decode()
    return str(function.get("name") or ""), arguments


def _tool_call_pieces(value: Any) -> tuple[UpstreamToolCall, ...]:
    """A delta's `tool_calls` as pieces; a call's first piece split from its arguments."""
    pieces: list[UpstreamToolCall] = []
    for n, call in enumerate(_dicts(value)):
        index, call_id = _index(call.get("index"), n), str(call.get("id") or "")
        name, arguments = _function(call)
        if call_id or name:
            pieces.append(UpstreamToolCall(index, call_id, name))
        if arguments:
            pieces.append(UpstreamToolCall(index, arguments=arguments))
    return tuple(pieces)


def _logprobs(value: Any) -> tuple[UpstreamLogprob, ...]:
    """A choice's logprobs: chat's `content` entries, or the completions endpoint's lists."""
    if not isinstance(value, dict):
        return ()
    if "content" in value:
        return tuple(
            UpstreamLogprob(str(entry.get("token", "")), _float(entry.get("logprob")), _bytes(entry),
                            tuple((str(top.get("token", "")), _float(top.get("logprob")), _bytes(top))
                                  for top in _dicts(entry.get("top_logprobs"))))
            for entry in _dicts(value.get("content"))
        )
    tokens, logprobs = value.get("tokens"), value.get("token_logprobs")
    if not isinstance(tokens, list) or not isinstance(logprobs, list):
        return ()
    alternatives = value.get("top_logprobs")
    alternatives = alternatives if isinstance(alternatives, list) else []
    entries = []
    for n, (token, logprob) in enumerate(zip(tokens, logprobs, strict=False)):
        top = alternatives[n] if n < len(alternatives) and isinstance(alternatives[n], dict) else {}
        ranked = sorted(top.items(), key=lambda item: -_float(item[1]))
        entries.append(UpstreamLogprob(str(token), _float(logprob), str(token).encode(),
                                       tuple((str(t), _float(p), str(t).encode()) for t, p in ranked)))
    return tuple(entries)


def _float(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def _bytes(entry: dict[str, Any]) -> bytes:
    """A logprob entry's `bytes` (a list of byte values); its token's UTF-8 when absent."""
    values = entry.get("bytes")
    if isinstance(values, list) and all(isinstance(b, int) and 0 <= b < 256 for b in values):
        return bytes(values)
    return str(entry.get("token", "")).encode()


def _usage(value: Any) -> UpstreamUsage | None:
    if not isinstance(value, dict):
        return None
    return UpstreamUsage(int(value.get("prompt_tokens") or 0), int(value.get("completion_tokens") or 0))
