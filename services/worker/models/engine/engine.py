"""The chat engine: one thread steps every running sequence through one batched forward pass.

Each turn the thread drops cancelled sequences, prefills one chunk of the next newcomer
(which joins the batch once its prompt is in and its first token drawn), then decodes one
token for every running sequence together; finished sequences leave between turns. Each draw
applies the rows' own logits processing (logit bias, penalties, a constraint's mask) and reports
log probabilities to the rows that ask (`logits.draw`); a row ends at EOS, at its max_new, at the
token that completes one of its stop sequences, or when its constraint allows no token.

The engine can die (an exception in a turn). Its thread then marks it failed before it
ends: every stream it was serving ends with `ModelNotReady`, it refuses new requests, and
its owner is told (see `ChatEngine.watch`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from services.common.errors import InvalidArgument, ModelNotReady, Overloaded
from services.common.tracing import current_request_id, request_id_scope
from services.worker.models.engine.constraint import Constraint
from services.worker.models.engine.kv_cache import kv_bytes_per_token
from services.worker.models.engine.logits import Draw, draw
from services.worker.models.engine.outbox import BoundedTokenStream, Outbox
from services.worker.models.engine.probe import cache_argument, probe_model, vocab_size
from services.worker.models.engine.sampling import SamplingRow, SamplingRows
from services.worker.models.engine.scheduler import Batch, Scheduler, Sequence
from services.worker.models.engine.stops import StopWatch
from services.worker.models.generation import Sampling, TokenStream
from services.worker.models.types import failed_model_error

log = logging.getLogger(__name__)

__all__ = ["BatchingSettings", "ChatEngine", "probe_model"]


@dataclass(frozen=True)
class BatchingSettings:
    """Sizing of the chat engine."""

    cache_tokens: int | None = None
    """KV-cache budget of the running batch, in padded tokens (rows x longest row). Default:
    the model's context length, within `max_cache_bytes`. A request larger than the budget
    runs when the batch is empty."""
    max_cache_bytes: int = 512 * 1024 * 1024
    """Upper bound of the default budget."""
    max_batch_tokens: int = 1024
    """Prompt tokens per prefill pass (longer prompts are prefilled in chunks)."""
    max_requests_per_batch: int = 16
    """Sequences decoded together."""
    max_waiting: int = 256
    """Requests waiting to join the batch; one more is refused at once with `Overloaded` (429).
    The worker's admission keeps fewer waiting (a model's `max_concurrency` at most): this bound
    holds whatever calls the engine directly."""
    max_unread_tokens: int = 1024
    """Tokens generated for a request and not read yet; a request whose client falls this far
    behind is ended with `Overloaded` (see `BoundedTokenStream`). At a client's normal pace the
    queue holds a step's worth of tokens."""


class ChatEngine:
    """Streams requests through batched decode steps on the model's device.

    Every sampling knob is per request (`Sampling`); a seeded request gets the same random
    draws alone or in any batch (its logits may differ by reduction order on a GPU or in bf16).
    Once the engine's thread dies (other than by `close`), `failure` says why, every stream it
    served has ended with `ModelNotReady`, and `submit` refuses with that error.
    """

    def __init__(
        self,
        model: Any,
        context_length: int,
        eos_token_ids: list[int],
        settings: BatchingSettings | None = None,
        *,
        name: str = "model",
        probe: bool = True,
        tokenizer: Any = None,
    ) -> None:
        """Start serving `model`; first `probe_model` checks that it can (`RuntimeError` if not).

        `probe=False` skips that check, for a caller that probes models itself (the worker's
        load probes each model folder once per process). Nothing else is prepared here: the KV
        cache grows with the requests that run. `tokenizer` (the model's) decodes recent tokens
        for stop sequences; without it, requests with stop sequences are refused.
        """
        self.settings = settings or BatchingSettings()
        self.name = name
        """Who the engine serves (the asset id), for messages."""
        self.failure: str | None = None
        """Why the engine failed; None while it serves."""
        tokens = self.settings.cache_tokens
        if tokens is None:
            tokens = min(context_length, self.settings.max_cache_bytes // kv_bytes_per_token(model))
        self.capacity_tokens = max(1, tokens)
        self.cache_bytes = self.capacity_tokens * kv_bytes_per_token(model)
        self.peak_cache_tokens = 0
        """The largest padded cache (rows x columns) the running batch has held, for tests and metrics."""
        self._model = model
        self._device = model.device
        self._cache_kwarg = cache_argument(model)
        self._vocab = vocab_size(model)
        self._tokenizer = tokenizer
        self._eos = torch.tensor(eos_token_ids or [-1], dtype=torch.long, device=self._device)
        self._eos_ids = set(eos_token_ids)
        self._scheduler = Scheduler(
            self.capacity_tokens, self.settings.max_requests_per_batch, self.settings.max_batch_tokens
        )
        self._batch = Batch(self._device)
        self._outbox = Outbox()
        self._streams: dict[str, TokenStream] = {}
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_failure: Callable[[str], None] | None = None
        self._unreported: str | None = None
        self._death: str | None = None
        if probe:
            probe_model(model, name)
        self._thread = threading.Thread(target=self._run, name=f"chat-engine-{name}", daemon=True)
        self._thread.start()

    @property
    def active_streams(self) -> int:
        """Requests the engine holds: running, waiting, or cancelled but not yet dropped."""
        return max(self._batch.rows + self._scheduler.queued, len(self._streams))

    def watch(self, on_failure: Callable[[str], None]) -> None:
        """Call `on_failure(reason)` on this event loop once the engine fails; call on the loop.

        If it failed already, the call comes at once (on the loop's next turn).
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            self._loop, self._on_failure = loop, on_failure
            unreported, self._unreported = self._unreported, None
        if self.failure is not None:
            loop.call_soon(on_failure, self.failure)
        elif unreported is not None:
            loop.call_soon(self._fail, unreported)

    def check(self) -> None:
        """Raise `ModelNotReady` if the engine failed; call on the event loop.

        An engine whose thread died unseen (no report yet) is marked failed here.
        """
        if self.failure is None and not self._closing.is_set() and not self._thread.is_alive():
            self._fail(self._death or _crashed("its thread stopped unexpectedly"))
        if self.failure is not None:
            raise failed_model_error(self.name, self.failure)

    def submit(self, prompt_ids: list[int], sampling: Sampling, max_new_tokens: int, *,
               constraint: Constraint | None = None) -> TokenStream:
        """Queue a request; its tokens arrive on the returned stream. Call on the event loop.

        With a `constraint`, every token follows it, and once it is finished only EOS may come.
        Raises `InvalidArgument` for an empty prompt, a logit bias on a token the model does not
        have, or stop sequences without a tokenizer; `ModelNotReady` when the engine failed or
        is closing, `Overloaded` when `max_waiting` requests wait already.
        """
        if not prompt_ids:
            raise InvalidArgument("the prompt is empty: at least one token is needed")
        if max_new_tokens < 1:
            raise InvalidArgument("max_tokens must be at least 1")
        unknown = sorted(token for token, _ in sampling.logit_bias if not 0 <= token < self._vocab)
        if unknown:
            raise InvalidArgument(f"logit_bias: token id {unknown[0]} is not in the vocabulary of model "
                                  f"'{self.name}' (ids 0 to {self._vocab - 1})")
        if any(sampling.stop) and self._tokenizer is None:
            raise InvalidArgument(f"model '{self.name}' cannot stop at stop sequences: its engine has no tokenizer")
        self.check()
        if self._closing.is_set():
            raise ModelNotReady(f"model '{self.name}' is being unloaded; retry")
        if self._scheduler.waiting >= self.settings.max_waiting:
            raise Overloaded(f"model '{self.name}': the chat engine's queue is full ("
                             f"{self.settings.max_waiting} requests waiting, its bound); retry shortly")
        loop = asyncio.get_running_loop()
        with self._lock:
            self._loop = self._loop or loop
        sequence_id = uuid.uuid4().hex
        stream = BoundedTokenStream(loop, lambda: self._cancel(sequence_id),
                                    max_unread=self.settings.max_unread_tokens, name=self.name)
        with self._lock:
            self._streams[sequence_id] = stream
        stops = StopWatch(sampling.stop, self._tokenizer) if any(sampling.stop) else None
        self._scheduler.add(Sequence(sequence_id, list(prompt_ids), max_new_tokens, SamplingRow.of(sampling), stream,
                                     request_id=current_request_id(), constraint=constraint, stops=stops))
        return stream

    def crash(self, reason: str = "crash injected by a test") -> None:
        """Test hook: make the engine's thread raise `RuntimeError(reason)` at its next turn, as a
        broken engine would. Used by end-to-end tests in-process; never in serving."""
        self._scheduler.crash(reason)

    def _cancel(self, sequence_id: str) -> None:
        with self._lock:
            known = self._streams.pop(sequence_id, None) is not None
        if known:
            self._scheduler.cancel(sequence_id)

    def _run(self) -> None:
        """The engine's thread: take turns until closed; on an exception, fail everything."""
        try:
            with torch.inference_mode():
                while (turn := self._scheduler.next_turn(self._batch)) is not None:
                    self._batch.drop(turn.cancelled)
                    if turn.prefill is not None:
                        self._prefill(turn.prefill)
                    if turn.prefills:
                        self._prefill_together(turn.prefills)
                    if self._batch.rows:
                        self._decode()
                    self._outbox.flush()
        except BaseException as exc:  # noqa: B036 - whatever ends the loop must reach the owner
            requests = ", ".join(s.request_id for s in self._batch.sequences if s.request_id) or "none named"
            self._forget_all()  # before the report: a failed engine holds nothing
            if not self._closing.is_set():
                log.exception("%s: the chat engine's step failed (requests in its batch: %s)", self.name, requests)
                self._died(_crashed(str(exc) or type(exc).__name__))
        finally:
            self._forget_all()

    def _forget_all(self) -> None:
        self._scheduler.clear()
        self._batch = Batch(self._device)

    def _prefill(self, sequence: Sequence) -> None:
        """Run the next chunk of a newcomer's prompt; once it is all in, draw its first token."""
        sequence.cache = sequence.cache or DynamicCache()
        start = sequence.prefilled
        if start == 0:
            sequence.stream.phases.prefill_start_ns = time.time_ns()
        end = min(len(sequence.prompt), start + self.settings.max_batch_tokens)
        ids = torch.tensor([sequence.prompt[start:end]], dtype=torch.long, device=self._device)
        out = self._model(
            input_ids=ids,
            attention_mask=torch.ones((1, end), dtype=torch.long, device=self._device),
            position_ids=torch.arange(start, end, device=self._device)[None],
            **{self._cache_kwarg: sequence.cache}, use_cache=True, logits_to_keep=1,
        )  # fmt: skip
        sequence.prefilled = end
        if end < len(sequence.prompt):
            return
        self._scheduler.prefilled()
        rows = SamplingRows.of([sequence.sampling], self._device, self._vocab)
        constrained = [(0, sequence.constraint)] if sequence.constraint is not None else []
        drawn = draw(out.logits[:, -1], rows, torch.zeros((1,), dtype=torch.long, device=self._device),
                     constrained, self._eos)  # fmt: skip
        sequence.stream.phases.first_token_ns = time.time_ns()
        if self._hand_out([sequence], drawn)[0]:
            self._finished(sequence)
            sequence.cache = None
            return
        self._batch.join(sequence, drawn.tokens, rows)
        self._measure()

    def _prefill_together(self, sequences: list[Sequence]) -> None:
        """Prefill short prompts in one pass (left-padded, as `generate` does), draw their first
        tokens and join them to the batch together."""
        started = time.time_ns()
        for sequence in sequences:
            sequence.stream.phases.prefill_start_ns = started
        width = max(len(s.prompt) for s in sequences)
        ids = torch.tensor([[0] * (width - len(s.prompt)) + s.prompt for s in sequences], device=self._device)
        lengths = torch.tensor([len(s.prompt) for s in sequences], device=self._device)
        mask = (torch.arange(width, device=self._device)[None] >= (width - lengths)[:, None]).long()
        cache = DynamicCache()
        out = self._model(
            input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
            **{self._cache_kwarg: cache}, use_cache=True, logits_to_keep=1,
        )  # fmt: skip
        rows = SamplingRows.of([s.sampling for s in sequences], self._device, self._vocab)
        constrained = [(i, s.constraint) for i, s in enumerate(sequences) if s.constraint is not None]
        drawn = draw(out.logits[:, -1], rows, torch.zeros((len(sequences),), dtype=torch.long, device=self._device),
                     constrained, self._eos)  # fmt: skip
        now = time.time_ns()
        for sequence in sequences:
            sequence.stream.phases.first_token_ns = now
        ended = self._hand_out(sequences, drawn)
        self._batch.join_many(sequences, cache, drawn.tokens, rows)
        self._measure()
        if any(ended):
            keep = torch.ones((self._batch.rows,), dtype=torch.bool, device=self._device)
            keep[-len(sequences) :] = torch.tensor([not e for e in ended], device=self._device)
            for sequence in self._batch.keep(keep):
                self._finished(sequence)

    def _decode(self) -> None:
        """One token for every running sequence, in one forward pass."""
        batch = self._batch
        mask, positions = batch.cache.step_inputs()
        out = self._model(
            input_ids=batch.last[:, None], attention_mask=mask, position_ids=positions,
            **{self._cache_kwarg: batch.cache.cache}, use_cache=True, logits_to_keep=1,
        )  # fmt: skip
        batch.cache.advance(mask)
        self._measure()
        assert batch.sampling is not None
        drawn = draw(out.logits[:, -1], batch.sampling, batch.generated, batch.constrained, self._eos)
        batch.last = drawn.tokens
        batch.generated = batch.generated + 1
        ended = self._hand_out(batch.sequences, drawn)
        if any(ended):
            for sequence in batch.keep(torch.tensor([not e for e in ended], device=self._device)):
                self._finished(sequence)

    def _hand_out(self, sequences: list[Sequence], drawn: Draw) -> list[bool]:
        """Queue each row's drawn token (and log probability) for its stream; say which rows end
        with it, and record why on their streams."""
        ended = []
        for row, sequence in enumerate(sequences):
            if row in drawn.dead:  # its constraint allowed nothing (or failed): it ends without a token
                if (failure := drawn.failed.get(row)) is not None:
                    with request_id_scope(sequence.request_id):
                        log.error("%s: a request's decoding constraint failed; the request ends with it",
                                  self.name, exc_info=failure)
                    sequence.failure = failure
                else:
                    sequence.stream.finish_reason = "stop"
                ended.append(True)
                continue
            token = drawn.ids[row]
            sequence.generated += 1
            self._outbox.put(sequence.stream, token, drawn.logprobs[row] if drawn.logprobs is not None else None)
            reason = None
            if token in self._eos_ids:
                reason = "stop"
            elif sequence.stops is not None and (stop := sequence.stops.push(token)):
                sequence.stream.stop_sequence, reason = stop, "stop"
            elif sequence.generated >= sequence.max_new:
                reason = "length"
            if reason is not None:
                sequence.stream.finish_reason = reason
            ended.append(reason is not None)
        return ended

    def _measure(self) -> None:
        cache = self._batch.cache
        self.peak_cache_tokens = max(self.peak_cache_tokens, cache.rows * cache.columns)

    def _finished(self, sequence: Sequence) -> None:
        phases = sequence.stream.phases
        phases.end_ns = time.time_ns()
        with self._lock:
            self._streams.pop(sequence.id, None)
        self._outbox.end(sequence.stream, sequence.failure)
        if log.isEnabledFor(logging.DEBUG):
            with request_id_scope(sequence.request_id):
                log.debug("%s: generation done, %.1f ms to the first token after the prefill began, "
                          "%.1f ms decoding", self.name, (phases.first_token_ns - phases.prefill_start_ns) / 1e6,
                          (phases.end_ns - phases.first_token_ns) / 1e6)

    def _died(self, reason: str) -> None:
        """Engine thread: report the death to the watcher's loop (or to whoever comes first)."""
        self._death = reason
        with self._lock:
            loop = self._loop
            if loop is None:
                self._unreported = reason
                return
        try:
            loop.call_soon_threadsafe(self._fail, reason)
        except RuntimeError:  # the event loop is closed: nobody is left to tell
            pass

    def _fail(self, reason: str) -> None:
        """Mark the engine failed, end its streams and tell the owner; call on the event loop."""
        if self.failure is not None or self._closing.is_set():
            return
        self.failure = reason
        log.error("%s: %s; its requests fail and it takes no more", self.name, reason)
        error = failed_model_error(self.name, reason)
        with self._lock:
            streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.fail(error)
        if self._on_failure is not None:
            self._on_failure(reason)

    async def close(self) -> None:
        """Stop the thread; requests still running fail. Idempotent."""
        if self._closing.is_set():
            return
        await asyncio.to_thread(self.stop)
        with self._lock:
            streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.fail(ModelNotReady(f"model '{self.name}' was unloaded while serving this request; retry"))


    def stop(self) -> None:
        """Stop the thread and drop the model, blocking (up to 30 s for a step in progress).

        `close` is the way on the event loop; this one is for an owner without one (a load that
        failed after the engine was built). Streams are not ended here.
        """
        self._closing.set()
        self._scheduler.stop()
        self._thread.join(30)
        if self._thread.is_alive():
            log.error("%s: the chat engine's thread is still running 30 s after it was told to stop", self.name)
        # Nothing here keeps the weights or the caches alive, even if the thread is stuck in a step.
        self._model = None
        self._batch = Batch(self._device)
        self._scheduler.clear()


def _crashed(detail: str) -> str:
    return f"its chat engine crashed: {detail}"
