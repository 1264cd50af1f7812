"""Tokens from the engine's thread to the event loop(s), several per message when the loop lags.

The engine puts each step's tokens here and flushes once per turn; at most one delivery per
event loop is pending at a time, so when a consumer's loop is slower than the model, the tokens
of several steps reach its stream as one list. A stream's first token is the exception: it is
handed over at once, without waiting for the turn's decode step, since the time to first token
of a request that joins a running batch is its own prefill plus whatever it waits for after.

A stream holds what was delivered but not read yet; `BoundedTokenStream` ends a request whose
consumer falls `max_unread` tokens behind (a client reading slowly) with `Overloaded`, and
stops its generation. Ending it, rather than pausing its row, frees the row and its KV cache
for requests whose clients keep up: a paused row would hold both for as long as its client
dawdles, and every step of the batch would still carry it.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable

from services.common.errors import Overloaded
from services.worker.models.generation import RawLogprob, TokenStream


class BoundedTokenStream(TokenStream):
    """A `TokenStream` that holds at most `max_unread` delivered tokens its consumer has not read.

    One more ends it with `Overloaded` (after the tokens it holds) and stops its generation;
    tokens that still arrive are dropped.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, on_cancel: Callable[[], None], *,
                 max_unread: int, name: str) -> None:
        super().__init__(loop, on_cancel)
        self.max_unread = max_unread
        self.unread = 0
        """Tokens delivered and not read yet."""
        self._name = name

    def put(self, token_ids: list[int], logprobs: list[RawLogprob] | None = None) -> None:
        """Deliver tokens, or end the stream if its consumer is too far behind; on the loop."""
        if self.cancelled.is_set():
            return
        self.unread += len(token_ids)
        super().put(token_ids, logprobs)
        if self.unread > self.max_unread:
            self.cancel()
            self.end(Overloaded(
                f"model '{self._name}': the client read too slowly; its token queue reached its "
                f"bound of {self.max_unread} unread tokens, so the request was ended to free its "
                "place in the batch"))

    async def __anext__(self) -> list[int]:
        token_ids = await super().__anext__()
        self.unread -= len(token_ids)
        return token_ids


class Outbox:
    """Per-stream pending tokens and endings, handed to each stream's loop in batches."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[TokenStream, list[int]] = {}
        self._logprobs: dict[TokenStream, list[RawLogprob]] = {}
        self._ends: dict[TokenStream, BaseException | None] = {}
        self._scheduled: set[asyncio.AbstractEventLoop] = set()
        # Weak: a stream the engine drops (cancelled) is never ended here.
        self._started: weakref.WeakSet[TokenStream] = weakref.WeakSet()

    def put(self, stream: TokenStream, token: int, logprob: RawLogprob | None = None) -> None:
        """Queue a token of `stream` (engine thread), with its log probability when asked for;
        its first token is delivered at once."""
        with self._lock:
            self._tokens.setdefault(stream, []).append(token)
            if logprob is not None:
                self._logprobs.setdefault(stream, []).append(logprob)
            first = stream not in self._started
            if first:
                self._started.add(stream)
        if first:
            self.flush()

    def end(self, stream: TokenStream, error: BaseException | None = None) -> None:
        """Queue the end of `stream`, after its queued tokens (engine thread)."""
        with self._lock:
            self._ends[stream] = error
            self._started.discard(stream)

    def flush(self) -> None:
        """Schedule a delivery on every loop that has something pending and none scheduled."""
        with self._lock:
            loops = {s.loop for s in (*self._tokens, *self._ends)} - self._scheduled
            self._scheduled |= loops
        for loop in loops:
            try:
                loop.call_soon_threadsafe(self._deliver, loop)
            except RuntimeError:  # that event loop is closed: nobody is listening there
                self._discard(loop)

    def _discard(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            self._scheduled.discard(loop)
            self._tokens = {s: t for s, t in self._tokens.items() if s.loop is not loop}
            self._logprobs = {s: p for s, p in self._logprobs.items() if s.loop is not loop}
            self._ends = {s: e for s, e in self._ends.items() if s.loop is not loop}

    def _deliver(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            self._scheduled.discard(loop)
            tokens = {s: t for s, t in self._tokens.items() if s.loop is loop}
            ends = {s: e for s, e in self._ends.items() if s.loop is loop}
            logprobs = {s: self._logprobs.pop(s) for s in tokens if s in self._logprobs}
            for stream in tokens:
                del self._tokens[stream]
            for stream in ends:
                del self._ends[stream]
        for stream, token_ids in tokens.items():
            stream.put(token_ids, logprobs.get(stream))
        for stream, error in ends.items():
            stream.end(error)
