"""Turning a stream of token ids into a stream of text: incremental decoding, stop sequences, and
one choice's deltas (text, tool-call pieces, log probabilities)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from services.worker.models.generation import RawLogprob
from services.worker.models.structured import ToolCallParser
from services.worker.models.types import FinishReason, TokenLogprob, ToolCallDelta, TopLogprob


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
        self.matched = ""
        """The stop sequence that cut the text, once one did."""

    def push(self, text: str) -> str:
        """Add text; return what is safe to emit. Sets `stopped` when a stop sequence appears."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        self._pending += text
        found = [(i, s) for i, s in ((self._pending.find(s), s) for s in self._stops) if i >= 0]
        if found:
            cut, self.matched = min(found, key=lambda f: f[0])
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


class TokenTexts:
    """Each token's own text and bytes (for log probabilities), worked out once per model.

    A token may hold part of a character: its text then shows U+FFFD, while its bytes are its
    own (byte-level BPE and byte-fallback tokens), so that a client joining the bytes of a
    completion's tokens gets its text.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._known: dict[int, tuple[str, bytes]] = {}
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel"

    def of(self, token_id: int) -> tuple[str, bytes]:
        """The token decoded alone, and its bytes."""
        known = self._known.get(token_id)
        if known is None:
            text = self._tokenizer.decode([token_id])
            known = self._known[token_id] = (text, self._bytes(token_id, text))
        return known

    def _bytes(self, token_id: int, text: str) -> bytes:
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and self._byte_level and all(c in _BYTE_OF for c in piece):
            return bytes(_BYTE_OF[c] for c in piece)
        if isinstance(piece, str) and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            return bytes([int(piece[3:5], 16)])
        return text.encode()

    def logprob(self, raw: RawLogprob) -> TokenLogprob:
        """A drawn token's log probability with its alternatives, as the API shows them."""
        top = tuple(TopLogprob(*self.of(i)[:1], value, self.of(i)[1]) for i, value in raw.top)
        text, data = self.of(raw.token_id)
        return TokenLogprob(text, raw.logprob, data, top)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character each byte is spelled with in its tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {chr(b) if b in printable else chr(next(extra)): b for b in range(256)}


_BYTE_OF = _byte_level_alphabet()


@dataclass
class ChoicePiece:
    """What a batch of one choice's tokens adds to its answer."""

    text: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.text or self.tool_calls or self.logprobs)


class ChoiceDecoder:
    """One choice's tokens to its answer: text cut at stop sequences, tool calls parsed out of
    it when the request has tools (`parse_tools`), and log probabilities of the tokens shown
    (end-of-sequence tokens have none)."""

    def __init__(self, tokenizer: Any, texts: TokenTexts, eos: list[int], stops: list[str], parse_tools: bool) -> None:
        self._decoder = IncrementalDecoder(tokenizer)
        self._stops = StopMatcher(stops)
        self._texts = texts
        self._eos = set(eos)
        self._parser = ToolCallParser() if parse_tools else None
        self.completion_tokens = 0
        self.ended = False
        """Whether an EOS or a stop sequence ended the choice."""

    def push(self, token_ids: list[int], raw_logprobs: list[RawLogprob]) -> ChoicePiece:
        """Take tokens (and their log probabilities, when asked for)."""
        pieces = []
        shown = 0
        for token_id in token_ids:
            self.completion_tokens += 1
            if token_id in self._eos:
                self.ended = True
                break
            shown += 1
            pieces.append(self._stops.push(self._decoder.push([token_id])))
            if self._stops.stopped:
                self.ended = True
                break
        piece = self._parse("".join(pieces))
        piece.logprobs = [self._texts.logprob(r) for r in raw_logprobs[:shown] if r.token_id not in self._eos]
        return piece

    def finish(self, engine_reason: str | None, engine_stop: str) -> tuple[ChoicePiece, FinishReason, str]:
        """The text still held back, the finish reason and the stop sequence that ended it."""
        piece = self._parse(self._stops.push(self._decoder.flush()) + self._stops.flush())
        stop = self._stops.matched or engine_stop
        reason: FinishReason = "stop" if self.ended or stop or engine_reason == "stop" else "length"
        if reason == "stop" and self._parser is not None and self._parser.calls:
            reason = "tool_calls"
        return piece, reason, stop

    def _parse(self, text: str) -> ChoicePiece:
        if self._parser is None or not text:
            return ChoicePiece(text)
        shown, calls = self._parser.push(text)
        return ChoicePiece(shown, calls)
