"""The chat engine on a tiny random-weight Llama (no gRPC): batching changes nothing a user sees.

Every sequence of a batch gets the tokens it gets alone (greedy, and seeded sampling), whatever
joins or leaves around it; cancelled sequences free their place; limits and EOS are honoured.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch
from polling import wait_until
from tiny_models import build_tiny_llama
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from services.common.errors import InvalidArgument, ModelNotReady
from services.worker.models.engine import BatchingSettings, ChatEngine
from services.worker.models.generation import Sampling, TokenStream

GREEDY = Sampling(temperature=0)
PROMPTS = [[5, 6, 7], list(range(10, 47)), [9], list(range(50, 62))]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = build_tiny_llama(tmp_path_factory.mktemp("engine") / "tiny")
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture
async def engine(model: Any) -> AsyncIterator[ChatEngine]:
    engine = ChatEngine(model, 4096, [], BatchingSettings(max_batch_tokens=8), name="tiny")
    yield engine
    await engine.close()


def generated(model: Any, prompt: list[int], n: int) -> list[int]:
    """What transformers' own `generate` answers, greedily, for `n` tokens."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0)  # fmt: skip
    return out[0, len(prompt) :].tolist()


async def tokens(stream: TokenStream) -> list[int]:
    return [token async for ids in stream for token in ids]


async def alone(engine: ChatEngine, prompt: list[int], n: int, sampling: Sampling = GREEDY) -> list[int]:
    return await tokens(engine.submit(prompt, sampling, n))


async def test_a_sequence_alone_answers_what_generate_answers(engine: ChatEngine, model: Any) -> None:
    # The 37-token prompt is prefilled in chunks of 8.
    for prompt in PROMPTS:
        assert await alone(engine, prompt, 24) == generated(model, prompt, 24)


async def test_a_batch_of_different_lengths_answers_what_each_answers_alone(engine: ChatEngine) -> None:
    expected = [await alone(engine, p, 24) for p in PROMPTS]
    together = await asyncio.gather(*(alone(engine, p, 24) for p in PROMPTS))
    assert list(together) == expected


async def test_sequences_that_join_a_running_batch_late_answer_as_alone(engine: ChatEngine) -> None:
    expected = [await alone(engine, p, n) for p, n in zip(PROMPTS, (60, 20, 30, 10), strict=True)]
    first = engine.submit(PROMPTS[0], GREEDY, 60)
    head = await anext(first)  # the first sequence is decoding
    late = [asyncio.create_task(alone(engine, p, n)) for p, n in zip(PROMPTS[1:], (20, 30, 10), strict=True)]
    assert [*head, *await tokens(first)] == expected[0]
    assert await asyncio.gather(*late) == expected[1:]


async def test_seeded_sampling_is_the_same_batched_and_alone(engine: ChatEngine) -> None:
    sampled = [Sampling(temperature=1.0, top_p=0.9, seed=seed) for seed in (1, 2, 3, 4)]
    expected = [await alone(engine, p, 20, s) for p, s in zip(PROMPTS, sampled, strict=True)]
    together = await asyncio.gather(*(alone(engine, p, 20, s) for p, s in zip(PROMPTS, sampled, strict=True)))
    assert list(together) == expected
    other_seed = await alone(engine, PROMPTS[0], 20, Sampling(temperature=1.0, top_p=0.9, seed=99))
    assert other_seed != expected[0]
    assert expected[0] != await alone(engine, PROMPTS[0], 20)  # sampling, not greedy


async def test_cancelling_frees_the_place_for_the_next_request(model: Any) -> None:
    engine = ChatEngine(model, 4096, [], BatchingSettings(max_requests_per_batch=1), name="tiny")
    try:
        endless = engine.submit(PROMPTS[0], GREEDY, 3000)
        await anext(endless)
        waiting = asyncio.create_task(alone(engine, PROMPTS[2], 5))  # no room until the first leaves
        endless.cancel()
        async with asyncio.timeout(60):
            assert len(await waiting) == 5
        await wait_until(lambda: engine.active_streams == 0, timeout=30)
    finally:
        await engine.close()


async def test_the_running_batch_never_outgrows_its_cache_budget(model: Any) -> None:
    # Each request ends at 10 + 29 = 39 columns: two fit in 96 tokens, three do not.
    engine = ChatEngine(model, 4096, [], BatchingSettings(cache_tokens=96), name="tiny")
    try:
        prompts = [list(range(10 * i + 1, 10 * i + 11)) for i in range(4)]
        expected = [await alone(engine, p, 30) for p in prompts]
        assert await asyncio.gather(*(alone(engine, p, 30) for p in prompts)) == expected
        assert 39 < engine.peak_cache_tokens <= engine.capacity_tokens == 96  # batched, within budget
        big = await alone(engine, list(range(1, 90)), 20)  # larger than the budget: it runs alone
        assert len(big) == 20
    finally:
        await engine.close()


class SlidingWindowLlama:
    """The tiny Llama, but its cache layers come back as sliding windows (as Mistral's can)."""

    def __init__(self, model: Any) -> None:
        self.model, self.config, self.device, self.dtype = model, model.config, model.device, model.dtype
        self.cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def forward(self, cache: Any = None, past_key_values: Any = None, **kwargs: Any) -> Any:
        cache = cache if cache is not None else past_key_values
        out = self.model(**{self.cache_kwarg: cache}, **kwargs)
        for i, layer in enumerate(cache.layers):
            if type(layer) is DynamicLayer:
                sliding = DynamicSlidingWindowLayer(sliding_window=4096)
                sliding.keys, sliding.values, sliding.is_initialized = layer.keys, layer.values, True
                cache.layers[i] = sliding
        return out

    __call__ = forward


def test_a_model_the_engine_cannot_batch_fails_when_the_engine_is_built(model: Any) -> None:
    with pytest.raises(RuntimeError, match="cannot serve model 'tiny'.*DynamicSlidingWindowLayer"):
        ChatEngine(SlidingWindowLlama(model), 4096, [], name="tiny")


async def test_max_tokens_and_end_of_sequence_are_honoured(model: Any, engine: ChatEngine) -> None:
    full = await alone(engine, PROMPTS[1], 16)
    assert len(full) == 16 and await alone(engine, PROMPTS[1], 1) == full[:1]
    stop = full[5]
    stops = ChatEngine(model, 4096, [stop], name="tiny")
    try:
        ended = await alone(stops, PROMPTS[1], 16)
        assert ended == full[: full.index(stop) + 1]  # the end-of-sequence token is the last one
    finally:
        await stops.close()


async def test_an_empty_prompt_is_refused(engine: ChatEngine) -> None:
    with pytest.raises(InvalidArgument, match="empty"):
        engine.submit([], GREEDY, 4)


async def test_a_consumer_slower_than_the_model_gets_several_tokens_at_once(engine: ChatEngine) -> None:
    stream = engine.submit(PROMPTS[0], GREEDY, 40)
    await wait_until(lambda: engine.active_streams == 0, timeout=60)  # all generated, none read yet
    messages = [ids async for ids in stream]
    assert sum(map(len, messages)) == 40 and len(messages) < 40


async def test_a_newcomer_gets_its_first_token_before_the_batch_it_joins_steps(engine: ChatEngine, model: Any) -> None:
    expected = await alone(engine, PROMPTS[0], 5)
    running = engine.submit(PROMPTS[1], GREEDY, 1000)
    await anext(running)  # decoding alone
    release = threading.Event()

    def hold_batched_steps(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        if tuple(kwargs["input_ids"].shape) == (2, 1):  # a decode step of both sequences
            release.wait(60)

    hook = model.register_forward_pre_hook(hold_batched_steps, with_kwargs=True)
    try:
        joiner = engine.submit(PROMPTS[0], GREEDY, 5)
        async with asyncio.timeout(30):
            first = await anext(joiner)  # while the engine is held in the first step of both
        release.set()
        assert [*first, *await tokens(joiner)] == expected
    finally:
        release.set()
        hook.remove()
        running.cancel()


async def test_a_crash_fails_every_stream_and_refuses_new_work(engine: ChatEngine) -> None:
    failures: asyncio.Queue[str] = asyncio.Queue()
    engine.watch(failures.put_nowait)
    streams = [engine.submit(p, GREEDY, 1000) for p in PROMPTS[:2]]  # two fit the cache budget
    for stream in streams:
        await anext(stream)
    engine.crash("boom in a test")
    for stream in streams:
        with pytest.raises(ModelNotReady, match="model 'tiny' failed on this worker .*boom in a test"):
            async with asyncio.timeout(30):
                await tokens(stream)
    assert "boom in a test" in await asyncio.wait_for(failures.get(), 30)
    with pytest.raises(ModelNotReady, match="boom in a test"):
        engine.submit(PROMPTS[0], GREEDY, 4)
    assert engine.active_streams == 0


async def test_newcomers_arriving_together_answer_what_each_answers_alone(model: Any) -> None:
    engine = ChatEngine(model, 4096, [], name="tiny")  # one prefill pass has room for all five prompts
    try:
        sampled = Sampling(temperature=1.0, top_p=0.9, seed=7)
        requests = [*((p, GREEDY) for p in PROMPTS), (PROMPTS[1], sampled)]
        expected = [await alone(engine, p, 24, s) for p, s in requests]
        assert await asyncio.gather(*(alone(engine, p, 24, s) for p, s in requests)) == expected
        assert expected[:4] == [generated(model, p, 24) for p in PROMPTS]
    finally:
        await engine.close()
