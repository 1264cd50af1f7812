"""Generated text to OpenAI-shaped tool-call deltas, as the text streams.

An answer is either text (its first character is not `<`) or `<tool_call>` blocks (see
`spec`): the first character decides. In a block, once `"arguments": ` is read the call's
first delta goes out (index, a fresh id, the name, arguments ""), then the arguments text in
pieces as it comes; the closing `}` and `</tool_call>` are held back and never shown.
"""

from __future__ import annotations

import json
import secrets
import string

from services.worker.models.structured.spec import CALL_OPEN
from services.worker.models.types import ToolCallDelta

_ID_ALPHABET = string.ascii_letters + string.digits
_ARGUMENTS = '"arguments": '


def new_call_id() -> str:
    """A tool call's id: `call_` and 24 random letters and digits."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


class ToolCallParser:
    """Splits one choice's streamed text into plain text and tool-call deltas."""

    def __init__(self) -> None:
        self._mode = ""  # "", "text", "header", "arguments", "between"
        self._buffer = ""
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self.calls = 0
        """Calls begun so far."""

    def push(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """Add generated text; return the plain text and the call deltas it completes."""
        if self._mode == "":
            if not text:
                return "", []
            self._mode = "header" if text.startswith("<") else "text"
        if self._mode == "text":
            return text, []
        self._buffer += text
        deltas: list[ToolCallDelta] = []
        while self._step(deltas):
            pass
        return "", deltas

    def _step(self, deltas: list[ToolCallDelta]) -> bool:
        """Consume what the buffer allows in the current mode; False when it needs more text."""
        if self._mode == "between":
            start = self._buffer.find(CALL_OPEN)
            if start < 0:
                return False
            self._buffer, self._mode = self._buffer[start:], "header"
        if self._mode == "header":
            end = self._buffer.find(_ARGUMENTS)
            if end < 0:
                return False
            name = _call_name(self._buffer[:end])
            deltas.append(ToolCallDelta(index=self.calls, id=new_call_id(), name=name, arguments=""))
            self.calls += 1
            self._buffer, self._mode = self._buffer[end + len(_ARGUMENTS):], "arguments"
            self._depth, self._in_string, self._escaped = 0, False, False
        piece, done = self._scan_arguments()
        if piece:
            deltas.append(ToolCallDelta(index=self.calls - 1, arguments=piece))
        if done:
            self._mode = "between"
        return done

    def _scan_arguments(self) -> tuple[str, bool]:
        """The arguments text in the buffer, and whether the arguments object closed."""
        for i, char in enumerate(self._buffer):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    piece, self._buffer = self._buffer[: i + 1], self._buffer[i + 1:]
                    return piece, True
        piece, self._buffer = self._buffer, ""
        return piece, False


def _call_name(header: str) -> str:
    """The function name in a call's header (`<tool_call>\\n{"name": "...", `)."""
    start = header.find('"name":')
    text = header[start + len('"name":'):].strip().rstrip(",").strip()
    try:
        name = json.loads(text)
    except ValueError:
        return text.strip('"')
    return name if isinstance(name, str) else str(name)
