"""Remote (`runtime: openai`) assets through a whole stack: a worker holds the asset (woken on
demand, its idle clock kept), and the router sends the requests to the upstream itself."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from polling import wait_until
from stack_harness import TINY_CHAT, Stack, running_stack, tiny_documents
from upstream_harness import KEY, serving_upstream

from roundhouse.v1 import inference_pb2, worker_pb2
from services.common.asset_proto import AssetRecord
from services.common.assetspec import parse_spec
from services.common.errors import InvalidArgument
from services.router.remote import RemoteUpstreams
from services.router.remote_shapes import request_body
from services.worker.converters import chat_params
from services.worker.models.upstream_shapes import (
    openai_message,
    openai_response_format,
    openai_tool,
    openai_tool_choice,
)

WRONG_KEY = "gsk-wrong-key-that-must-not-leak"
HELLO = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []
    with serving_upstream(received) as url:
        yield url, received


@pytest.fixture(scope="module")
async def stack(db_dsn: str, nats_url: str, sources: Path,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    with pytest.MonkeyPatch.context() as env:
        # Read by the worker when it loads an asset and by the router when it first calls one.
        env.setenv("OPENAI_API_KEY", KEY)
        env.setenv("GROQ_API_KEY", WRONG_KEY)
        # Only the first chat of each asset goes through the worker while a test runs.
        env.setenv("ROUNDHOUSE_REMOTE_WORKER_TOUCH_S", "3600")
        async with running_stack(db_dsn, nats_url, sources, tmp_path_factory.mktemp("remote") / "store") as running:
            yield running


@pytest.fixture
def client(stack: Stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0)


async def remote_asset(stack: Stack, url: str, asset_id: str, *, key_env: str = "OPENAI_API_KEY") -> str:
    """Apply an `openai` asset whose upstream model is named after it; its upstream model."""
    await stack.apply({"asset_id": asset_id, "interface": "llm-runtime", "runtime": "openai",
                       "source": {"kind": "url", "url": url, "api_key_env": key_env,
                                  "upstream_model": f"up-{asset_id}"}})
    return f"up-{asset_id}"


def sent_to(received: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
    return [body for body in received if body.get("model") == model]


async def holds(stack: Stack, asset_id: str) -> bool:
    info = await stack.workers[0].control.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest())
    return any(m.asset_id == asset_id for m in info.models)


async def test_chats_after_the_first_go_straight_to_the_upstream(stack: Stack, upstream, client) -> None:
    url, received = upstream
    model = await remote_asset(stack, url, "remote-direct")
    replies = [await client.chat.completions.create(
        model="remote-direct", messages=HELLO, max_tokens=5, temperature=0.5, seed=3, stop=["\n"])
        for _ in range(3)]
    for reply in replies:
        assert reply.model == "remote-direct" and reply.choices[0].message.content == "Hello there"
        assert reply.choices[0].finish_reason == "length"
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (11, 3)
    bodies = sent_to(received, model)
    # The worker always streams from its upstream; the router asks for a whole answer.
    assert [b["stream"] for b in bodies] == [True, False, False]
    assert {k: bodies[-1][k] for k in ("max_tokens", "temperature", "seed", "stop")} == {
        "max_tokens": 5, "temperature": 0.5, "seed": 3, "stop": ["\n"]}
    assert bodies[-1]["messages"] == HELLO
    async with httpx.AsyncClient(base_url=stack.http_url) as http:
        metrics = (await http.get("/metrics")).text
    assert ('roundhouse_generated_tokens_total{asset_id="remote-direct",interface="llm-runtime",'
            'model_type="openai",route=""} 9.0') in metrics


async def test_streams_and_grpc_chats_come_straight_from_the_upstream(stack: Stack, upstream, client) -> None:
    url, received = upstream
    model = await remote_asset(stack, url, "remote-streamed")
    await client.chat.completions.create(model="remote-streamed", messages=HELLO)
    stream = await client.chat.completions.create(
        model="remote-streamed", messages=HELLO, stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello there"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    grpc_chunks = [c async for c in stack.inference.Chat(inference_pb2.ChatRequest(
        model="remote-streamed", messages=[inference_pb2.ChatMessage(role="user", content="hi")]), timeout=30)]
    assert "".join(c.delta for c in grpc_chunks) == "Hello there"
    assert grpc_chunks[-1].usage.completion_tokens == 3 and grpc_chunks[-1].asset_id == "remote-streamed"
    bodies = sent_to(received, model)
    assert len(bodies) == 3 and all(b["stream"] and b["stream_options"] == {"include_usage": True}
                                    for b in bodies[1:])


async def test_a_sleeping_remote_asset_is_woken_before_its_upstream_is_called(
    stack: Stack, upstream, client
) -> None:
    url, received = upstream
    model = await remote_asset(stack, url, "remote-napper")
    await client.chat.completions.create(model="remote-napper", messages=HELLO)
    assert await holds(stack, "remote-napper")
    await stack.workers[0].control.UnloadModel(
        worker_pb2.UnloadModelRequest(asset_id="remote-napper", reason="sleep"))
    await wait_until(lambda: not stack.router.gateway.workers.holders("remote-napper"), timeout=10)
    reply = await client.chat.completions.create(model="remote-napper", messages=HELLO)
    assert reply.choices[0].message.content == "Hello there"
    assert await holds(stack, "remote-napper")
    assert len(sent_to(received, model)) == 2


async def test_upstream_errors_name_no_key_whichever_way_they_come(
    stack: Stack, upstream, client, caplog: pytest.LogCaptureFixture
) -> None:
    url, _ = upstream
    caplog.set_level(logging.DEBUG)
    await remote_asset(stack, url, "remote-wrong-key", key_env="GROQ_API_KEY")
    for _ in range(2):  # through the worker, then straight from the router
        with pytest.raises(openai.APIStatusError) as failed:
            await client.chat.completions.create(model="remote-wrong-key", messages=HELLO)
        assert failed.value.status_code == 502
        error = failed.value.body
        assert isinstance(error, dict) and error["code"] == "upstream_error"
        assert "401" in error["message"] and "Incorrect API key" in error["message"]
        assert WRONG_KEY not in str(error)
    assert "Incorrect API key" in caplog.text and WRONG_KEY not in caplog.text


def test_one_request_per_period_goes_through_the_worker() -> None:
    now = [0.0]
    remote = RemoteUpstreams(touch_s=10, clock=lambda: now[0])
    spec = parse_spec({"asset_id": "r", "interface": "llm-runtime", "runtime": "openai",
                       "source": {"kind": "url", "url": "http://127.0.0.1:9/v1"}})
    record = AssetRecord(spec, 1, datetime.now(UTC), datetime.now(UTC))
    assert [remote.skips_worker(record, "w1:1") for _ in range(3)] == [False, True, True]
    assert remote.skips_worker(record, "w2:1") is False  # each worker keeps its own clock
    now[0] = 10.0
    assert [remote.skips_worker(record, "w1:1") for _ in range(2)] == [False, True]
    local = AssetRecord(parse_spec({"asset_id": "l", "interface": "llm-runtime",
                                    "source": {"kind": "path", "path": "l"}}), 1,
                        datetime.now(UTC), datetime.now(UTC))
    assert remote.skips_worker(local, "w1:1") is False


def shaped_request(schema_json: str) -> inference_pb2.ChatRequest:
    """A request using every shaped field: earlier tool calls and results, a strict tool, a
    response schema, a named tool choice."""
    return inference_pb2.ChatRequest(
        messages=[inference_pb2.ChatMessage(role="user", content="weather?", name="ann"),
                  inference_pb2.ChatMessage(role="assistant", tool_calls=[inference_pb2.ToolCall(
                      id="call_1", name="weather", arguments='{"city": "Oslo"}')]),
                  inference_pb2.ChatMessage(role="tool", content="sunny", tool_call_id="call_1")],
        tools=[inference_pb2.Tool(name="weather", description="The weather", strict=True,
                                  parameters_json='{"type": "object", "properties": {"city": {"type": "string"}}}'),
               inference_pb2.Tool(name="time")],
        response_format=inference_pb2.ResponseFormat(type="json_schema", schema_json=schema_json, name="w",
                                                     strict=True, description="A forecast"),
        tool_choice=inference_pb2.ToolChoice(mode="function", function_name="weather"),
    )


def test_router_and_worker_send_a_request_in_the_same_shape() -> None:
    request = shaped_request('{"type": "object"}')
    _, routed = request_body("up-r", request, stream=False, asset_id="r")
    params = chat_params(request)
    assert routed["messages"] == [openai_message(m) for m in params.messages]
    assert routed["messages"][1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]}
    assert routed["tools"] == [openai_tool(t) for t in params.tools]
    assert routed["tools"][1]["function"]["parameters"] == {"type": "object", "properties": {}}
    assert routed["response_format"] == openai_response_format(params.response_format) == {
        "type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}, "strict": True,
                                               "description": "A forecast"}}
    assert routed["tool_choice"] == openai_tool_choice(params.tool_choice) == {
        "type": "function", "function": {"name": "weather"}}


@pytest.mark.parametrize(("schema_json", "reason"), [("{not json", "not JSON"), ("[1]", "must be a JSON object")])
def test_a_response_schema_that_is_no_json_object_is_refused_naming_it(schema_json: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        request_body("up-r", shaped_request(schema_json), stream=False, asset_id="r")
    assert refused.value.field == "response_format.json_schema.schema" and reason in refused.value.message


# -- remote assets in routes ------------------------------------------------------------------


async def chat_through(client: openai.AsyncOpenAI, route: str) -> tuple[str, str]:
    """One chat to `route`: the answering asset (the `model` field) and the attempts made."""
    raw = await client.chat.completions.with_raw_response.create(
        model=route, messages=HELLO, max_tokens=3)
    reply = raw.parse()
    assert raw.headers["x-roundhouse-target"] == reply.model
    return reply.model, raw.headers["x-roundhouse-attempts"]


async def test_a_remote_target_failing_upstream_falls_back_to_a_local_model(stack: Stack, upstream,
                                                                            client) -> None:
    url, _ = upstream
    await remote_asset(stack, url, "remote-upstream-401", key_env="GROQ_API_KEY")  # the upstream says 401
    await stack.apply(*tiny_documents(stack.sources),
                      {"asset_id": "via-remote", "class": "route", "interface": "llm-runtime",
                       "targets": [{"asset": "remote-upstream-401"}], "fallback": [TINY_CHAT]})
    assert await chat_through(client, "via-remote") == (
        TINY_CHAT, f"remote-upstream-401:upstream_error,{TINY_CHAT}:ok")
    # Without upstream_error in fallback_on, the upstream's refusal is the answer.
    await stack.apply({"asset_id": "via-remote-strict", "class": "route", "interface": "llm-runtime",
                       "targets": [{"asset": "remote-upstream-401"}], "fallback": [TINY_CHAT],
                       "fallback_on": ["overloaded"]})
    with pytest.raises(openai.APIStatusError) as failed:
        await client.chat.completions.create(model="via-remote-strict", messages=HELLO, max_tokens=3)
    assert failed.value.status_code == 502


async def test_a_remote_asset_is_an_ordinary_fallback(stack: Stack, upstream, client) -> None:
    url, received = upstream
    model = await remote_asset(stack, url, "remote-fallback")
    await stack.apply(*tiny_documents(stack.sources),
                      {"asset_id": "local-off", "interface": "llm-runtime",
                       "lifecycle": {"desired": "disabled"},
                       "source": {"kind": "path", "path": str(stack.sources / TINY_CHAT)}},
                      {"asset_id": "to-remote", "class": "route", "interface": "llm-runtime",
                       "targets": [{"asset": "local-off"}], "fallback": ["remote-fallback"]})
    before = len(sent_to(received, model))
    assert await chat_through(client, "to-remote") == (
        "remote-fallback", "local-off:unavailable,remote-fallback:ok")
    assert len(sent_to(received, model)) == before + 1
