"""OpenAI's chat and completions bodies and answers, as this side sees them: the body of a
request (`chat_body`, with `ChatOptions`), and the answer taken apart into pieces of text,
tool calls and logprobs per choice, streamed (`StreamedAnswer`) or whole (`whole_answer`).

No HTTP here: `services.common.openai_upstream` sends the bodies and reads the answers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from services.common.errors import InvalidArgument

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


