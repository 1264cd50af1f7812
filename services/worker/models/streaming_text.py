"""Turning a stream of token ids into a stream of text: incremental decoding and stop sequences."""

from __future__ import annotations

from typing import Any


class IncrementalDecoder:
    """Decodes token ids as they arrive and hands out only the new, complete text.

    Decoding a short window of recent tokens (not the whole sequence) keeps it linear,
    and text ending in an incomplete UTF-8 sequence is held back until the next token.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token_ids: list[int]) -> str:
        """Add tokens; return the text they complete (may be empty)."""
        self._ids.extend(token_ids)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full[len(prefix) :]

    def flush(self) -> str:
        """Text still held back (an incomplete character at the end), decoded as is."""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return full[len(prefix) :] if len(full) > len(prefix) else ""

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self._tokenizer.decode(ids, skip_special_tokens=True)


class StopMatcher:
    """Cuts the text stream before the first stop sequence.

    Text that could be the beginning of a stop sequence is held back until the next
    piece shows whether it is one; stop text itself is never returned.
    """

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Add text; return what is safe to emit. Sets `stopped` when a stop sequence appears."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        self._pending += text
        cut = min((i for i in (self._pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
            return out
        hold = self._partial_match_length()
        out = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(self._pending) - hold :]
        return out

    def flush(self) -> str:
        """The held-back text, at the end of the stream (it never became a stop sequence)."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out

    def _partial_match_length(self) -> int:
        """Length of the longest suffix of the pending text that starts some stop sequence."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:n]):
                    best = n
                    break
        return best
