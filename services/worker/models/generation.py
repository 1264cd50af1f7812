"""What a chat request asks of generation (`Sampling`) and how its tokens reach it (`TokenStream`).

Generation runs in the engine's thread; new token ids reach the event loop through
`loop.call_soon_threadsafe` onto an asyncio queue, so the loop never blocks on a forward pass.
What the engine knows about those tokens besides their ids (log probabilities, the stop sequence
or the reason that ended the sequence) travels on the same stream (`TokenStream.take_logprobs`,
`stop_sequence`, `finish_reason`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.worker.models.types import Phases

_END = object()


@dataclass(frozen=True)
class RawLogprob:
    """One generated token's log probability, with the most likely alternatives at that step
    (token id, log probability), most likely first. Log probabilities are those of the
    distribution the token was drawn from before temperature, top-k and top-p: the logits after
    logit bias, penalties and a constraint's mask (tokens it forbids are never listed)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked: temperature 0 or top_p 0 is greedy; a seed makes sampling
    reproducible (alone or in any batch).

    Penalties and biases change the logits before the draw (OpenAI's definitions: presence
    once per token that appeared in the completion, frequency per occurrence); `top_k` 0 is no
    limit. `logprobs` asks for each drawn token's log probability and `top_logprobs`
    alternatives (see `TokenStream.take_logprobs`). Generation ends at the token that completes
    one of `stop` (the text after it is never generated; see `TokenStream.stop_sequence`).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    top_k: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        """Whether the most likely token is always taken."""
        return self.temperature == 0 or self.top_p == 0


class TokenStream:
    """New token ids of one request, as an async iterator of lists; `cancel()` stops generation.

    The producer (the chat engine's thread) delivers through `loop.call_soon_threadsafe`.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, on_cancel: Callable[[], None]) -> None:
        self.loop = loop
        """The event loop the consumer reads on."""
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._on_cancel = on_cancel
        self.cancelled = threading.Event()
        self.finished = False
        self.phases = Phases()
        """When the request's prefill began, its first token and its last one came (producer side)."""
        self.stop_sequence = ""
        """The stop sequence whose last token ended generation (that token is the stream's last);
        "" otherwise. Set before the stream ends."""
        self.finish_reason: str | None = None
        """Why the producer ended the sequence, set before the stream ends: "stop" (an end token,
        a stop sequence, or a constraint that allowed no token: then no token came at that step)
        or "length" (max_new_tokens reached); None while running, or when it failed."""
        self._logprobs: list[RawLogprob] = []
        self._unclaimed = 0  # tokens handed to the consumer whose log probabilities it has not taken

    def put(self, token_ids: list[int], logprobs: list[RawLogprob] | None = None) -> None:
        """Deliver tokens (with their log probabilities, when asked for); call on the event loop."""
        if token_ids:
            if logprobs:
                self._logprobs.extend(logprobs)
            self._queue.put_nowait(token_ids)

    def take_logprobs(self) -> list[RawLogprob]:
        """The log probabilities of the tokens this stream has yielded and that were not taken
        yet, in order (one per token; empty unless `Sampling.logprobs`)."""
        count = min(self._unclaimed, len(self._logprobs))
        taken, self._logprobs = self._logprobs[:count], self._logprobs[count:]
        self._unclaimed = 0
        return taken

    def end(self, error: BaseException | None = None) -> None:
        """Mark the stream finished (with an error if generation failed); call on the event loop."""
        self._queue.put_nowait(error if error is not None else _END)

    def fail(self, error: BaseException) -> None:
        """End the stream with `error` now (the consumer sees it after the tokens already
        delivered) and stop the producer; call on the event loop."""
        if not self.finished:
            self.cancelled.set()
            self.end(error)

    def cancel(self) -> None:
        """Stop generating: the producer sees it before its next token. Idempotent."""
        if not self.cancelled.is_set() and not self.finished:
            self.cancelled.set()
            self._on_cancel()

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> list[int]:
        item = await self._queue.get()
        while isinstance(item, list) and not self._queue.empty() and isinstance(self._queue._queue[0], list):  # type: ignore[attr-defined]
            item = item + self._queue.get_nowait()  # a consumer that lags takes what arrived at once
        if item is _END:
            self.finished = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self._unclaimed += len(item)
        return item
