"""Causal language models hosted in-process with transformers: chat and raw completion."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.common.assetspec import AssetSpec, Generation
from services.common.errors import ContextLengthExceeded
from services.worker.models.chat_template import PromptBuilder, accepts_system_role, accepts_tools
from services.worker.models.continuous_batching import BatchedGeneration, BatchingSettings
from services.worker.models.generation import Sampling, ThreadedGeneration
from services.worker.models.streaming_text import IncrementalDecoder, StopMatcher
from services.worker.models.types import (
    LLM,
    Capabilities,
    ChatDelta,
    ChatParams,
    FailureCallback,
    FinishReason,
    HostedModel,
    Usage,
    failed_model_error,
)

log = logging.getLogger(__name__)

_SANE_MAX_LENGTH = 10_000_000


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers, shared tensors counted once."""
    seen: dict[int, int] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def detect_context_length(model: Any, tokenizer: Any, spec: AssetSpec) -> int:
    """The model's context length: its config, else the tokenizer, else the spec's metadata."""
    config = model.config.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < _SANE_MAX_LENGTH:
        return value
    if spec.metadata.context_length:
        return spec.metadata.context_length
    log.warning("%s: context length not detected; assuming 2048", spec.asset_id)
    return 2048


class TransformersChatModel(HostedModel):
    """A causal LM and its tokenizer, streaming completions as tokens are produced.

    Requests go to continuous batching when it can serve them (no seed, fits its cache),
    else to a `generate` thread of their own. If the batching engine dies, the model fails
    as a whole: every request it runs ends with `ModelNotReady`, and none goes to the
    `generate` path instead (see `HostedModel.on_failure`).
    """

    def __init__(
        self,
        asset_id: str,
        model: Any,
        tokenizer: Any,
        capabilities: Capabilities,
        batched: BatchedGeneration | None,
    ) -> None:
        self.asset_id = asset_id
        self.capabilities = capabilities
        self.interfaces = (LLM,)
        self._model = model
        self._tokenizer = tokenizer
        self._prompts = PromptBuilder(tokenizer, capabilities.supports_system_role, capabilities.supports_tools)
        self._eos = _eos_token_ids(model, tokenizer)
        generation = model.generation_config
        self._default_temperature = 1.0
        self._default_top_p = 1.0
        self._default_max_tokens: int | None = None
        if generation.do_sample:
            self._default_temperature = generation.temperature or 1.0
            self._default_top_p = generation.top_p or 1.0
        self._threaded = ThreadedGeneration(model, self._eos, _pad_token_id(model, tokenizer))
        self._batched = batched
        self._engine_watched = False

    def apply_defaults(self, generation: Generation) -> None:
        """The asset's declared request defaults win over the model folder's."""
        if generation.temperature is not None:
            self._default_temperature = generation.temperature
        if generation.top_p is not None:
            self._default_top_p = generation.top_p
        self._default_max_tokens = generation.max_tokens

    @classmethod
    def load(cls, spec: AssetSpec, folder: Path, batching: BatchingSettings | None = None) -> TransformersChatModel:
        """Load from a Hugging Face folder and measure capabilities. Blocking: run in a thread.

        `batching=None` uses the default continuous-batching sizes; if the model cannot be
        batched, every request gets its own generation thread.
        """
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        model.eval().requires_grad_(False)
        context = detect_context_length(model, tokenizer, spec)
        batched = None
        try:
            eos, pad = _eos_token_ids(model, tokenizer), _pad_token_id(model, tokenizer)
            batched = BatchedGeneration(model, context, eos, pad, batching, name=spec.asset_id)
        except Exception:
            log.warning("%s: continuous batching unavailable", spec.asset_id, exc_info=True)
        memory = module_bytes(model) + (batched.cache_bytes if batched else 0)
        capabilities = Capabilities(
            context_length=context,
            supports_system_role=accepts_system_role(tokenizer),
            supports_tools=accepts_tools(tokenizer),
            parameter_count=sum(p.numel() for p in model.parameters()),
            memory_bytes=memory,
            streaming=True,
        )
        hosted = cls(spec.asset_id, model, tokenizer, capabilities, batched)
        hosted.apply_defaults(spec.generation)
        return hosted

    def on_failure(self, callback: FailureCallback) -> None:
        """Call `callback(reason)` on the event loop once the batching engine dies; call on the loop."""
        super().on_failure(callback)
        self._watch_engine()

    def _watch_engine(self) -> None:
        # On the loop (the engine reports there); at the first request if no holder asked.
        if self._batched is not None and not self._engine_watched:
            self._engine_watched = True
            self._batched.watch(self._engine_failed)

    def _engine_failed(self, reason: str) -> None:
        # The batching engine ended its own streams; the `generate` threads end here.
        if self.failure is not None:
            return
        self._threaded.fail_all(failed_model_error(self.asset_id, reason))
        self._mark_failed(reason)

    def crash_engine(self, reason: str = "crash injected by a test") -> None:
        """Test hook: make the batching engine's loop raise at its next turn (see
        `BatchedGeneration.crash`). Used by end-to-end tests in-process; never in serving."""
        if self._batched is None:
            raise RuntimeError(f"model '{self.asset_id}' has no batching engine to crash")
        self._batched.crash(reason)

    @property
    def active_streams(self) -> int:
        """Requests still generating, in either engine."""
        batched = self._batched.active_streams if self._batched else 0
        return batched + self._threaded.active_streams

    def count_tokens(self, params: ChatParams) -> int:
        """Prompt tokens the request would use (after the chat template)."""
        return len(self._prompts.prompt_ids(params))

    async def _chat(self, params: ChatParams) -> AsyncIterator[ChatDelta]:
        prompt_ids = await asyncio.to_thread(self._prompts.prompt_ids, params)
        max_new = self._max_new_tokens(len(prompt_ids), params.max_tokens)
        if params.max_tokens is None and self._default_max_tokens:
            max_new = min(max_new, self._default_max_tokens)
        sampling = Sampling(
            temperature=self._default_temperature if params.temperature is None else params.temperature,
            top_p=self._default_top_p if params.top_p is None else params.top_p,
            seed=params.seed,
        )
        stream = None
        batched = self._batched
        self._watch_engine()
        if batched is not None:
            batched.check()  # a death not reported yet is found here, and fails the model
        self.check_serving()  # it may have failed while the prompt was built
        if batched is not None and batched.accepts(len(prompt_ids), max_new, sampling):
            stream = batched.submit(prompt_ids, sampling, max_new)
        if stream is None:
            stream = self._threaded.submit(prompt_ids, sampling, max_new)
        decoder = IncrementalDecoder(self._tokenizer)
        stops = StopMatcher(params.stop)
        completion = 0
        finish: FinishReason = "length"
        try:
            async for token_ids in stream:
                pieces = []
                for token_id in token_ids:
                    completion += 1
                    if token_id in self._eos:
                        finish = "stop"
                        break
                    pieces.append(stops.push(decoder.push([token_id])))
                    if stops.stopped:
                        finish = "stop"
                        break
                if finish == "stop":
                    tail = "".join(pieces)
                    break
                if text := "".join(pieces):
                    yield ChatDelta(text)
            else:
                tail = ""
            tail += stops.push(decoder.flush()) + stops.flush()
            usage = Usage(prompt_tokens=len(prompt_ids), completion_tokens=completion)
            yield ChatDelta(tail, finish_reason=finish, usage=usage)
        finally:
            stream.cancel()

    def _max_new_tokens(self, prompt_tokens: int, max_tokens: int | None) -> int:
        context = self.capabilities.context_length
        if prompt_tokens >= context:
            raise ContextLengthExceeded(
                f"the prompt is {prompt_tokens} tokens long, but this model's context length "
                f"is {context} tokens; shorten the prompt"
            )
        room = context - prompt_tokens
        if max_tokens is not None and max_tokens > room:
            asked = prompt_tokens + max_tokens
            raise ContextLengthExceeded(
                f"this model's context length is {context} tokens, but {asked} were requested "
                f"({prompt_tokens} in the prompt, {max_tokens} for the completion); "
                "shorten the prompt or lower max_tokens"
            )
        return max_tokens if max_tokens is not None else room

    async def close(self) -> None:
        """Stop batching, cancel running threads and drop the weights."""
        if self._batched is not None:
            await self._batched.close()
        self._threaded.cancel_all()
        self._model = None
        gc.collect()


def _eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    for value in (model.generation_config.eos_token_id, tokenizer.eos_token_id):
        for token_id in value if isinstance(value, list) else [value]:
            if token_id is not None and token_id not in ids:
                ids.append(int(token_id))
    return ids


def _pad_token_id(model: Any, tokenizer: Any) -> int | None:
    pad = model.generation_config.pad_token_id
    return pad if pad is not None else tokenizer.pad_token_id
