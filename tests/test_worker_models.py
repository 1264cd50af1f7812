"""The worker's chat models, on a tiny random-weight Llama built by the test (no gRPC)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from polling import wait_until
from tiny_models import NO_SYSTEM, build_tiny_llama, spec_for

from services.common.errors import (
    ContextLengthExceeded,
    FailedPrecondition,
    InvalidArgument,
    WrongInterface,
)
from services.worker.models import BatchingSettings, ChatDelta, ChatParams, Tool, load_model
from services.worker.models.causal_lm import TransformersChatModel
from services.worker.models.chat_template import PromptBuilder
from services.worker.models.streaming_text import StopMatcher

HELLO = [{"role": "user", "content": "hello w1 w2"}]


@pytest.fixture(scope="session")
async def tiny_llm(tmp_path_factory: pytest.TempPathFactory) -> TransformersChatModel:
    folder = build_tiny_llama(tmp_path_factory.mktemp("llm") / "tiny-llm")
    model = await asyncio.to_thread(load_model, spec_for("tiny-llm", "llm-runtime", folder), folder)
    yield model
    await model.close()


@pytest.fixture(scope="session")
async def no_system_llm(tmp_path_factory: pytest.TempPathFactory) -> TransformersChatModel:
    folder = build_tiny_llama(tmp_path_factory.mktemp("llm") / "no-system", NO_SYSTEM)
    model = await asyncio.to_thread(load_model, spec_for("no-system", "llm-runtime", folder), folder)
    yield model
    await model.close()


async def run(model: TransformersChatModel, **params: object) -> list[ChatDelta]:
    return [delta async for delta in model.chat(ChatParams(**params))]


def text_of(deltas: list[ChatDelta]) -> str:
    return "".join(d.text for d in deltas)




async def test_capabilities_are_detected(tiny_llm: TransformersChatModel) -> None:
    caps = tiny_llm.capabilities
    assert caps.context_length == 4096
    assert caps.supports_system_role and caps.supports_tools and caps.streaming
    assert caps.parameter_count == sum(p.numel() for p in tiny_llm._model.parameters())
    assert tiny_llm._engine is not None and tiny_llm._engine.capacity_tokens == 4096
    assert caps.memory_bytes >= caps.parameter_count * 4 + tiny_llm._engine.cache_bytes
    assert tiny_llm.interfaces == ("llm-runtime",)


async def test_requests_larger_than_the_batch_cache_generate_in_a_thread(tmp_path: Path) -> None:
    folder = build_tiny_llama(tmp_path / "small-cache")
    spec = spec_for("small-cache", "llm-runtime", folder)
    model = await asyncio.to_thread(load_model, spec, folder, chat_batching=BatchingSettings(cache_tokens=128))
    try:
        assert model._engine.capacity_tokens == 128
        deltas = await run(model, messages=HELLO, max_tokens=200, temperature=0)
        assert deltas[-1].usage.completion_tokens == 200 and deltas[-1].finish_reason == "length"
    finally:
        await model.close()


@pytest.mark.parametrize("seed", [None, 7], ids=["batched", "thread"])
async def test_streams_deltas_until_max_tokens(tiny_llm: TransformersChatModel, seed) -> None:
    deltas = await run(tiny_llm, messages=HELLO, max_tokens=8, temperature=0, seed=seed)
    # A consumer slower than the model gets several tokens per delta (the stream merges what
    # is queued), so the count of deltas is not fixed; that tokens arrive before the end is
    # checked deterministically in tests/test_engine.py.
    assert [d for d in deltas if d.text]
    assert all(d.finish_reason is None and d.usage is None for d in deltas[:-1])
    last = deltas[-1]
    assert last.finish_reason == "length"
    assert last.usage.completion_tokens == 8
    assert last.usage.prompt_tokens == tiny_llm.count_tokens(ChatParams(messages=HELLO))
    assert len(text_of(deltas).split()) == 8


async def test_greedy_is_the_same_in_both_engines(tiny_llm: TransformersChatModel) -> None:
    batched = await run(tiny_llm, messages=HELLO, max_tokens=12, temperature=0)
    threaded = await run(tiny_llm, messages=HELLO, max_tokens=12, temperature=0, seed=1)
    assert text_of(batched) == text_of(threaded)


@pytest.mark.parametrize("seed", [None, 7], ids=["batched", "thread"])
async def test_stop_sequence_ends_before_it(tiny_llm: TransformersChatModel, seed) -> None:
    full = text_of(await run(tiny_llm, messages=HELLO, max_tokens=16, temperature=0, seed=seed))
    words = full.split()
    stop = f"{words[5]} {words[6]}"
    deltas = await run(tiny_llm, messages=HELLO, max_tokens=16, temperature=0, seed=seed, stop=["zzz", stop])
    assert text_of(deltas) == full[: full.index(stop)]
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].usage.completion_tokens < 16


def test_stop_matcher_holds_back_partial_matches() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.push("abcE") == "abc"
    assert matcher.push("N") == ""
    assert matcher.push("x") == "ENx"
    assert matcher.push("yyEN") == "yy"
    assert matcher.push("Dzz") == "" and matcher.stopped
    assert matcher.flush() == ""
    tail = StopMatcher(["END"])
    assert tail.push("abEN") == "ab" and tail.flush() == "EN"


async def test_seed_makes_sampling_reproducible(tiny_llm: TransformersChatModel) -> None:
    params = {"messages": HELLO, "max_tokens": 24, "temperature": 1.5}
    first = text_of(await run(tiny_llm, **params, seed=42))
    again = text_of(await run(tiny_llm, **params, seed=42))
    other = text_of(await run(tiny_llm, **params, seed=43))
    assert first == again
    assert first != other


async def test_prompt_longer_than_context_is_rejected(tiny_llm: TransformersChatModel) -> None:
    long_prompt = " ".join(["w5"] * 4100)
    with pytest.raises(ContextLengthExceeded, match="4096"):
        await run(tiny_llm, prompt=long_prompt)
    with pytest.raises(ContextLengthExceeded, match="max_tokens"):
        await run(tiny_llm, messages=HELLO, max_tokens=5000)
    assert tiny_llm.active_streams == 0


async def test_malformed_requests_and_wrong_interface(tiny_llm: TransformersChatModel) -> None:
    with pytest.raises(InvalidArgument):
        tiny_llm.chat(ChatParams(messages=HELLO, prompt="w1"))
    with pytest.raises(InvalidArgument):
        tiny_llm.chat(ChatParams(messages=HELLO, temperature=-1))
    with pytest.raises(WrongInterface):
        await tiny_llm.embed(["w1"])


@pytest.mark.parametrize("seed", [None, 7], ids=["batched", "thread"])
async def test_cancelling_stops_generation(tiny_llm: TransformersChatModel, seed) -> None:
    stream = tiny_llm.chat(ChatParams(messages=HELLO, max_tokens=3000, temperature=0, seed=seed))
    received = 0
    async for delta in stream:
        received += 1 if delta.text else 0
        if received == 2:
            break
    await stream.aclose()
    started = time.monotonic()
    await wait_until(lambda: tiny_llm.active_streams == 0, timeout=2.0)
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("seeds", [(None, None), (1, 2)], ids=["batched", "thread"])
async def test_concurrent_streams_interleave(tiny_llm: TransformersChatModel, seeds) -> None:
    order: list[int] = []

    async def consume(index: int, seed: int | None) -> None:
        params = ChatParams(messages=HELLO, max_tokens=60, temperature=0, seed=seed)
        async for delta in tiny_llm.chat(params):
            if delta.text:
                order.append(index)

    await asyncio.gather(consume(0, seeds[0]), consume(1, seeds[1]))
    assert order.count(0) > 1 and order.count(1) > 1
    # Each stream produced text before the other one finished: they ran side by side.
    assert order.index(1) < len(order) - 1 - order[::-1].index(0)
    assert order.index(0) < len(order) - 1 - order[::-1].index(1)


async def test_generation_does_not_block_the_event_loop(tiny_llm: TransformersChatModel) -> None:
    lags: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            before = time.monotonic()
            await asyncio.sleep(0.005)
            lags.append(time.monotonic() - before)

    task = asyncio.create_task(ticker())
    await run(tiny_llm, messages=HELLO, max_tokens=200, temperature=0, seed=3)
    done.set()
    await task
    assert len(lags) > 5
    assert max(lags) < 0.25


async def test_system_prompt_is_folded_when_template_has_no_system_role(
    no_system_llm: TransformersChatModel,
) -> None:
    caps = no_system_llm.capabilities
    assert not caps.supports_system_role and caps.tool_calling == "constrained"
    messages = [{"role": "system", "content": "w7 w8"}, {"role": "user", "content": "hello"}]
    tokenizer = no_system_llm._tokenizer
    folded = tokenizer.apply_chat_template(
        [{"role": "user", "content": "w7 w8\n\nhello"}], add_generation_prompt=True, tokenize=False
    )
    expected = tokenizer(folded, add_special_tokens=False)["input_ids"]
    builder = PromptBuilder(tokenizer, supports_system_role=False, tool_calling="constrained")
    assert builder.prompt_ids(ChatParams(messages=messages)) == expected
    deltas = await run(no_system_llm, messages=messages, max_tokens=3, temperature=0)
    assert deltas[-1].usage.prompt_tokens == len(expected)
    # Without a tool slot, tools are described in the (folded) system prompt.
    with_tools = builder.prompt_ids(ChatParams(messages=messages, tools=[Tool("lookup")], tool_choice=None))
    assert len(with_tools) > len(expected)


def test_load_rejects_missing_folder(tmp_path: Path) -> None:
    spec = spec_for("gone", "llm-runtime", tmp_path / "gone")
    with pytest.raises(FailedPrecondition, match="not installed"):
        load_model(spec, tmp_path / "gone")
