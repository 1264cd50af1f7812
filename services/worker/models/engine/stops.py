"""Stop sequences on token boundaries: the token whose text completes a stop string ends its row.

After each step the engine decodes a short window of a stopping row's recent tokens (enough
bytes to hold the longest stop string, each token holding at least one) and looks for the stop
strings in it. An occurrence that ended before the newest token was already found a step
earlier, so one found now is completed by the newest token: the row ends there, and nothing
after it is generated. Decoding skips special tokens, as the text a client sees does.
"""

from __future__ import annotations

from typing import Any

_SLACK = 2
"""Tokens beyond the longest stop string's bytes in the window: a token may begin mid-character."""


class StopWatch:
    """One sequence's stop strings and its most recent tokens; used from the engine's thread."""

    def __init__(self, stops: tuple[str, ...], tokenizer: Any) -> None:
        self.stops = tuple(s for s in stops if s)
        self._tokenizer = tokenizer
        self._window = max((len(s.encode()) for s in self.stops), default=0) + _SLACK
        self._recent: list[int] = []

    def push(self, token_id: int) -> str:
        """Take the next generated token; return the stop string it completes, or ""."""
        self._recent.append(token_id)
        if len(self._recent) > self._window:
            del self._recent[0]
        text = self._tokenizer.decode(self._recent, skip_special_tokens=True)
        found = [(at, stop) for stop in self.stops if (at := text.find(stop)) >= 0]
        return min(found)[1] if found else ""
