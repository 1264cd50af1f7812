"""Causal language models hosted in-process with transformers: chat and raw completion."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from services.common.assetspec import AssetSpec, Generation
from services.common.errors import ContextLengthExceeded
from services.worker.models.chat_template import PromptBuilder, accepts_system_role, accepts_tools
from services.worker.models.engine import BatchingSettings, ChatEngine
from services.worker.models.engine.engine import probe_model
from services.worker.models.generation import Sampling
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
)

log = logging.getLogger(__name__)

_SANE_MAX_LENGTH = 10_000_000

_PROBED: set[tuple[str, str, str]] = set()
"""Model folders (with their device and config) that passed the chat engine's probe in this
process. The probe checks what the model's code does with the engine's inputs, which loading the
same files again cannot change: a model woken after sleeping skips it (failures are not
remembered, so a model that failed it is probed again at its next load)."""


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

    Every request goes through the model's `ChatEngine` (batched decode steps). If the engine
    dies, the model fails as a whole: every request it runs ends with `ModelNotReady`
    (see `HostedModel.on_failure`).
    """

    def __init__(
        self,
        asset_id: str,
        model: Any,
        tokenizer: Any,
        capabilities: Capabilities,
        engine: ChatEngine,
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
        self._engine = engine
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

        The chat engine's probe runs at the first load of the folder in this process (see
        `_PROBED`). `batching=None` uses the engine's default sizes.
        """
        config = AutoConfig.from_pretrained(folder)  # read once, for the tokenizer and the model
        tokenizer = AutoTokenizer.from_pretrained(folder, config=config)
        model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32)
        model.eval().requires_grad_(False)
        probed = (str(Path(folder).resolve()), str(model.device), config.to_json_string())
        if probed not in _PROBED:
            probe_model(model, spec.asset_id)
            _PROBED.add(probed)
        context = detect_context_length(model, tokenizer, spec)
        system_role, tools = accepts_system_role(tokenizer), accepts_tools(tokenizer)
        # The engine's thread starts with it: built last, and stopped if what follows fails.
        engine = ChatEngine(model, context, _eos_token_ids(model, tokenizer), batching, name=spec.asset_id,
                            probe=False)
        try:
            capabilities = Capabilities(
                context_length=context,
                supports_system_role=system_role,
                supports_tools=tools,
                parameter_count=sum(p.numel() for p in model.parameters()),
                memory_bytes=module_bytes(model) + engine.cache_bytes,
                streaming=True,
            )
            hosted = cls(spec.asset_id, model, tokenizer, capabilities, engine)
            hosted.apply_defaults(spec.generation)
        except BaseException:
            engine.stop()
            raise
        return hosted

    def on_failure(self, callback: FailureCallback) -> None:
        """Call `callback(reason)` on the event loop once the chat engine dies; call on the loop."""
        super().on_failure(callback)
        self._watch_engine()

    def _watch_engine(self) -> None:
        # On the loop (the engine reports there); at the first request if no holder asked.
        if not self._engine_watched:
            self._engine_watched = True
            self._engine.watch(self._engine_failed)

    def _engine_failed(self, reason: str) -> None:
        # The engine ended its own streams.
        self._mark_failed(reason)

    def crash_engine(self, reason: str = "crash injected by a test") -> None:
        """Test hook: make the chat engine's thread raise at its next turn (see
        `ChatEngine.crash`). Used by end-to-end tests in-process; never in serving."""
        self._engine.crash(reason)

    @property
    def active_streams(self) -> int:
        """Requests the engine still holds."""
        return self._engine.active_streams

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
        self._watch_engine()
        self._engine.check()  # a death not reported yet is found here, and fails the model
        self.check_serving()  # it may have failed while the prompt was built
        stream = self._engine.submit(prompt_ids, sampling, max_new)
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
            yield ChatDelta(tail, finish_reason=finish, usage=usage, phases=stream.phases)
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
        """Stop the engine (its running requests fail) and drop the weights."""
        await self._engine.close()
        self._model = None
        gc.collect()


def _eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    for value in (model.generation_config.eos_token_id, tokenizer.eos_token_id):
        for token_id in value if isinstance(value, list) else [value]:
            if token_id is not None and token_id not in ids:
                ids.append(int(token_id))
    return ids
