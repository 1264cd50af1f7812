"""Every OpenAI parameter the router documents either changes the answer or is a 400 naming it.

The official `openai` client against an in-process stack (registry, worker, jobs, router; real
Postgres and NATS) with the tiny random-weight chat model: sampling parameters (logit_bias,
penalties, seed, n, stop, logprobs) on the tiny model, whose word tokenizer makes token ids
easy to name. Structured outputs and tool calls need a tokenizer that can spell JSON and
`<tool_call>`: they run on the real catalog chat model (marked `catalog`).

`test_every_documented_parameter_has_a_check` walks the published OpenAPI document: a request
property without an entry in `CHECKS` (the test that shows its effect, or its 400) fails it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import jsonschema
import openai
import pytest
from openai.types.chat import (
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionMessageParam,
    ChatCompletionToolParam,
)
from polling import wait_until
from stack_harness import TINY_CHAT, Stack, running_stack, tiny_documents
from tiny_models import word_tokenizer

from roundhouse.v1 import inference_pb2, registry_pb2
from services.common.documents import load_path
from services.common.route_proto import declared_to_proto

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
TOKENIZER = word_tokenizer()
CACHED_ROUTE = "params-cached"
REMOTE_CHAT, REMOTE_KEY_ENV = "params-remote", "OPENAI_API_KEY"
CATALOG_CHAT = "smollm2-135m-instruct"
WEATHER: ChatCompletionToolParam = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME: ChatCompletionToolParam = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
PERSON: dict[str, Any] = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "languages": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3}},
    "required": ["name", "age", "languages"], "additionalProperties": False}


def token_id(word: str) -> int:
    """The tiny tokenizer's id of `word`."""
    token = TOKENIZER.convert_tokens_to_ids(word)
    assert isinstance(token, int)
    return token


@pytest.fixture(scope="module")
async def stack(
    db_dsn: str, nats_url: str, sources: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    """The tiny models, a cached route to the chat model, and a remote (`runtime: openai`) asset
    whose upstream is this stack's own OpenAI API, serving the tiny chat model."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv(REMOTE_KEY_ENV, "unused")  # read by the worker and the router
        async with running_stack(db_dsn, nats_url, sources, tmp_path_factory.mktemp("store")) as running:
            await running.apply(*tiny_documents(sources), {
                "asset_id": CACHED_ROUTE, "class": "route", "interface": "llm-runtime",
                "targets": [{"asset": TINY_CHAT}], "cache": {"ttl_s": 600}})
            await running.apply({
                "asset_id": REMOTE_CHAT, "interface": "llm-runtime", "runtime": "openai",
                "source": {"kind": "url", "url": f"{running.http_url}/v1", "api_key_env": REMOTE_KEY_ENV,
                           "upstream_model": TINY_CHAT}})
            yield running


async def greedy(client: openai.AsyncOpenAI, max_tokens: int = 8, **extra: Any) -> str:
    """The tiny model's greedy answer to `hello`."""
    reply = await client.chat.completions.create(
        model=TINY_CHAT, messages=HELLO, max_tokens=max_tokens, temperature=0, **extra)
    return reply.choices[0].message.content or ""


# --- sampling ---------------------------------------------------------------------------


async def test_logit_bias_bans_and_forces_tokens(client: openai.AsyncOpenAI) -> None:
    plain = (await greedy(client)).split()
    banned = await greedy(client, logit_bias={str(token_id(plain[0])): -100})
    assert plain[0] not in banned.split()
    forced = await greedy(client, logit_bias={str(token_id("w7")): 100})
    assert forced.split() == ["w7"] * 8
    completion = await client.completions.create(
        model=TINY_CHAT, prompt="hello", max_tokens=4, temperature=0, logit_bias={str(token_id("w9")): 100})
    assert completion.choices[0].text.split() == ["w9"] * 4


async def test_logit_bias_beyond_the_vocabulary_is_400(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await greedy(client, logit_bias={str(len(TOKENIZER) + 5): 5})
    body: Any = refused.value.body
    assert (body["param"] or "").startswith("logit_bias")


async def test_penalties_change_a_greedy_answer(client: openai.AsyncOpenAI) -> None:
    # The tiny model's greedy answer ends in a loop of two words; its next word wins by less
    # than 2 logits from about the 25th word on.
    plain = await greedy(client, max_tokens=40)
    assert len(set(plain.split())) < 30, "the greedy answer repeats itself"
    presence = await greedy(client, max_tokens=40, presence_penalty=2)
    frequency = await greedy(client, max_tokens=40, frequency_penalty=2)
    assert len(set(presence.split())) > len(set(plain.split()))
    assert len(set(frequency.split())) > len(set(plain.split()))
    rewarded = await greedy(client, max_tokens=40, presence_penalty=-2)
    assert len(set(rewarded.split())) <= len(set(plain.split()))


async def test_seed_reproduces_a_sampled_answer_alone_and_batched(client: openai.AsyncOpenAI) -> None:
    async def sampled(seed: int) -> str:
        reply = await client.chat.completions.create(
            model=TINY_CHAT, messages=HELLO, max_tokens=12, temperature=1.5, seed=seed)
        return reply.choices[0].message.content or ""

    alone = await sampled(42)
    together = await asyncio.gather(sampled(42), sampled(43), sampled(42))
    assert together[0] == together[2] == alone
    assert {await sampled(s) for s in range(44, 48)} != {alone}, "other seeds draw other answers"


async def test_n_choices_in_index_order_with_usage_of_all(
    stack: Stack, client: openai.AsyncOpenAI, db_dsn: str
) -> None:
    one = await client.chat.completions.create(model=TINY_CHAT, messages=HELLO, max_tokens=5, temperature=0)
    raw = await client.chat.completions.with_raw_response.create(
        model=TINY_CHAT, messages=HELLO, max_tokens=5, temperature=1.5, seed=3, n=3)
    reply = raw.parse()
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" and c.message.content for c in reply.choices)
    assert len({c.message.content for c in reply.choices}) > 1, "choices are sampled on their own"
    assert reply.usage is not None and one.usage is not None
    assert reply.usage.prompt_tokens == one.usage.prompt_tokens
    assert reply.usage.completion_tokens == 15
    again = await client.chat.completions.create(
        model=TINY_CHAT, messages=HELLO, max_tokens=5, temperature=1.5, seed=3, n=3)
    assert [c.message.content for c in again.choices] == [c.message.content for c in reply.choices]
    request_id = raw.headers["x-request-id"]

    async def ledger() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(db_dsn)
        try:
            return await conn.fetch("SELECT * FROM usage_records WHERE request_id = $1", request_id)
        finally:
            await conn.close()

    await wait_until(ledger, timeout=15)
    [row] = await ledger()
    assert row["completion_tokens"] == 15


async def test_n_choices_stream_each_with_its_finish_then_usage(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=TINY_CHAT, messages=HELLO, max_tokens=4, temperature=0, n=2, stream=True,
        stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    texts: dict[int, str] = {0: "", 1: ""}
    finishes = []
    for chunk in chunks[:-1]:
        [choice] = chunk.choices
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finishes.append((choice.index, choice.finish_reason))
    assert sorted(finishes) == [(0, "length"), (1, "length")]
    assert texts[0] == texts[1] == await greedy(client, max_tokens=4)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 8


async def test_completions_take_n(client: openai.AsyncOpenAI) -> None:
    reply = await client.completions.create(model=TINY_CHAT, prompt="hello", max_tokens=3, n=2,
                                            temperature=1.5, seed=9, echo=True)
    assert [c.index for c in reply.choices] == [0, 1]
    assert all(c.text.startswith("hello") for c in reply.choices)
    assert reply.usage is not None and reply.usage.completion_tokens == 6


async def test_stop_ends_the_answer_before_the_sequence(client: openai.AsyncOpenAI) -> None:
    plain = (await greedy(client, max_tokens=12)).split()
    stop = plain[3]
    cut = await client.chat.completions.create(
        model=TINY_CHAT, messages=HELLO, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    text = cut.choices[0].message.content or ""
    assert stop not in text.split() and text.split() == plain[:plain.index(stop)]


async def test_logprobs_with_top_logprobs(client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(
        model=TINY_CHAT, messages=HELLO, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    [choice] = reply.choices
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert len(content) == 5 and [e.token for e in content] == (choice.message.content or "").split()
    for entry in content:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3
        ranked = [top.logprob for top in entry.top_logprobs]
        assert ranked == sorted(ranked, reverse=True)
        assert entry.top_logprobs[0].token == entry.token, "greedy picks the most likely token"
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)
    plain = await client.chat.completions.create(model=TINY_CHAT, messages=HELLO, max_tokens=2)
    assert plain.choices[0].logprobs is None
    only = await client.chat.completions.create(
        model=TINY_CHAT, messages=HELLO, max_tokens=2, logprobs=True)
    assert only.choices[0].logprobs is not None and only.choices[0].logprobs.content is not None
    assert [e.top_logprobs for e in only.choices[0].logprobs.content] == [[], []]


async def test_streamed_logprobs_ride_with_their_text(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=TINY_CHAT, messages=HELLO, max_tokens=6, temperature=0, logprobs=True, top_logprobs=1,
        stream=True)
    entries = [e async for chunk in stream for c in chunk.choices if c.logprobs and c.logprobs.content
               for e in c.logprobs.content]
    assert [e.token for e in entries] == (await greedy(client, max_tokens=6)).split()


async def test_completion_logprobs_in_the_legacy_shape(client: openai.AsyncOpenAI) -> None:
    reply = await client.completions.create(
        model=TINY_CHAT, prompt="hello", max_tokens=4, temperature=0, logprobs=2)
    [choice] = reply.choices
    assert choice.logprobs is not None
    tokens = choice.logprobs.tokens or []
    assert len(tokens) == 4 and tokens == choice.text.split()
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs or [])
    tops = choice.logprobs.top_logprobs or []
    assert all(len(top) == 2 and max(top, key=top.__getitem__) == t for top, t in zip(tops, tokens, strict=True))
    offsets = choice.logprobs.text_offset or []
    assert [choice.text[o:o + len(t)] for o, t in zip(offsets, tokens, strict=True)] == tokens


# --- the response cache and the gRPC front ---------------------------------------------------


async def test_cached_route_keys_on_the_new_parameters(client: openai.AsyncOpenAI) -> None:
    async def via_route(**extra: Any) -> tuple[str, str]:
        raw = await client.chat.completions.with_raw_response.create(
            model=CACHED_ROUTE, messages=[{"role": "user", "content": "hello w3 w4"}], max_tokens=6,
            temperature=0, **extra)
        return raw.parse().choices[0].message.content or "", raw.headers.get("x-roundhouse-cache", "")

    plain, _ = await via_route()
    await wait_until(lambda: via_route_hit(via_route), timeout=15)
    biased, outcome = await via_route(logit_bias={str(token_id("w11")): 100})
    assert outcome == "miss" and biased.split() == ["w11"] * 6
    penalized, outcome = await via_route(frequency_penalty=2)
    assert outcome == "miss"
    raw = await client.chat.completions.with_raw_response.create(
        model=CACHED_ROUTE, messages=[{"role": "user", "content": "hello w3 w4"}], max_tokens=6,
        temperature=0, n=2)
    assert raw.headers.get("x-roundhouse-cache") == "miss"
    assert [c.message.content for c in raw.parse().choices] == [plain, plain]


async def via_route_hit(via_route: Any) -> bool:
    """Whether the plain request is answered from the cache now (its answer kept)."""
    _, outcome = await via_route()
    return bool(outcome == "hit")


async def test_remote_assets_pass_the_parameters_through(client: openai.AsyncOpenAI) -> None:
    # The first request goes through the worker holding the asset, the next straight from the
    # router to the upstream (see `services.router.remote`): both carry every field.
    asked: dict[str, Any] = {"model": REMOTE_CHAT, "messages": HELLO, "max_tokens": 3, "temperature": 0, "n": 2,
                             "logprobs": True, "top_logprobs": 2, "logit_bias": {str(token_id("w7")): 100}}
    for _ in range(2):
        reply = await client.chat.completions.create(**asked)
        assert [c.message.content for c in reply.choices] == ["w7 w7 w7"] * 2
        entries = [e for c in reply.choices for e in (c.logprobs.content if c.logprobs else None) or []]
        assert len(entries) == 6 and all(len(e.top_logprobs) == 2 for e in entries)
        assert reply.usage is not None and reply.usage.completion_tokens == 6
    stream = await client.chat.completions.create(**asked, stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    texts = {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
             for i in (0, 1)}
    assert texts == {0: "w7 w7 w7", 1: "w7 w7 w7"}
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content or []]
    assert len(streamed) == 6
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


async def test_grpc_front_passes_fields_and_counts_tokens(stack: Stack, client: openai.AsyncOpenAI) -> None:
    request = inference_pb2.ChatRequest(
        model="tiny-alias", messages=[inference_pb2.ChatMessage(role="user", content="hello")],
        max_tokens=3, temperature=0, n=2, logprobs=True, top_logprobs=2, logit_bias={token_id("w5"): 100})
    chunks = [c async for c in stack.inference.Chat(request, timeout=60)]
    by_choice: dict[int, str] = {}
    for chunk in chunks:
        by_choice[chunk.index] = by_choice.get(chunk.index, "") + chunk.delta
    assert sorted(by_choice) == [0, 1] and all(t.split() == ["w5"] * 3 for t in by_choice.values())
    assert sum(len(c.logprobs) for c in chunks) == 6
    assert all(len(lp.top_logprobs) == 2 for c in chunks for lp in c.logprobs)
    counted = await stack.inference.CountTokens(request, timeout=60)
    reply = await client.chat.completions.create(model=TINY_CHAT, messages=HELLO, max_tokens=1)
    assert reply.usage is not None and counted.input_tokens == reply.usage.prompt_tokens
    assert counted.asset_id == TINY_CHAT
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stack.inference.Chat(inference_pb2.ChatRequest(
            model=TINY_CHAT, messages=request.messages, presence_penalty=3), timeout=60).read()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (refused.value.details() or "").startswith("presence_penalty")
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await stack.inference.CountTokens(inference_pb2.ChatRequest(
            model="no-such-model", messages=request.messages), timeout=60)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


# --- structured outputs and tool calls (the catalog chat model) -------------------------------


@pytest.fixture(scope="module")
async def catalog_client(
    db_dsn: str, nats_url: str, sources: Path, catalog_store: Any
) -> AsyncIterator[openai.AsyncOpenAI]:
    """The openai client of a stack serving the catalog chat model."""
    [spec] = [item.spec for item in load_path(Path(__file__).parents[1] / "deploy" / "catalog")
              if item.spec.asset_id == CATALOG_CHAT]
    async with running_stack(db_dsn, nats_url, sources, catalog_store.root) as running:
        await running.registry.stub.ApplyAssets(registry_pb2.ApplyAssetsRequest(
            assets=[registry_pb2.AssetApply(spec=declared_to_proto(spec))]))
        async with openai.AsyncOpenAI(base_url=f"{running.http_url}/v1", api_key="unused",
                                      max_retries=0, timeout=300) as api:
            yield api


def ask(text: str) -> list[ChatCompletionMessageParam]:
    """One user message."""
    return [{"role": "user", "content": text}]


@pytest.mark.catalog
async def test_json_schema_answers_validate(catalog_client: openai.AsyncOpenAI) -> None:
    reply = await catalog_client.chat.completions.create(
        model=CATALOG_CHAT, messages=ask("Describe a programmer called Ada."), max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                                "strict": True}})
    jsonschema.validate(json.loads(reply.choices[0].message.content or ""), PERSON)
    whole = await catalog_client.chat.completions.create(
        model=CATALOG_CHAT, messages=ask("Reply with a JSON object with the keys name and color for a red apple."),
        max_tokens=120, response_format={"type": "json_object"})
    assert whole.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(whole.choices[0].message.content or ""), dict)
    # Loaded now: its model object says how it calls tools (SmolLM2's template has no tool slot).
    card = (await catalog_client.models.retrieve(CATALOG_CHAT)).model_extra or {}
    assert card["tool_calling"] == "constrained" and card["structured_output"] is True


@pytest.mark.catalog
async def test_required_tool_call_parses(catalog_client: openai.AsyncOpenAI) -> None:
    reply = await catalog_client.chat.completions.create(
        model=CATALOG_CHAT, messages=ask("What is the weather in Paris?"), max_tokens=120,
        tools=[WEATHER, TIME], tool_choice="required")
    [choice] = reply.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = [c for c in choice.message.tool_calls or [] if isinstance(c, ChatCompletionMessageFunctionToolCall)]
    assert calls and len(calls) == len(choice.message.tool_calls or [])
    assert all(c.id.startswith("call_") and c.type == "function" for c in calls)
    for call in calls:
        tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), dict(tool["function"].get("parameters") or {}))


@pytest.mark.catalog
async def test_named_tool_streams_as_openai_does(catalog_client: openai.AsyncOpenAI) -> None:
    stream = await catalog_client.chat.completions.create(
        model=CATALOG_CHAT, messages=ask("Weather in Oslo, please."), max_tokens=120, stream=True,
        tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False)
    pieces = [c.choices[0] async for c in stream if c.choices]
    assert all(len(p.delta.tool_calls or []) <= 1 for p in pieces), "one piece per event"
    calls = [call for p in pieces for call in p.delta.tool_calls or []]
    first, *later = calls
    assert first.function is not None and first.function.arguments == ""
    assert first.index == 0 and first.id and first.type == "function"
    assert first.function is not None and first.function.name == "get_weather"
    assert all(c.index == 0 and c.id is None and c.function and c.function.name is None for c in later)
    arguments = "".join((c.function.arguments or "") for c in calls if c.function)
    jsonschema.validate(json.loads(arguments), dict(WEATHER["function"].get("parameters") or {}))
    assert pieces[-1].finish_reason == "tool_calls"


@pytest.mark.catalog
async def test_tool_choice_none_answers_in_text_and_results_feed_back(catalog_client: openai.AsyncOpenAI) -> None:
    text = await catalog_client.chat.completions.create(
        model=CATALOG_CHAT, messages=ask("Say hi."), max_tokens=10, tools=[WEATHER],
        tool_choice="none")
    assert text.choices[0].message.tool_calls is None and text.choices[0].message.content
    answered = await catalog_client.chat.completions.create(model=CATALOG_CHAT, max_tokens=30, messages=[
        *ask("What is the weather in Paris?"),
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees and sunny"}],
        tools=[WEATHER], tool_choice="none")
    assert answered.choices[0].message.content


# --- the published document ----------------------------------------------------------------

EFFECT, REFUSED = "effect", "400"
RECORDED = "tests/test_request_validation.py::test_user_metadata_and_store_are_accepted_and_recorded"
CHECKS: dict[str, dict[str, tuple[str, str]]] = {
    "ChatCompletionRequest": {
        "model": (EFFECT, "tests/test_openai_api.py::test_unknown_model_is_404_model_not_found"),
        "messages": (EFFECT, "tests/test_openai_api.py::test_chat_completion_by_alias"),
        "temperature": (EFFECT, "test_seed_reproduces_a_sampled_answer_alone_and_batched"),
        "top_p": (EFFECT, "tests/test_request_validation.py::test_top_p_that_rounds_to_zero_is_served_greedily"),
        "max_tokens": (EFFECT, "tests/test_openai_api.py::test_chat_completion_by_alias"),
        "max_completion_tokens": (EFFECT, "test_max_completion_tokens_bounds_the_answer"),
        "stop": (EFFECT, "test_stop_ends_the_answer_before_the_sequence"),
        "seed": (EFFECT, "test_seed_reproduces_a_sampled_answer_alone_and_batched"),
        "n": (EFFECT, "test_n_choices_in_index_order_with_usage_of_all"),
        "stream": (EFFECT, "tests/test_openai_api.py::test_chat_stream_matches_the_whole_reply"),
        "stream_options": (EFFECT, "tests/test_openai_api.py::test_stream_include_usage_ends_with_a_usage_chunk"),
        "user": (EFFECT, RECORDED),
        "metadata": (EFFECT, RECORDED),
        "store": (EFFECT, RECORDED),
        "presence_penalty": (EFFECT, "test_penalties_change_a_greedy_answer"),
        "frequency_penalty": (EFFECT, "test_penalties_change_a_greedy_answer"),
        "logit_bias": (EFFECT, "test_logit_bias_bans_and_forces_tokens"),
        "logprobs": (EFFECT, "test_logprobs_with_top_logprobs"),
        "top_logprobs": (EFFECT, "test_logprobs_with_top_logprobs"),
        "response_format": (EFFECT, "test_json_schema_answers_validate"),
        "tools": (EFFECT, "test_required_tool_call_parses"),
        "tool_choice": (EFFECT, "test_named_tool_streams_as_openai_does"),
        "parallel_tool_calls": (EFFECT, "test_named_tool_streams_as_openai_does"),
        "reasoning_effort": (REFUSED, "test_unimplemented_parameters_are_400_naming_them"),
        "service_tier": (REFUSED, "test_unimplemented_parameters_are_400_naming_them"),
        "modalities": (REFUSED, "test_unimplemented_parameters_are_400_naming_them"),
        "audio": (REFUSED, "test_unimplemented_parameters_are_400_naming_them"),
        "prediction": (REFUSED, "test_unimplemented_parameters_are_400_naming_them"),
        "web_search_options": (REFUSED, "test_unimplemented_parameters_are_400_naming_them"),
        "functions": (REFUSED, "test_unimplemented_parameters_are_400_naming_them"),
        "function_call": (REFUSED, "test_unimplemented_parameters_are_400_naming_them"),
    },
    "CompletionRequest": {
        "model": (EFFECT, "tests/test_openai_api.py::test_text_completion_whole_and_streamed"),
        "prompt": (EFFECT, "tests/test_openai_api.py::test_text_completion_whole_and_streamed"),
        "temperature": (EFFECT, "test_completions_take_n"),
        "top_p": (EFFECT, "test_completion_sampling_parameters_apply"),
        "max_tokens": (EFFECT, "tests/test_openai_api.py::test_text_completion_whole_and_streamed"),
        "stop": (EFFECT, "test_completion_sampling_parameters_apply"),
        "seed": (EFFECT, "test_completion_sampling_parameters_apply"),
        "n": (EFFECT, "test_completions_take_n"),
        "stream": (EFFECT, "tests/test_openai_api.py::test_text_completion_whole_and_streamed"),
        "stream_options": (EFFECT, "tests/test_openai_api.py::test_text_completion_whole_and_streamed"),
        "user": (EFFECT, RECORDED),
        "presence_penalty": (EFFECT, "test_completion_sampling_parameters_apply"),
        "frequency_penalty": (EFFECT, "test_completion_sampling_parameters_apply"),
        "logit_bias": (EFFECT, "test_logit_bias_bans_and_forces_tokens"),
        "echo": (EFFECT, "test_completions_take_n"),
        "logprobs": (EFFECT, "test_completion_logprobs_in_the_legacy_shape"),
        "best_of": (REFUSED, "test_unimplemented_parameters_are_400_naming_them"),
        "suffix": (REFUSED, "test_unimplemented_parameters_are_400_naming_them"),
    },
}
"""Per request schema, each documented property → the test that shows its effect, or its 400
(by name in this module, or `path::name`)."""

REFUSALS = [
    ("/v1/chat/completions", "reasoning_effort", "low"),
    ("/v1/chat/completions", "service_tier", "flex"),
    ("/v1/chat/completions", "modalities", ["text", "audio"]),
    ("/v1/chat/completions", "audio", {"voice": "alloy", "format": "wav"}),
    ("/v1/chat/completions", "prediction", {"type": "content", "content": "x"}),
    ("/v1/chat/completions", "web_search_options", {}),
    ("/v1/chat/completions", "functions", [{"name": "lookup"}]),
    ("/v1/chat/completions", "function_call", "auto"),
    ("/v1/completions", "best_of", 3),
    ("/v1/completions", "suffix", "after"),
]


@pytest.mark.parametrize(("path", "param", "value"), REFUSALS)
async def test_unimplemented_parameters_are_400_naming_them(
    http: httpx.AsyncClient, path: str, param: str, value: Any
) -> None:
    base: dict[str, Any] = {"model": TINY_CHAT, "max_tokens": 2}
    base |= {"messages": HELLO} if path.endswith("chat/completions") else {"prompt": "hello"}
    reply = await http.post(path, json={**base, param: value})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["code"] == "unsupported_parameter"


async def test_max_completion_tokens_bounds_the_answer(client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(model=TINY_CHAT, messages=HELLO, max_completion_tokens=3)
    assert reply.usage is not None and reply.usage.completion_tokens == 3
    assert reply.choices[0].finish_reason == "length"


async def test_completion_sampling_parameters_apply(client: openai.AsyncOpenAI) -> None:
    async def complete(**extra: Any) -> str:
        reply = await client.completions.create(model=TINY_CHAT, prompt="hello", max_tokens=40, **extra)
        return reply.choices[0].text

    plain = await complete(temperature=0)
    assert await complete(temperature=1.5, top_p=0) == plain, "top_p 0 decodes greedily"
    assert await complete(temperature=1.5, seed=5) == await complete(temperature=1.5, seed=5)
    assert await complete(temperature=0, presence_penalty=2) != plain
    assert await complete(temperature=0, frequency_penalty=2) != plain
    words = plain.split()
    cut = await complete(temperature=0, stop=[words[2]])
    assert cut.split() == words[:words.index(words[2])]


async def test_every_documented_parameter_has_a_check(http: httpx.AsyncClient) -> None:
    schemas = (await http.get("/openapi.json")).json()["components"]["schemas"]
    here = globals()
    for schema_name, checks in CHECKS.items():
        documented = set(schemas[schema_name]["properties"])
        assert documented == set(checks), (
            f"{schema_name}: documented without a check: {sorted(documented - set(checks))}; "
            f"checked but not documented: {sorted(set(checks) - documented)}")
        for param, (kind, test) in checks.items():
            path, _, name = test.rpartition("::")
            if path:
                assert f"def {name}(" in (Path(__file__).parents[1] / path).read_text(), (param, test)
            else:
                assert callable(here.get(name)), (param, test)
            if kind == REFUSED:
                assert (param in [p for _, p, _ in REFUSALS]), f"{param} has no refusal case"
                assert "not supported" in json.dumps(schemas[schema_name]["properties"][param]).lower()
