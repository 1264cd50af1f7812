"""The worker's conversions of chat requests, chunks and capabilities, and `CountTokens` over a
real gRPC worker holding a tiny model."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import grpc
import pytest
from stack_harness import TINY_CHAT, TINY_EMBED, RunningWorker, asset_message, running_worker, tiny_spec
from upstream_harness import KEY, serving_upstream

from roundhouse.v1 import inference_pb2, worker_pb2
from services.common.asset_proto import capabilities_from_proto, capabilities_to_proto
from services.common.assetspec import parse_spec
from services.common.errors import InvalidArgument
from services.common.modelstore.store import ModelStore
from services.worker import converters
from services.worker.models import Capabilities, ChatDelta, ChatMessage, Tool, Usage
from services.worker.models.types import (
    ResponseFormat,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    TopLogprob,
)

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def full_request() -> inference_pb2.ChatRequest:
    """A chat request with every field set to something other than its default."""
    return inference_pb2.ChatRequest(
        model="m",
        messages=[
            inference_pb2.ChatMessage(role="user", content="weather?", name="ann"),
            inference_pb2.ChatMessage(role="assistant", tool_calls=[
                inference_pb2.ToolCall(id="call_1", name="get_weather", arguments='{"city": "Oslo"}')]),
            inference_pb2.ChatMessage(role="tool", content="rainy", tool_call_id="call_1"),
        ],
        temperature=0.5, top_p=0.9, max_tokens=7, stop=["\n"], seed=3,
        tools=[inference_pb2.Tool(name="get_weather", description="Weather", parameters_json=json.dumps(SCHEMA),
                                  strict=True)],
        presence_penalty=0.5, frequency_penalty=-1.0, logit_bias={42: -100.0, 7: 2.5},
        logprobs=True, top_logprobs=3, n=2, top_k=40,
        tool_choice=inference_pb2.ToolChoice(mode="function", function_name="get_weather"),
        parallel_tool_calls=False,
    )


def test_every_request_field_reaches_the_model_layer() -> None:
    params = converters.chat_params(full_request())
    assert params.messages == [
        ChatMessage("user", "weather?", "ann"),
        ChatMessage("assistant", "", tool_calls=(ToolCall("call_1", "get_weather", '{"city": "Oslo"}'),)),
        ChatMessage("tool", "rainy", tool_call_id="call_1"),
    ]
    assert params.prompt is None
    assert (params.temperature, params.top_p, params.max_tokens, params.stop, params.seed) == (0.5, pytest.approx(0.9),
                                                                                             7, ["\n"], 3)
    assert params.tools == [Tool("get_weather", "Weather", SCHEMA, strict=True)]
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -1.0)
    assert params.logit_bias == {42: -100.0, 7: 2.5}
    assert (params.logprobs, params.top_logprobs, params.n, params.top_k) == (True, 3, 2, 40)
    assert params.tool_choice == ToolChoice("function", "get_weather")
    assert params.parallel_tool_calls is False
    params.validate()


def test_unset_fields_take_the_model_layers_defaults() -> None:
    params = converters.chat_params(inference_pb2.ChatRequest(model="m", prompt="hi"))
    assert params.prompt == "hi" and params.messages == []
    assert (params.presence_penalty, params.frequency_penalty, params.logit_bias) == (0.0, 0.0, {})
    assert (params.logprobs, params.top_logprobs, params.n, params.top_k) == (False, 0, 1, 0)
    assert params.response_format == ResponseFormat() and params.tool_choice is None
    assert params.parallel_tool_calls is True


@pytest.mark.parametrize(("shape", "expected"), [
    (inference_pb2.ResponseFormat(type="text"), ResponseFormat()),
    (inference_pb2.ResponseFormat(type="json_object"), ResponseFormat("json_object")),
    (inference_pb2.ResponseFormat(type="json_schema", schema_json=json.dumps(SCHEMA), name="place", strict=True,
                                  description="A place"),
     ResponseFormat("json_schema", SCHEMA, "place", True, "A place")),
])
def test_response_formats(shape: inference_pb2.ResponseFormat, expected: ResponseFormat) -> None:
    request = inference_pb2.ChatRequest(model="m", prompt="hi", response_format=shape)
    assert converters.chat_params(request).response_format == expected


@pytest.mark.parametrize(("choice", "expected"), [
    (inference_pb2.ToolChoice(mode="auto"), ToolChoice("auto")),
    (inference_pb2.ToolChoice(mode="none"), ToolChoice("none")),
    (inference_pb2.ToolChoice(mode="required"), ToolChoice("required")),
    (inference_pb2.ToolChoice(function_name="f"), ToolChoice("function", "f")),
])
def test_tool_choices(choice: inference_pb2.ToolChoice, expected: ToolChoice) -> None:
    request = inference_pb2.ChatRequest(model="m", prompt="hi", tool_choice=choice)
    assert converters.chat_params(request).tool_choice == expected


@pytest.mark.parametrize(("request_fields", "field", "reason"), [
    ({"response_format": inference_pb2.ResponseFormat(type="json_schema", schema_json="{nope")},
     "response_format.json_schema.schema", "not JSON"),
    ({"response_format": inference_pb2.ResponseFormat(type="json_schema", schema_json="[1]")},
     "response_format.json_schema.schema", "must be a JSON object"),
    ({"response_format": inference_pb2.ResponseFormat(type="json_schema")},
     "response_format.json_schema.schema", "required"),
    ({"response_format": inference_pb2.ResponseFormat(type="yaml")}, "response_format.type", "'yaml'"),
    ({"tool_choice": inference_pb2.ToolChoice(mode="sometimes")}, "tool_choice", "'sometimes'"),
    ({"tool_choice": inference_pb2.ToolChoice(mode="function")}, "tool_choice.function.name", "required"),
    ({"tools": [inference_pb2.Tool(name="a"), inference_pb2.Tool(name="b", parameters_json="{x")]},
     "tools[1].function.parameters", "not JSON"),
])
def test_bad_json_and_names_are_refused_naming_the_field(request_fields: dict, field: str, reason: str) -> None:
    request = inference_pb2.ChatRequest(model="m", messages=[inference_pb2.ChatMessage(role="user", content="x")],
                                        **request_fields)
    with pytest.raises(InvalidArgument) as refused:
        converters.chat_params(request)
    assert refused.value.field == field and reason in refused.value.message


def test_every_delta_field_reaches_the_chunk() -> None:
    delta = ChatDelta(
        "", finish_reason="tool_calls", usage=Usage(5, 4), index=1,
        tool_calls=(ToolCallDelta(0, "call_x", "get_weather", ""), ToolCallDelta(0, arguments='{"ci')),
        logprobs=(TokenLogprob("a", -0.5, b"a", (TopLogprob("a", -0.5, b"a"), TopLogprob("\xe9", -2.0, b"\xc3"))),),
    )
    chunk = converters.chat_chunk(delta, "m")
    assert (chunk.asset_id, chunk.index, chunk.delta) == ("m", 1, "")
    assert chunk.finish_reason == inference_pb2.FINISH_REASON_TOOL_CALLS
    assert (chunk.usage.prompt_tokens, chunk.usage.completion_tokens, chunk.usage.total_tokens) == (5, 4, 9)
    assert [(c.index, c.id, c.name, c.arguments) for c in chunk.tool_calls] == [
        (0, "call_x", "get_weather", ""), (0, "", "", '{"ci')]
    [entry] = chunk.logprobs
    assert (entry.token, entry.logprob, entry.bytes) == ("a", -0.5, b"a")
    assert [(t.token, t.logprob, t.bytes) for t in entry.top_logprobs] == [("a", -0.5, b"a"), ("\xe9", -2.0, b"\xc3")]
    stopped = converters.chat_chunk(ChatDelta("end", finish_reason="stop", stop_sequence="###"), "m")
    assert stopped.finish_reason == inference_pb2.FINISH_REASON_STOP and stopped.stop_sequence == "###"
    plain = converters.chat_chunk(ChatDelta("hi"), "m")
    assert plain.finish_reason == inference_pb2.FINISH_REASON_UNSPECIFIED and not plain.HasField("usage")
    assert not plain.tool_calls and not plain.logprobs and plain.index == 0


@pytest.mark.parametrize("tool_calling", ["", "template", "constrained", "upstream"])
def test_capabilities_survive_the_registrys_storage(tool_calling: str) -> None:
    caps = Capabilities(context_length=4096, supports_system_role=True, supports_tools=True, parameter_count=10,
                        memory_bytes=2048, streaming=True, supports_structured_output=True,
                        tool_calling=tool_calling)  # type: ignore[arg-type]
    sent = converters.capabilities(caps)
    stored = json.loads(json.dumps(capabilities_from_proto(sent)))  # as the registry's JSONB column keeps them
    read = capabilities_to_proto(stored)
    assert read == sent
    assert read.supports_structured_output and read.tool_calling == tool_calling


@pytest.fixture
async def worker(store: ModelStore) -> AsyncIterator[RunningWorker]:
    async with running_worker(store) as running:
        yield running


def chat(model: str, content: str = "hello w1 w2", **fields: object) -> inference_pb2.ChatRequest:
    return inference_pb2.ChatRequest(model=model, messages=[inference_pb2.ChatMessage(role="user", content=content)],
                                     **fields)


async def test_count_tokens_matches_what_a_chat_uses(worker: RunningWorker, sources) -> None:
    await worker.control.LoadModel(worker_pb2.LoadModelRequest(asset=asset_message(tiny_spec(sources, TINY_CHAT))),
                                   timeout=60)
    counts = []
    for content in ("hello", "hello w1 w2 w3 w4 w5"):
        counted = await worker.inference.CountTokens(chat(TINY_CHAT, content), timeout=30)
        assert counted.asset_id == TINY_CHAT
        chunks = [c async for c in worker.inference.Chat(chat(TINY_CHAT, content, max_tokens=1, temperature=0),
                                                         timeout=60)]
        assert counted.input_tokens == chunks[-1].usage.prompt_tokens
        counts.append(counted.input_tokens)
    assert counts[1] > counts[0]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await worker.inference.CountTokens(chat(TINY_CHAT, response_format=inference_pb2.ResponseFormat(
            type="json_schema", schema_json="{")), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(refused.value.details()).startswith("response_format.json_schema.schema: ")


async def test_count_tokens_refuses_what_cannot_count(worker: RunningWorker, sources) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await worker.inference.CountTokens(chat(TINY_CHAT), timeout=30)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    await worker.control.LoadModel(worker_pb2.LoadModelRequest(asset=asset_message(tiny_spec(sources, TINY_EMBED))),
                                   timeout=60)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await worker.inference.CountTokens(chat(TINY_EMBED), timeout=30)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with serving_upstream([]) as url:
        remote = parse_spec({"asset_id": "remote-chat", "interface": "llm-runtime", "runtime": "openai",
                             "source": {"kind": "url", "url": url, "upstream_model": "up"}})
        await worker.control.LoadModel(worker_pb2.LoadModelRequest(asset=asset_message(remote)), timeout=60)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await worker.inference.CountTokens(chat("remote-chat"), timeout=30)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cannot count tokens" in str(refused.value.details())


async def test_a_remote_models_tool_calls_and_choices_stream_over_grpc(
    worker: RunningWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    received: list[dict] = []
    with serving_upstream(received) as url:
        remote = parse_spec({"asset_id": "remote-chat", "interface": "llm-runtime", "runtime": "openai",
                             "source": {"kind": "url", "url": url, "upstream_model": "up",
                                        "api_key_env": "OPENAI_API_KEY"}})
        loaded = await worker.control.LoadModel(worker_pb2.LoadModelRequest(asset=asset_message(remote)), timeout=60)
        assert loaded.model.capabilities.tool_calling == "upstream"
        assert loaded.model.capabilities.supports_structured_output
        tool = inference_pb2.Tool(name="get_weather", parameters_json=json.dumps(SCHEMA))
        called = [c async for c in worker.inference.Chat(chat("remote-chat", tools=[tool]), timeout=30)]
        two = [c async for c in worker.inference.Chat(chat("remote-chat", n=2, logprobs=True), timeout=30)]
    pieces = [(p.index, p.id, p.name, p.arguments) for c in called for p in c.tool_calls]
    assert pieces == [(0, "call_up1", "get_weather", ""), (0, "", "", '{"city": '), (0, "", "", '"C1"}'),
                      (1, "call_up2", "get_weather", ""), (1, "", "", '{"city": "C2"}')]
    assert called[-1].finish_reason == inference_pb2.FINISH_REASON_TOOL_CALLS and called[-1].usage.total_tokens
    assert {i: "".join(c.delta for c in two if c.index == i) for i in (0, 1)} == {0: "Hello there", 1: "Alt1 answer"}
    assert [(c.index, c.finish_reason) for c in two if c.finish_reason] == [
        (0, inference_pb2.FINISH_REASON_LENGTH), (1, inference_pb2.FINISH_REASON_STOP)]
    assert [c.logprobs[0].token for c in two if c.logprobs] == ["Hel", "Alt1", "lo", " answer", " there"]
    assert received[-1]["n"] == 2 and received[-1]["logprobs"] is True
