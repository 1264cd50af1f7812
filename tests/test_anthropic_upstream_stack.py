"""`runtime: anthropic` assets end to end: Roundhouse A serves assets whose upstream is a second
Roundhouse B's `/v1/messages` (B serves the tiny chat model, and for JSON and tool calls a tiny
model whose tokenizer can spell them, and checks keys). The answers A
gives through every front are B's, B's refusals keep their meaning at A, and A's routes fall
back between its Anthropic assets like between any others."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from stack_harness import TINY_CHAT, Stack, running_stack, tiny_documents
from tiny_bpe import QWEN_LIKE, build_tiny_bpe_llama

from services.common.embedded import EmbeddedNats

HELLO: Any = [{"role": "user", "content": "Say something."}]
GREEDY = {"temperature": 0}
"""Sampling fields this `anthropic` SDK no longer names; the Messages API of Roundhouse takes them."""
WRONG_KEY = "rh-wrong-key-that-must-not-leak-0123"
TINY_JSON = "tiny-json-tools"
"""B's model for JSON and tool calls: the tiny chat model's word-level vocabulary has no JSON
punctuation, this one's byte-level BPE spells anything."""
TRIP: Any = {"type": "object", "additionalProperties": False, "required": ["city", "days"],
             "properties": {"city": {"type": "string", "maxLength": 12},
                            "days": {"type": "integer", "minimum": 1, "maximum": 16}}}
"""Bounded, so that the random model, which never chooses to close a string, ends within `LONG`."""
WEATHER: Any = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": TRIP, "strict": True}}
"""Strict: the upstream gets the tool's `strict` as Anthropic's API spells it."""
LONG = 400


def claude(asset_id: str, url: str, *, model: str = TINY_CHAT, key_env: str = "ANTHROPIC_API_KEY",
           **fields: Any) -> dict[str, Any]:
    """An `anthropic` asset of A whose upstream is B's `model`."""
    return {"asset_id": asset_id, "interface": "llm-runtime", "runtime": "anthropic",
            "source": {"kind": "url", "url": url, "api_key_env": key_env, "upstream_model": model},
            "metadata": {"context_length": 2048}, **fields}


@pytest.fixture(scope="module")
async def fleets(
    own_db: str, db_dsn: str, sources: Path, tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[Stack, Stack]]:
    """(A, B): B checks keys and serves the tiny chat model; A's assets call B with B's admin
    key (in ANTHROPIC_API_KEY) or a wrong one (in GROQ_API_KEY). Each has a NATS server of its
    own, so neither learns the other's workers."""
    root = tmp_path_factory.mktemp("anthropic-fleets")
    with EmbeddedNats(root / "nats-b") as nats_b, EmbeddedNats(root / "nats-a") as nats_a, \
            pytest.MonkeyPatch.context() as env:
        json_model = sources / TINY_JSON
        if not json_model.exists():
            build_tiny_bpe_llama(json_model, QWEN_LIKE)
        async with running_stack(own_db, nats_b.url, sources, root / "store-b", auth=True) as b:
            await b.apply(*tiny_documents(sources), {"asset_id": TINY_JSON, "interface": "llm-runtime",
                                                     "source": {"kind": "path", "path": str(json_model)}})
            assert b.admin_key is not None
            env.setenv("ANTHROPIC_API_KEY", b.admin_key)
            env.setenv("GROQ_API_KEY", WRONG_KEY)
            async with running_stack(db_dsn, nats_a.url, sources, root / "store-a") as a:
                await a.apply(
                    claude("claude-b", b.http_url, generation={"max_tokens": 12}),
                    claude("claude-json", b.http_url, model=TINY_JSON),
                    claude("claude-wrong-key", b.http_url, key_env="GROQ_API_KEY"),
                    claude("claude-nowhere", b.http_url, model="no-such-model"),
                    {"asset_id": "claude-route", "class": "route", "interface": "llm-runtime",
                     "targets": [{"asset": "claude-nowhere"}], "fallback": ["claude-b"]},
                )
                yield a, b


@pytest.fixture
async def a_openai(fleets: tuple[Stack, Stack]) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{fleets[0].http_url}/v1", api_key="unused", max_retries=0,
                                  timeout=120) as client:
        yield client


@pytest.fixture
async def b_anthropic(fleets: tuple[Stack, Stack]) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=fleets[1].http_url, api_key=fleets[1].admin_key,
                                        max_retries=0, timeout=120) as client:
        yield client


async def test_a_chat_at_a_is_answered_by_b(a_openai: openai.AsyncOpenAI,
                                            b_anthropic: anthropic.AsyncAnthropic) -> None:
    direct = await b_anthropic.messages.create(model=TINY_CHAT, messages=HELLO, max_tokens=12,
                                               extra_body=GREEDY)
    reply = await a_openai.chat.completions.create(model="claude-b", messages=HELLO,
                                                   temperature=0)  # max_tokens: the asset's 12
    assert reply.model == "claude-b"
    assert reply.choices[0].message.content == "".join(b.text for b in direct.content if b.type == "text")
    assert reply.choices[0].finish_reason == {"max_tokens": "length", "end_turn": "stop"}[str(direct.stop_reason)]
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
        direct.usage.input_tokens, direct.usage.output_tokens)
    stream = await a_openai.chat.completions.create(model="claude-b", messages=HELLO, temperature=0,
                                                    stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


async def test_a_stop_sequence_ends_the_answer_at_a_as_at_b(
    fleets: tuple[Stack, Stack], b_anthropic: anthropic.AsyncAnthropic,
) -> None:
    whole = await b_anthropic.messages.create(model=TINY_CHAT, messages=HELLO, max_tokens=12,
                                              extra_body=GREEDY)
    text = "".join(b.text for b in whole.content if b.type == "text")
    stop = text[len(text) // 2:][:3]
    assert stop.strip(), f"no stop sequence to take from {text!r}"
    async with anthropic.AsyncAnthropic(base_url=fleets[0].http_url, api_key="unused", max_retries=0,
                                        timeout=120) as a_anthropic:
        reply = await a_anthropic.messages.create(model="claude-b", messages=HELLO, max_tokens=12,
                                                  extra_body=GREEDY, stop_sequences=[stop])
        assert "".join(b.text for b in reply.content if b.type == "text") == text[:text.index(stop)]
        assert (reply.stop_reason, reply.stop_sequence) == ("stop_sequence", stop)
        counted = await a_anthropic.messages.count_tokens(model="claude-b", messages=HELLO)
    assert counted.input_tokens == whole.usage.input_tokens


async def test_forced_tool_calls_come_back_as_openai_tool_calls(a_openai: openai.AsyncOpenAI) -> None:
    reply = await a_openai.chat.completions.create(
        model="claude-json", messages=[{"role": "user", "content": "Weather in Paris for 3 days?"}],
        tools=[WEATHER], tool_choice="required", max_tokens=LONG, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call: Any = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id
    arguments = json.loads(call.function.arguments)
    assert isinstance(arguments["city"], str) and isinstance(arguments["days"], int)
    stream = await a_openai.chat.completions.create(
        model="claude-json", messages=[{"role": "user", "content": "Weather in Paris for 3 days?"}],
        tools=[WEATHER], tool_choice="required", max_tokens=LONG, temperature=0, stream=True)
    pieces = [c.choices[0].delta.tool_calls for c in [chunk async for chunk in stream] if c.choices]
    deltas: list[Any] = [d for piece in pieces if piece for d in piece]
    # A call id is made per answer: the streamed one is its own.
    assert (deltas[0].index, deltas[0].function.name) == (0, "get_weather") and deltas[0].id
    assert json.loads("".join(d.function.arguments or "" for d in deltas if d.index == 0)) == arguments


async def test_a_json_schema_is_enforced_by_the_upstream(a_openai: openai.AsyncOpenAI) -> None:
    reply = await a_openai.chat.completions.create(
        model="claude-json", messages=HELLO, max_tokens=LONG, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "trip", "schema": TRIP, "strict": True}})
    answer = json.loads(reply.choices[0].message.content or "")
    assert set(answer) == {"city", "days"} and isinstance(answer["days"], int) and len(answer["city"]) <= 12


async def test_b_refusing_a_key_is_an_upstream_error_naming_the_variable_not_the_key(
    a_openai: openai.AsyncOpenAI, caplog: pytest.LogCaptureFixture,
) -> None:
    with pytest.raises(openai.APIStatusError) as failed:
        await a_openai.chat.completions.create(model="claude-wrong-key", messages=HELLO)
    assert failed.value.status_code == 502
    error = failed.value.body
    assert isinstance(error, dict) and error["code"] == "upstream_error"
    assert "refused the key in GROQ_API_KEY" in error["message"] and "HTTP 401" in error["message"]
    assert WRONG_KEY not in str(error) and WRONG_KEY not in caplog.text


async def test_what_the_messages_api_cannot_do_is_a_400_naming_it(a_openai: openai.AsyncOpenAI) -> None:
    refused_fields: list[tuple[dict[str, Any], str]] = [
        ({"n": 2}, "n"), ({"temperature": 1.5}, "temperature"), ({"seed": 3}, "seed"),
        ({"response_format": {"type": "json_object"}}, "response_format"), ({"logprobs": True}, "logprobs")]
    for fields, named in refused_fields:
        with pytest.raises(openai.BadRequestError) as refused:
            await a_openai.chat.completions.create(model="claude-b", messages=HELLO, **fields)
        error = refused.value.body
        assert isinstance(error, dict) and named in error["message"] and "anthropic" in error["message"], error


async def test_a_route_falls_back_from_an_upstream_without_the_model(
    fleets: tuple[Stack, Stack], a_openai: openai.AsyncOpenAI,
) -> None:
    with pytest.raises(openai.APIStatusError) as failed:
        await a_openai.chat.completions.create(model="claude-nowhere", messages=HELLO)
    assert failed.value.status_code == 502 and "upstream has no model 'no-such-model'" in str(failed.value.body)
    async with httpx.AsyncClient(base_url=fleets[0].http_url, timeout=120) as http:
        response = await http.post("/v1/chat/completions", json={"model": "claude-route", "messages": HELLO})
    assert response.status_code == 200, response.text
    assert response.headers["x-roundhouse-target"] == "claude-b"
    assert response.headers["x-roundhouse-attempts"] == "claude-nowhere:upstream_error,claude-b:ok"
    assert response.json()["usage"]["completion_tokens"] > 0
