"""Concurrent chat streams batched into shared forward passes (transformers continuous batching).

One background thread owns a paged KV cache and steps every active request together;
requests join and leave between steps. On two CPU cores this gives several times the
aggregate tokens/s of one `generate` thread per stream (see `BatchedGeneration`).

The engine can die (an exception in a step ends its thread). A watcher thread joins the
generation thread, so a death is seen when it happens, with nothing polled: the engine is
then marked failed, its streams end with `ModelNotReady`, it refuses new requests, and its
owner is told (see `BatchedGeneration.watch`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from services.common.errors import ModelNotReady
from services.worker.models.generation import Sampling, TokenStream
from services.worker.models.types import failed_model_error

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchingSettings:
    """Sizing of the continuous-batching engine."""

    cache_tokens: int | None = None
    """KV-cache capacity shared by all in-flight requests, in tokens. Default: the model's
    context length (so one request may use all of it), within `max_cache_bytes`."""
    max_cache_bytes: int = 512 * 1024 * 1024
    """Upper bound of the default cache size. Requests that do not fit generate in a thread."""
    page_size: int = 64
    """Tokens per cache page."""
    max_batch_tokens: int = 512
    """Tokens per forward pass (long prompts are prefilled in chunks of this size)."""
    max_requests_per_batch: int = 16
    """Requests stepped together."""


def kv_bytes_per_token(model: Any) -> int:
    """Bytes of keys and values one token takes in the cache, from the model's shape."""
    config = model.config.get_text_config()
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * model.dtype.itemsize


class BatchedGeneration:
    """Streams requests through one `ContinuousBatchingManager`.

    Temperature, top-p and greedy decoding (top-k 1) are per request. Sampling draws from
    one RNG shared by the batch, so seeded requests must go elsewhere (see `accepts`).

    Once its generation loop dies (other than by `close`), `failure` says why, every stream
    it was serving has ended with `ModelNotReady`, and `submit` refuses with that error.
    """

    def __init__(
        self,
        model: Any,
        context_length: int,
        eos_token_ids: list[int],
        pad_token_id: int | None,
        settings: BatchingSettings | None = None,
        *,
        name: str = "model",
    ) -> None:
        self.settings = settings or BatchingSettings()
        self.name = name
        """Who the engine serves (the asset id), for messages."""
        self.failure: str | None = None
        """Why the engine failed; None while it serves."""
        self._vocab = int(model.config.get_text_config().vocab_size)
        self._eos = eos_token_ids or [-1]
        tokens = self.settings.cache_tokens
        if tokens is None:
            tokens = min(context_length, self.settings.max_cache_bytes // kv_bytes_per_token(model))
        num_blocks = max(1, math.ceil(tokens / self.settings.page_size))
        self.capacity_tokens = num_blocks * self.settings.page_size
        self.cache_bytes = self.capacity_tokens * kv_bytes_per_token(model)
        # Processors are only built for values that differ from the defaults at creation;
        # every request then passes its own temperature, top_k and top_p.
        generation = GenerationConfig(
            do_sample=True, temperature=0.7, top_k=self._vocab, top_p=0.999,
            eos_token_id=self._eos, pad_token_id=pad_token_id if pad_token_id is not None else 0,
            max_new_tokens=256,
        )  # fmt: skip
        batching = ContinuousBatchingConfig(
            page_size=self.settings.page_size,
            num_blocks=num_blocks,
            max_batch_tokens=self.settings.max_batch_tokens,
            max_requests_per_batch=self.settings.max_requests_per_batch,
            allow_block_sharing=False,
            use_cuda_graph=False,
            use_async_batching=False,
            per_request_processors=True,
            q_padding_interval_size=1,
            kv_padding_interval_size=self.settings.page_size,
        )
        self._streams: dict[str, TokenStream] = {}
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_failure: Callable[[str], None] | None = None
        self._unreported: str | None = None
        self._manager = model.init_continuous_batching(
            generation_config=generation, continuous_batching_config=batching
        )
        self._manager.start()
        self._wait_until_ready(timeout_s=120)
        generation_thread = self._manager._generation_thread
        threading.Thread(target=self._watch, args=(generation_thread,), name=f"batching-watch-{name}",
                         daemon=True).start()

    def _wait_until_ready(self, timeout_s: float) -> None:
        # The background thread allocates the cache; a model it cannot batch fails there.
        deadline = time.monotonic() + timeout_s
        while self._manager.batch_processor is None:
            if not self._manager.is_running() or time.monotonic() > deadline:
                self._manager.stop(block=True, timeout=10, hard_stop=True)
                raise RuntimeError("continuous batching did not start")
            time.sleep(0.01)

    @property
    def active_streams(self) -> int:
        """Requests the engine holds: generating, waiting, or cancelled but not yet dropped."""
        scheduler = getattr(self._manager.batch_processor, "scheduler", None)
        held = len(scheduler.active_requests) + len(scheduler.waiting_requests) if scheduler else 0
        return max(held, len(self._streams))

    def accepts(self, prompt_tokens: int, max_new_tokens: int, sampling: Sampling) -> bool:
        """Whether this engine can serve the request faithfully (whether it is alive is `check`'s
        business: a request it cannot serve because it died must not go elsewhere silently)."""
        fits = prompt_tokens + max_new_tokens <= self.capacity_tokens
        return fits and sampling.seed is None

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

        An engine whose loop died unseen (no watcher report yet) is marked failed here.
        """
        if self.failure is None and not self._closing.is_set() and not self._manager.is_running():
            self._fail(self._death_reason())
        if self.failure is not None:
            raise failed_model_error(self.name, self.failure)

    def submit(self, prompt_ids: list[int], sampling: Sampling, max_new_tokens: int) -> TokenStream | None:
        """Queue a request; its tokens arrive on the returned stream. Call on the event loop.

        None when the engine refuses new requests because it is being closed: generate
        elsewhere. Raises `ModelNotReady` when it failed.
        """
        self.check()
        with self._lock:
            self._loop = self._loop or asyncio.get_running_loop()
        request_id = uuid.uuid4().hex
        stream = TokenStream(asyncio.get_running_loop(), lambda: self._cancel(request_id))
        seen = 0

        def on_output(output: Any) -> None:
            nonlocal seen
            if request_id not in self._streams:
                return
            if output.error is not None:
                self._failed_request(request_id, str(output.error))
                return
            stream.put(list(output.generated_tokens[seen:]))
            seen = len(output.generated_tokens)
            if output.is_finished():
                self._streams.pop(request_id, None)
                stream.end()

        if sampling.greedy:
            knobs = {"temperature": 1.0, "top_k": 1, "top_p": 1.0}
        else:
            knobs = {
                "temperature": sampling.temperature,
                "top_k": self._vocab,
                "top_p": sampling.top_p,
            }
        self._streams[request_id] = stream
        self._manager.register_result_handler(request_id, on_output)
        admitted = self._manager.add_request(
            list(prompt_ids),
            request_id=request_id,
            max_new_tokens=max_new_tokens,
            streaming=True,
            eos_token_id=self._eos,
            **knobs,
        )
        if admitted is None:
            self._cancel(request_id)
            self.check()  # refused because it died, rather than because it is closing
            return None
        return stream

    def _failed_request(self, request_id: str, error: str) -> None:
        """A request ended with an error: the engine died, or it refused that one request."""
        if self._closing.is_set():
            return  # `close` ends the streams
        if self._manager.background_thread_status.can_accept_new_requests() is not None:
            # A dying loop requests its own stop before failing what it holds.
            self._fail(_crashed(error))
            return
        stream = self._streams.pop(request_id)
        self._forget(request_id)
        log.error("%s: the batching engine failed a request: %s", self.name, error)
        stream.end(RuntimeError(f"generation failed: {error}"))

    def _fail(self, reason: str) -> None:
        """Mark the engine failed, end its streams and tell the owner; call on the event loop."""
        if self.failure is not None or self._closing.is_set():
            return
        self.failure = reason
        log.error("%s: %s; its requests fail and it takes no more", self.name, reason)
        error = failed_model_error(self.name, reason)
        streams, self._streams = self._streams, {}
        for request_id, stream in streams.items():
            self._forget(request_id)
            stream.end(error)
        if self._on_failure is not None:
            self._on_failure(reason)

    def _watch(self, generation_thread: threading.Thread) -> None:
        """Watcher thread: wait for the generation loop to end; unless closed, report it."""
        generation_thread.join()
        if self._closing.is_set():
            return
        reason = self._death_reason()
        with self._lock:
            loop = self._loop
            if loop is None:  # nobody has watched or submitted yet: reported to the first who does
                self._unreported = reason
                return
        try:
            loop.call_soon_threadsafe(self._fail, reason)
        except RuntimeError:  # the event loop is closed: nobody is left to tell
            pass

    def _death_reason(self) -> str:
        error = self._manager.background_thread_status.fatal_error
        if error is None:
            return "the continuous-batching engine stopped unexpectedly"
        return _crashed(str(error) or type(error).__name__)

    def crash(self, reason: str = "crash injected by a test") -> None:
        """Test hook: make the engine's generation loop raise `RuntimeError(reason)` at its next
        turn, as a broken engine would. Used by end-to-end tests in-process; never in serving."""
        manager = self._manager

        def failing_turn(*args: Any, **kwargs: Any) -> bool:
            raise RuntimeError(reason)

        manager._generation_loop_body = failing_turn
        manager._wake_up_loop.set()

    def _cancel(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is None:
            return
        self._manager.cancel_request(request_id)
        self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        router = self._manager.output_router
        with router._lock:
            router.result_handlers.pop(request_id, None)

    async def close(self) -> None:
        """Stop the background thread; requests still running fail. Idempotent."""
        if self._closing.is_set():
            return
        self._closing.set()
        await asyncio.to_thread(self._manager.stop, block=True, timeout=30, hard_stop=True)
        for stream in list(self._streams.values()):
            stream.end(ModelNotReady(f"model '{self.name}' was unloaded while serving this request; retry"))
        self._streams.clear()


def _crashed(detail: str) -> str:
    return f"its continuous-batching engine crashed: {detail}"
