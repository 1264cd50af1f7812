"""Concurrent chat streams batched into shared forward passes (transformers continuous batching).

One background thread owns a paged KV cache and steps every active request together;
requests join and leave between steps. On two CPU cores this gives several times the
aggregate tokens/s of one `generate` thread per stream (see `BatchedGeneration`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from services.worker.models.generation import Sampling, TokenStream

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
    """

    def __init__(
        self,
        model: Any,
        context_length: int,
        eos_token_ids: list[int],
        pad_token_id: int | None,
        settings: BatchingSettings | None = None,
    ) -> None:
        self.settings = settings or BatchingSettings()
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
        self._manager = model.init_continuous_batching(
            generation_config=generation, continuous_batching_config=batching
        )
        self._manager.start()
        self._streams: dict[str, TokenStream] = {}
        self._wait_until_ready(timeout_s=120)

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
        """Whether this engine can serve the request faithfully."""
        fits = prompt_tokens + max_new_tokens <= self.capacity_tokens
        return fits and sampling.seed is None and self._manager.is_running()

    def submit(self, prompt_ids: list[int], sampling: Sampling, max_new_tokens: int) -> TokenStream | None:
        """Queue a request; its tokens arrive on the returned stream. Call on the event loop.

        None when the engine refuses new requests (it is stopping): generate elsewhere.
        """
        request_id = uuid.uuid4().hex
        stream = TokenStream(asyncio.get_running_loop(), lambda: self._cancel(request_id))
        seen = 0

        def on_output(output: Any) -> None:
            nonlocal seen
            if request_id not in self._streams:
                return
            stream.put(list(output.generated_tokens[seen:]))
            seen = len(output.generated_tokens)
            if output.error is not None:
                self._streams.pop(request_id, None)
                stream.end(RuntimeError(f"generation failed: {output.error}"))
            elif output.is_finished():
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
            return None
        return stream

    def _cancel(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is None:
            return
        self._manager.cancel_request(request_id)
        router = self._manager.output_router
        with router._lock:
            router.result_handlers.pop(request_id, None)

    async def close(self) -> None:
        """Stop the background thread; requests still running fail."""
        await asyncio.to_thread(self._manager.stop, block=True, timeout=30, hard_stop=True)
        for stream in list(self._streams.values()):
            stream.end(RuntimeError("the model was unloaded"))
        self._streams.clear()
