"""Causal language models hosted in-process with transformers: chat and raw completion."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from services.common.assetspec import AssetSpec, Generation
from services.common.errors import ContextLengthExceeded, ModelNotReady
from services.worker.models.chat_template import PromptBuilder, accepts_system_role, tool_calling_mode
from services.worker.models.engine import BatchingSettings, ChatEngine
from services.worker.models.engine.constraint import Constraint
from services.worker.models.engine.engine import probe_model
from services.worker.models.generation import Sampling, TokenStream
from services.worker.models.streaming_text import ChoiceDecoder, TokenTexts
from services.worker.models.structured import SHARED_COMPILERS, CompilerKey, GrammarCompiler
from services.worker.models.types import (
    LLM,
    Capabilities,
    ChatDelta,
    ChatParams,
    FailureCallback,
    HostedModel,
    Usage,
)

log = logging.getLogger(__name__)

_SANE_MAX_LENGTH = 10_000_000

_SEED_MODULUS = 2**64

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
        folder: Path | None = None,
    ) -> None:
        self.asset_id = asset_id
        self.capabilities = capabilities
        self.interfaces = (LLM,)
        self._model = model
        self._tokenizer = tokenizer
        self._prompts = PromptBuilder(tokenizer, capabilities.supports_system_role, capabilities.tool_calling)
        self._eos = _eos_token_ids(model, tokenizer)
        self._texts = TokenTexts(tokenizer)
        self._grammar_key = CompilerKey(str(folder.resolve()) if folder else f"id:{id(model)}",
                                        int(model.get_output_embeddings().weight.shape[0]), tuple(self._eos))
        self._grammars: GrammarCompiler | None = None
        self._grammars_lock = threading.Lock()
        self._closed = False
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
        system_role, tools = accepts_system_role(tokenizer), tool_calling_mode(tokenizer)
        # The engine's thread starts with it: built last, and stopped if what follows fails.
        engine = ChatEngine(model, context, _eos_token_ids(model, tokenizer), batching, name=spec.asset_id,
                            probe=False, tokenizer=tokenizer)
        try:
            capabilities = Capabilities(
                context_length=context,
                supports_system_role=system_role,
                supports_tools=bool(tools),
                parameter_count=sum(p.numel() for p in model.parameters()),
                memory_bytes=module_bytes(model) + engine.cache_bytes,
                streaming=True,
                supports_structured_output=True,
                tool_calling=tools,
            )
            hosted = cls(spec.asset_id, model, tokenizer, capabilities, engine, Path(folder))
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
        """Prompt tokens the request would use (after the chat template, tool descriptions included)."""
        return len(self._prompts.prompt_ids(params))

    def grammars(self) -> GrammarCompiler:
        """The model's grammar compiler, taken at its first use (blocking: its tokenizer info
        takes a moment for a large vocabulary) from those shared by the models of its folder
        (`SHARED_COMPILERS`), and given back when the model closes."""
        with self._grammars_lock:
            if self._closed:
                raise ModelNotReady(f"model '{self.asset_id}' was unloaded from this worker; retry")
            if self._grammars is None:
                self._grammars = SHARED_COMPILERS.acquire(self._grammar_key, self._new_compiler)
            return self._grammars

    def _new_compiler(self) -> GrammarCompiler:
        return GrammarCompiler(self._tokenizer, self._grammar_key.vocab_size, list(self._grammar_key.stop_ids))

    def _give_back_grammars(self) -> None:
        with self._grammars_lock:
            self._closed = True
            if self._grammars is not None:
                self._grammars = None
                SHARED_COMPILERS.release(self._grammar_key)

    def _prepare(self, params: ChatParams) -> tuple[list[int], list[Constraint | None]]:
        """Prompt ids and one constraint per choice (None: free text). Blocking."""
        prompt_ids = self._prompts.prompt_ids(params)
        if params.response_format.type == "text" and params.effective_tool_choice == "none":
            return prompt_ids, [None] * params.n
        grammars = self.grammars()
        return prompt_ids, [grammars.constraint(params) for _ in range(params.n)]

    def _sampling(self, params: ChatParams, choice: int) -> Sampling:
        seed = None if params.seed is None else (params.seed + choice) % _SEED_MODULUS
        return Sampling(
            temperature=self._default_temperature if params.temperature is None else params.temperature,
            top_p=self._default_top_p if params.top_p is None else params.top_p,
            seed=seed,
            top_k=params.top_k,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            logit_bias=tuple(sorted(params.logit_bias.items())),
            logprobs=params.logprobs,
            top_logprobs=params.top_logprobs,
            stop=tuple(params.stop),
        )

    async def _chat(self, params: ChatParams) -> AsyncIterator[ChatDelta]:
        prompt_ids, constraints = await asyncio.to_thread(self._prepare, params)
        max_new = self._max_new_tokens(len(prompt_ids), params.max_tokens)
        if params.max_tokens is None and self._default_max_tokens:
            max_new = min(max_new, self._default_max_tokens)
        self._watch_engine()
        self._engine.check()  # a death not reported yet is found here, and fails the model
        self.check_serving()  # it may have failed while the prompt was built
        streams: list[TokenStream] = []
        try:
            for i, constraint in enumerate(constraints):
                streams.append(self._engine.submit(prompt_ids, self._sampling(params, i), max_new,
                                                   constraint=constraint))
            parse_tools = params.effective_tool_choice != "none"
            decoders = [ChoiceDecoder(self._tokenizer, self._texts, self._eos, params.stop, parse_tools)
                        for _ in streams]
            choices = [_choice(i, stream, decoder) for i, (stream, decoder) in enumerate(zip(streams, decoders,
                                                                                                strict=True))]
            finished = 0
            async for delta in choices[0] if len(choices) == 1 else _merge(choices):
                if delta.finish_reason is not None:
                    finished += 1
                    if finished == len(choices):
                        completion = sum(d.completion_tokens for d in decoders)
                        usage = Usage(prompt_tokens=len(prompt_ids), completion_tokens=completion)
                        delta = replace(delta, usage=usage, phases=streams[0].phases)
                yield delta
        finally:
            for stream in streams:
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
        """Stop the engine (its running requests fail), give back the grammar compiler and
        drop the weights."""
        await self._engine.close()
        await asyncio.to_thread(self._give_back_grammars)  # waits for a compiler being built
        self._model = None
        gc.collect()


async def _choice(index: int, stream: TokenStream, decoder: ChoiceDecoder) -> AsyncIterator[ChatDelta]:
    """One choice's deltas; its last has the finish reason (and the stop sequence that ended it)."""
    async for token_ids in stream:
        piece = decoder.push(token_ids, stream.take_logprobs())
        if decoder.ended:
            break
        if piece:
            yield ChatDelta(piece.text, index=index, tool_calls=tuple(piece.tool_calls), logprobs=tuple(piece.logprobs))
    else:
        piece = None
    stream.cancel()  # a stop sequence found here may come before the engine's
    tail, reason, stop = decoder.finish(stream.finish_reason, stream.stop_sequence)
    if piece is not None:
        tail.text = piece.text + tail.text
        tail.tool_calls = piece.tool_calls + tail.tool_calls
        tail.logprobs = piece.logprobs + tail.logprobs
    yield ChatDelta(tail.text, finish_reason=reason, index=index, tool_calls=tuple(tail.tool_calls),
                    logprobs=tuple(tail.logprobs), stop_sequence=stop)


async def _merge(choices: list[AsyncIterator[ChatDelta]]) -> AsyncIterator[ChatDelta]:
    """The deltas of several choices as they come (each choice's in its order)."""
    queue: asyncio.Queue[ChatDelta | BaseException | None] = asyncio.Queue()

    async def pump(choice: AsyncIterator[ChatDelta]) -> None:
        try:
            async for delta in choice:
                queue.put_nowait(delta)
        except Exception as exc:  # handed to the consumer, which raises it
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(None)

    tasks = [asyncio.create_task(pump(choice)) for choice in choices]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    for value in (model.generation_config.eos_token_id, tokenizer.eos_token_id):
        for token_id in value if isinstance(value, list) else [value]:
            if token_id is not None and token_id not in ids:
                ids.append(int(token_id))
    return ids
