"""The `openai` runtime against a real OpenAI-compatible HTTP server started by the test."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from upstream_harness import KEY, serving_upstream

from services.common.assetspec import parse_spec
from services.common.errors import FailedPrecondition, InvalidArgument, UpstreamError, WrongInterface
from services.common.openai_upstream import ChatOptions, OpenAIUpstream, chat_body
from services.common.upstreams import DEFAULT_UPSTREAM_RULES
from services.worker.models import ChatMessage, ChatParams, Tool, load_model
from services.worker.models.openai_remote import OpenAIRemoteModel
from services.worker.models.types import (
    ResponseFormat,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    TopLogprob,
)
from services.worker.models.upstream_shapes import openai_tool


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []
    with serving_upstream(received) as url:
        yield url, received


def remote_spec(url: str, interface: Any = "llm-runtime", key_env: str = "OPENAI_API_KEY"):
    return parse_spec(
        {
            "asset_id": "remote-chat",
            "interface": interface,
            "runtime": "openai",
            "source": {
                "kind": "url",
                "url": url,
                "api_key_env": key_env,
                "upstream_model": "upstream-7b",
            },
            "metadata": {"context_length": 32768},
        }
    )


def remote(url: str, interface: Any = "llm-runtime", key_env: str = "OPENAI_API_KEY"):
    return load_model(remote_spec(url, interface, key_env), None)


async def test_streams_chat_with_usage(upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    url, received = upstream
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    model = remote(url)
    assert isinstance(model, OpenAIRemoteModel)
    assert model.capabilities.context_length == 32768 and model.capabilities.streaming
    params = ChatParams(messages=[{"role": "user", "content": "hi"}], max_tokens=3, stop=["\n"], seed=5)
    deltas = [d async for d in model.chat(params)]
    await model.close()
    assert [d.text for d in deltas] == ["Hel", "lo", " there", ""]
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].usage.prompt_tokens == 11 and deltas[-1].usage.completion_tokens == 3
    body = received[-1]
    assert body["model"] == "upstream-7b" and body["stream"] is True
    assert body["max_tokens"] == 3 and body["stop"] == ["\n"] and body["seed"] == 5
    assert "temperature" not in body


async def test_raw_prompt_uses_completions(upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    url, received = upstream
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    model = remote(url)
    deltas = [d async for d in model.chat(ChatParams(prompt="Say it", temperature=0))]
    await model.close()
    assert "".join(d.text for d in deltas) == "raw!"
    assert deltas[-1].finish_reason == "stop" and deltas[-1].usage is None
    assert received[-1]["prompt"] == "Say it" and received[-1]["temperature"] == 0


async def test_embeddings_keep_input_order(upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = upstream
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    model = remote(url, interface="embedding-runtime")
    result = await model.embed(["a", "abc", [1, 2, 3, 4], "ab"])
    await model.close()
    assert [v[0] for v in result.vectors] == [1.0, 3.0, 4.0, 2.0]
    assert result.dimensions == 3
    assert result.prompt_tokens == 14  # one request for the texts, one for the token array
    with pytest.raises(WrongInterface):
        model.chat(ChatParams(prompt="x"))


async def test_wrong_key_is_an_upstream_error_without_the_key(
    upstream, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    url, _ = upstream
    caplog.set_level("DEBUG")
    wrong = "sk-wrong-key-that-must-not-leak"
    monkeypatch.setenv("OPENAI_API_KEY", wrong)
    model = remote(url, interface=["llm-runtime", "embedding-runtime"])
    with pytest.raises(UpstreamError) as caught:
        _ = [d async for d in model.chat(ChatParams(prompt="x"))]
    assert "401" in caught.value.message and "Incorrect API key" in caught.value.message
    assert wrong not in str(caught.value) and wrong not in repr(caught.value.args)
    with pytest.raises(UpstreamError) as caught:
        await model.embed(["x"])
    assert wrong not in str(caught.value)
    await model.close()
    assert "Incorrect API key" in caplog.text and wrong not in caplog.text


async def test_no_key_sends_no_auth_and_unreachable_is_upstream_error(
    upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _ = upstream
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    model = remote(url, key_env="")
    with pytest.raises(UpstreamError, match="401"):
        _ = [d async for d in model.chat(ChatParams(prompt="x"))]
    await model.close()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_url = f"http://127.0.0.1:{closed.getsockname()[1]}/v1"
    closed.close()
    model = remote(dead_url)
    with pytest.raises(UpstreamError, match="upstream request failed"):
        _ = [d async for d in model.chat(ChatParams(prompt="x"))]
    await model.close()


HI = ChatMessage("user", "hi")
WEATHER = Tool("get_weather", "The weather in a city",
               {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}, strict=True)


async def test_tool_calls_stream_through_as_openai_streams_them(upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    url, received = upstream
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    model = remote(url)
    assert model.capabilities.tool_calling == "upstream" and model.capabilities.supports_structured_output
    earlier = ChatMessage("assistant", "", tool_calls=(ToolCall("call_a", "get_weather", '{"city": "Oslo"}'),))
    params = ChatParams(
        messages=[ChatMessage("user", "weather?"), earlier,
                  ChatMessage("tool", "rainy", tool_call_id="call_a"), ChatMessage("user", "and now?")],
        tools=[WEATHER], tool_choice=ToolChoice("function", "get_weather"), parallel_tool_calls=False,
    )
    deltas = [d async for d in model.chat(params)]
    await model.close()
    pieces = [c for d in deltas for c in d.tool_calls]
    # The first call came in pieces, the second whole: both are passed on as OpenAI streams them.
    assert pieces == [
        ToolCallDelta(0, "call_up1", "get_weather", ""), ToolCallDelta(0, arguments='{"city": '),
        ToolCallDelta(0, arguments='"C1"}'),
        ToolCallDelta(1, "call_up2", "get_weather", ""), ToolCallDelta(1, arguments='{"city": "C2"}'),
    ]
    assert deltas[-1].finish_reason == "tool_calls" and deltas[-1].usage is not None
    body = received[-1]
    assert body["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city", "parameters": WEATHER.parameters,
        "strict": True}}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["parallel_tool_calls"] is False
    assert body["messages"][1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}
    assert body["messages"][2] == {"role": "tool", "content": "rainy", "tool_call_id": "call_a"}


async def test_several_choices_each_end_with_their_own_finish(upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    url, received = upstream
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    model = remote(url)
    deltas = [d async for d in model.chat(ChatParams(messages=[HI], n=2, seed=9))]
    await model.close()
    texts = {i: "".join(d.text for d in deltas if d.index == i) for i in (0, 1)}
    assert texts == {0: "Hello there", 1: "Alt1 answer"}
    endings = [(d.index, d.finish_reason) for d in deltas if d.finish_reason]
    assert endings == [(0, "length"), (1, "stop")]
    assert [d.usage is not None for d in deltas] == [False] * (len(deltas) - 1) + [True]
    assert received[-1]["n"] == 2 and received[-1]["seed"] == 9


async def test_logprobs_and_sampling_fields_are_passed_and_mapped(upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    url, received = upstream
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    model = remote(url)
    params = ChatParams(messages=[HI], logprobs=True, top_logprobs=2,
                        presence_penalty=0.5, frequency_penalty=-0.25, logit_bias={42: -100.0, 7: 3.5})
    deltas = [d async for d in model.chat(params)]
    await model.close()
    entries = [p for d in deltas for p in d.logprobs]
    assert [e.token for e in entries] == ["Hel", "lo", " there"]
    assert entries[0] == TokenLogprob("Hel", -0.25, b"Hel", (TopLogprob("Hel", -0.25, b"Hel"),
                                                             TopLogprob("alt1", -2.0, b"alt1")))
    body = received[-1]
    assert body["logprobs"] is True and body["top_logprobs"] == 2
    assert body["presence_penalty"] == 0.5 and body["frequency_penalty"] == -0.25
    assert body["logit_bias"] == {"42": -100.0, "7": 3.5}
    assert "n" not in body and "response_format" not in body and "tools" not in body


async def test_response_format_is_passed_and_top_k_refused(upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    url, received = upstream
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    model = remote(url)
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    shaped = ResponseFormat("json_schema", schema, name="answer", strict=True, description="The answer")
    _ = [d async for d in model.chat(ChatParams(messages=[HI], response_format=shaped))]
    assert received[-1]["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "answer", "schema": schema, "strict": True, "description": "The answer"}}
    _ = [d async for d in model.chat(ChatParams(messages=[HI],
                                                response_format=ResponseFormat("json_object")))]
    assert received[-1]["response_format"] == {"type": "json_object"}
    sent = len(received)
    with pytest.raises(InvalidArgument, match="^top_k: .*takes no top_k"):
        _ = [d async for d in model.chat(ChatParams(messages=[HI], top_k=5))]
    with pytest.raises(InvalidArgument, match="^response_format: needs messages"):
        _ = [d async for d in model.chat(ChatParams(prompt="x", response_format=ResponseFormat("json_object")))]
    assert len(received) == sent, "a refused request never reaches the upstream"
    with pytest.raises(FailedPrecondition, match="cannot count tokens"):
        await model.count_prompt_tokens(ChatParams(messages=[HI]))
    await model.close()


async def test_whole_answers_keep_choices_and_tool_calls(upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = upstream
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    client = OpenAIUpstream(remote_spec(url), upstreams=DEFAULT_UPSTREAM_RULES)
    path, body = chat_body("upstream-7b", messages=[{"role": "user", "content": "hi"}], stream=False,
                           options=ChatOptions(n=2))
    choices = await client.complete_choices(path, body)
    assert [(c.index, c.text, c.finish_reason) for c in choices] == [(0, "Hello there", "length"),
                                                                    (1, "Alt1 answer", "stop")]
    path, body = chat_body("upstream-7b", messages=[{"role": "user", "content": "hi"}], stream=False,
                           tools=[openai_tool(WEATHER)])
    [called] = await client.complete_choices(path, body)
    await client.close()
    assert called.finish_reason == "tool_calls" and called.usage is not None
    assert [(c.index, c.id, c.name, c.arguments) for c in called.tool_calls] == [
        (0, "call_up1", "get_weather", '{"city": "C1"}'), (1, "call_up2", "get_weather", '{"city": "C2"}')]
