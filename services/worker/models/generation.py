"""Token generation off the event loop: the token stream and thread-per-request generation.

Generation runs in a thread; new token ids reach the event loop through
`loop.call_soon_threadsafe` onto an asyncio queue, so the loop never blocks on a forward pass.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

log = logging.getLogger(__name__)

_END = object()


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked: temperature 0 or top_p 0 is greedy; a seed makes sampling
    reproducible."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        """Whether the most likely token is always taken."""
        return self.temperature == 0 or self.top_p == 0


class TokenStream:
    """New token ids of one request, as an async iterator of lists; `cancel()` stops generation.

    Producers (a generation thread or a batching engine) call the `*_threadsafe` methods.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, on_cancel: Callable[[], None]) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._on_cancel = on_cancel
        self.cancelled = threading.Event()
        self.finished = False

    def put(self, token_ids: list[int]) -> None:
        """Deliver tokens; call on the event loop."""
        if token_ids:
            self._queue.put_nowait(token_ids)

    def end(self, error: BaseException | None = None) -> None:
        """Mark the stream finished (with an error if generation failed); call on the event loop."""
        self._queue.put_nowait(error if error is not None else _END)

    def put_threadsafe(self, token_ids: list[int]) -> None:
        """Deliver tokens from another thread."""
        self._loop.call_soon_threadsafe(self.put, token_ids)

    def end_threadsafe(self, error: BaseException | None = None) -> None:
        """Finish the stream from another thread."""
        self._loop.call_soon_threadsafe(self.end, error)

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
        if item is _END:
            self.finished = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        return item


class SeededSampler(LogitsProcessor):
    """Samples with temperature and top-p from its own generator, so concurrent requests
    do not share (and perturb) the global torch RNG. It leaves one finite score per row,
    so greedy decoding after it picks the sampled token."""

    def __init__(self, sampling: Sampling) -> None:
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
        self._generator = torch.Generator().manual_seed(seed)
        self._temperature = sampling.temperature
        self._top_p = sampling.top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float() / self._temperature
        if self._top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            probs = sorted_logits.softmax(dim=-1)
            drop = probs.cumsum(dim=-1) - probs > self._top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
        choice = torch.multinomial(logits.softmax(dim=-1), 1, generator=self._generator)
        picked = torch.full_like(scores, float("-inf"))
        return cast(torch.FloatTensor, picked.scatter_(-1, choice, 0.0))


class _CancelCriteria(StoppingCriteria):
    def __init__(self, cancelled: threading.Event) -> None:
        self._cancelled = cancelled

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> Any:
        return torch.full((input_ids.shape[0],), self._cancelled.is_set(), dtype=torch.bool)


class _StreamStreamer(BaseStreamer):
    def __init__(self, stream: TokenStream) -> None:
        self._stream = stream
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self._stream.put_threadsafe(value.reshape(-1).tolist())

    def end(self) -> None:
        """Nothing to do: the thread ends the stream once `generate` returns."""


class ThreadedGeneration:
    """Runs each request's `model.generate` in its own thread with its own streamer."""

    def __init__(self, model: Any, eos_token_ids: list[int], pad_token_id: int | None) -> None:
        self._model = model
        self._eos = eos_token_ids
        self._pad = pad_token_id if pad_token_id is not None else (eos_token_ids or [0])[0]
        self._lock = threading.Lock()
        self._running: set[TokenStream] = set()
        self._ids = itertools.count()

    @property
    def active_streams(self) -> int:
        """Requests whose generation thread is still running."""
        with self._lock:
            return len(self._running)

    def submit(self, prompt_ids: list[int], sampling: Sampling, max_new_tokens: int) -> TokenStream:
        """Start generating in a new thread; must be called on the event loop."""
        stream = TokenStream(asyncio.get_running_loop(), on_cancel=lambda: None)
        with self._lock:
            self._running.add(stream)
        thread = threading.Thread(
            target=self._run,
            args=(stream, prompt_ids, sampling, max_new_tokens),
            name=f"generate-{next(self._ids)}",
            daemon=True,
        )
        thread.start()
        return stream

    def _run(self, stream: TokenStream, prompt_ids: list[int], sampling: Sampling, max_new_tokens: int) -> None:
        config = copy.deepcopy(self._model.generation_config)
        config.update(
            do_sample=False, temperature=None, top_p=None, top_k=None, num_beams=1,
            max_new_tokens=max_new_tokens, min_new_tokens=None, max_length=None,
            eos_token_id=self._eos, pad_token_id=self._pad,
        )  # fmt: skip
        processors = LogitsProcessorList([] if sampling.greedy else [SeededSampler(sampling)])
        input_ids = torch.tensor([prompt_ids], dtype=torch.long)
        error: BaseException | None = None
        try:
            with torch.inference_mode():
                self._model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    generation_config=config,
                    logits_processor=processors,
                    stopping_criteria=StoppingCriteriaList([_CancelCriteria(stream.cancelled)]),
                    streamer=_StreamStreamer(stream),
                )
        except Exception as exc:  # the consumer re-raises it on the event loop
            log.exception("generation failed")
            error = exc
        finally:
            with self._lock:
                self._running.discard(stream)
            try:
                stream.end_threadsafe(error)
            except RuntimeError:  # the event loop is already closed: nobody is listening
                pass

    def cancel_all(self) -> None:
        """Ask every running generation to stop before its next token."""
        with self._lock:
            running = list(self._running)
        for stream in running:
            stream.cancelled.set()

    def fail_all(self, error: BaseException) -> None:
        """End every running generation's stream with `error` and stop it; call on the event loop."""
        with self._lock:
            running = list(self._running)
        for stream in running:
            stream.fail(error)
