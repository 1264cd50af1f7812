"""Every inference request is checked once, the same over HTTP and gRPC.

Against a running stack (tiny random-weight models, real registry, Postgres and NATS):
input that used to crash (lone surrogates, NUL bytes, an empty chat) is a 400 /
INVALID_ARGUMENT naming the field; OpenAI parameters Roundhouse does not implement, and
values out of bounds, are refused by name instead of being silently ignored; the gRPC front
checks what HTTP checks.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from google.protobuf import struct_pb2
from pydantic import ValidationError
from stack_harness import TINY_CHAT, TINY_EMBED, Stack, running_stack, tiny_documents

from roundhouse.v1 import asset_pb2, inference_pb2, jobs_pb2, registry_pb2, worker_pb2
from services.common.errors import ContextLengthExceeded, FieldProblem, InvalidArgument
from services.common.inference_requests import (
    MAX_INPUTS,
    MAX_RESPONSE_BYTES,
    check_chat,
    check_embed,
    check_embed_size,
    embed_response_bytes,
    locate,
    max_embed_inputs,
)
from services.common.request_text import check_message_text, surrogate_path, text_problem
from services.router.http.chat.protocol import ChatCompletionRequest
from services.router.http.errors import validation_error_info

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
HELLO = [{"role": "user", "content": "hello"}]
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
# Embedded in the same stack, never asked to embed anything that passes validation.
IDLE_EMBED = "idle-embed"


@pytest.fixture(scope="module")
async def stack(
    db_dsn: str, nats_url: str, sources: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    store = tmp_path_factory.mktemp("store")
    async with running_stack(db_dsn, nats_url, sources, store) as running:
        idle = {"asset_id": IDLE_EMBED, "interface": "embedding-runtime",
                "source": {"kind": "path", "path": str(sources / TINY_EMBED)}}
        await running.apply(*tiny_documents(sources), idle)
        yield running


def raw_json(body: dict[str, Any]) -> bytes:
    """`body` as JSON with every non-ASCII character escaped, so lone surrogates survive."""
    return json.dumps(body, ensure_ascii=True).encode()


async def post_raw(http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> httpx.Response:
    return await http.post(path, content=raw_json(body),
                           headers={"content-type": "application/json"})


def chat(**fields: Any) -> inference_pb2.ChatRequest:
    fields.setdefault("model", TINY_CHAT)
    return inference_pb2.ChatRequest(**fields)


def hello(**fields: Any) -> inference_pb2.ChatRequest:
    return chat(messages=[inference_pb2.ChatMessage(role="user", content="hello")],
                max_tokens=4, temperature=0, **fields)


async def chat_text(stub: Any, request: inference_pb2.ChatRequest) -> str:
    return "".join([c.delta async for c in stub.Chat(request, timeout=60)])


async def grpc_chat_error(stub: Any, request: inference_pb2.ChatRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        async for _ in stub.Chat(request, timeout=60):
            pass
    return failed.value


async def held_models(stack: Stack) -> set[str]:
    info = await stack.workers[0].control.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest())
    return {m.asset_id for m in info.models}


# --- the checks themselves, no network ----------------------------------------------


def problems_of(check: Any, request: Any) -> list[FieldProblem]:
    with pytest.raises(InvalidArgument) as refused:
        check(request)
    return refused.value.problems


def paths_of(check: Any, request: Any) -> list[str]:
    return [p.path for p in problems_of(check, request)]


USER = inference_pb2.ChatMessage(role="user", content="hi")


@pytest.mark.parametrize(
    ("fields", "paths"),
    [
        ({}, ["messages"]),
        ({"model": ""}, ["model", "messages"]),
        ({"messages": [USER], "prompt": "hi"}, ["prompt"]),
        ({"messages": [USER, inference_pb2.ChatMessage(role="developer", content="x")]},
         ["messages[1].role"]),
        ({"prompt": "x", "temperature": 2.5}, ["temperature"]),
        ({"prompt": "x", "temperature": float("nan")}, ["temperature"]),
        ({"prompt": "x", "top_p": 1.01}, ["top_p"]),
        ({"prompt": "x", "top_p": -0.5}, ["top_p"]),
        ({"prompt": "x", "max_tokens": 0}, ["max_tokens"]),
        ({"prompt": "x", "stop": ["a", "", "b", ""]}, ["stop[1]", "stop[3]"]),
        ({"prompt": "x", "stop": ["s"] * 17}, ["stop"]),
        ({"messages": [USER], "tools": [inference_pb2.Tool(name="has space"),
                                        inference_pb2.Tool(name="ok", parameters_json="[1]")]},
         ["tools[0].function.name", "tools[1].function.parameters"]),
        ({"prompt": "x", "tools": [inference_pb2.Tool(name="f")]}, ["tools"]),
        ({"prompt": "x", "user": "u\x00"}, ["user"]),
        ({"prompt": "x", "user": "u" * 257}, ["user"]),
    ],
)
def test_invalid_chat_requests_name_every_field(fields: dict[str, Any], paths: list[str]) -> None:
    fields.setdefault("model", "m")
    assert paths_of(check_chat, inference_pb2.ChatRequest(**fields)) == paths


@pytest.mark.parametrize("top_p", [0.0, 5e-324, 1e-30, 0.5, 1.0])
def test_top_p_from_zero_to_one_passes(top_p: float) -> None:
    check_chat(inference_pb2.ChatRequest(model="m", prompt="x", top_p=top_p, temperature=0))
    check_chat(inference_pb2.ChatRequest(model="m", messages=[USER], top_p=top_p, temperature=2))


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "x"}], "top_p": 1.5}, "top_p"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "stop": ["a", ""]}, "stop[1]"),
        ({"messages": [{"role": "user", "content": "x"}], "stop": ["s"] * 17}, "stop"),
        ({"messages": [{"role": "user", "content": "x"}],
          "tools": [{"type": "function", "function": {"name": "has space"}}]},
         "tools[0].function.name"),
    ],
)
def test_http_and_grpc_name_the_same_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ValidationError) as http:
        ChatCompletionRequest.model_validate({"model": "m", **body})
    assert validation_error_info(http.value.errors()).param == param
    proto = inference_pb2.ChatRequest(model="m", messages=[USER])
    for key, value in body.items():
        if key == "messages":
            proto.ClearField("messages")
            proto.messages.add(role=value[0]["role"], content=value[0]["content"])
        elif key == "stop":
            proto.stop.extend(value)
        elif key == "tools":
            proto.tools.add(name=value[0]["function"]["name"])
        else:
            setattr(proto, key, value)
    assert paths_of(check_chat, proto)[0] == param


@pytest.mark.parametrize(
    ("inputs", "paths"),
    [
        ([], ["input"]),
        ([inference_pb2.EmbedInput(text="x")] * (MAX_INPUTS + 1), ["input"]),
        ([inference_pb2.EmbedInput(text="x"), inference_pb2.EmbedInput(text="")], ["input[1]"]),
        ([inference_pb2.EmbedInput()], ["input[0]"]),
        ([inference_pb2.EmbedInput(tokens=inference_pb2.TokenIds())], ["input[0]"]),
    ],
)
def test_invalid_embed_requests_name_the_input(
    inputs: list[inference_pb2.EmbedInput], paths: list[str]
) -> None:
    assert paths_of(check_embed, inference_pb2.EmbedRequest(model="m", inputs=inputs)) == paths


def test_embed_response_size_matches_the_wire_and_bounds_the_inputs() -> None:
    for count, dim in ((1, 1), (3, 384), (20, 4096)):
        response = inference_pb2.EmbedResponse(
            embeddings=[inference_pb2.Embedding(values=[0.5] * dim) for _ in range(count)],
            usage=inference_pb2.Usage(prompt_tokens=2**31, total_tokens=2**31),
            asset_id="a" * 128, dimensions=dim)
        assert 0 <= embed_response_bytes(count, dim) - response.ByteSize() <= 1024
    assert max_embed_inputs(384) == MAX_INPUTS
    assert embed_response_bytes(max_embed_inputs(4096), 4096) <= MAX_RESPONSE_BYTES
    assert embed_response_bytes(max_embed_inputs(4096) + 1, 4096) > MAX_RESPONSE_BYTES
    check_embed_size(MAX_INPUTS, 384)
    check_embed_size(MAX_INPUTS, 0)  # the dimension is not known yet: the worker checks
    [problem] = problems_of(lambda n: check_embed_size(n, 4096), MAX_INPUTS)
    assert problem.path == "input" and "split" in problem.reason
    assert str(max_embed_inputs(4096)) in problem.reason


def test_locate_names_a_field_only_where_none_is_named() -> None:
    located = locate(ContextLengthExceeded("the prompt is too long"), "messages")
    assert isinstance(located, ContextLengthExceeded) and located.field == "messages"
    assert located.message == "messages: the prompt is too long"
    named = InvalidArgument("tools: bad")
    assert locate(named, "messages") is named and named.field == "tools"
    assert InvalidArgument("stop[2]: empty").field == "stop[2]"


def test_text_checks() -> None:
    assert text_problem("model", "a\x00b") == FieldProblem("model", text_problem("m", "\x00").reason)
    assert text_problem("content", "a\x00b", nul=False) is None
    assert text_problem("content", "\ud800").reason.startswith("not valid Unicode")
    assert text_problem("content", "plain ü ✓") is None
    assert surrogate_path({"messages": [{"content": "ok"}, {"content": ["\udfff"]}]}) \
        == "messages[1].content[0]"
    assert surrogate_path({"metadata": {"odd key": "\ud800"}}) == "metadata"
    assert surrogate_path({"input": ["fine"]}) is None
    spec = struct_pb2.Struct()
    spec.update({"source": {"paths": ["ok", "bad\x00"]}})
    with pytest.raises(InvalidArgument) as nested:
        check_message_text(spec)
    assert nested.value.field == "source.paths[1]"
    with pytest.raises(InvalidArgument) as mapped:
        check_message_text(registry_pb2.ListAssetsRequest(labels={"team": "x\x00"}))
    assert mapped.value.field == "labels.team"
    check_message_text(registry_pb2.ListAssetsRequest(labels={"team": "ml"}))


# --- 500s on input -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (CHAT, {"model": TINY_CHAT, "messages": [{"role": "user", "content": "\ud800"}]},
         "messages[0].content"),
        (CHAT, {"model": TINY_CHAT, "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "\udfff x"}]}]},
         "messages[1].content[0].text"),
        (COMPLETIONS, {"model": TINY_CHAT, "prompt": "once \ud800"}, "prompt"),
        (EMBEDDINGS, {"model": TINY_EMBED, "input": "\udfff x"}, "input"),
        (EMBEDDINGS, {"model": TINY_EMBED, "input": ["fine", "\ud800"]}, "input[1]"),
    ],
)
async def test_lone_surrogates_are_400_naming_the_field(
    http: httpx.AsyncClient, path: str, body: dict[str, Any], param: str
) -> None:
    reply = await post_raw(http, path, body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param
    assert "surrogate" in error["message"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (CHAT, {"model": "a\x00b", "messages": HELLO}),
        (CHAT, {"model": "a\x00b", "messages": HELLO, "stream": True}),
        (COMPLETIONS, {"model": "tiny\x00chat", "prompt": "x"}),
        (EMBEDDINGS, {"model": "a\x00b", "input": "x"}),
        (EMBEDDINGS, {"model": "a\x00b", "input": "x", "dimensions": 32}),
    ],
)
async def test_nul_in_model_is_a_clean_404(
    http: httpx.AsyncClient, path: str, body: dict[str, Any]
) -> None:
    reply = await post_raw(http, path, body)
    assert reply.status_code == 404, reply.text
    error = reply.json()["error"]
    assert error["param"] == "model" and error["code"] == "model_not_found"


async def test_nul_names_never_reach_postgres(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as embed:
        await stack.inference.Embed(inference_pb2.EmbedRequest(
            model="a\x00b", inputs=[inference_pb2.EmbedInput(text="x")]), timeout=30)
    assert embed.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
    registry, jobs = stack.registry.stub, stack.jobs.stub
    refused = {
        "registry.GetAsset": registry.GetAsset(registry_pb2.GetAssetRequest(asset_id="a\x00b")),
        "registry.ResolveAsset": registry.ResolveAsset(registry_pb2.ResolveAssetRequest(name="a\x00")),
        "registry.DeleteAsset": registry.DeleteAsset(registry_pb2.DeleteAssetRequest(asset_id="\x00")),
        "registry.ListAssets": registry.ListAssets(
            registry_pb2.ListAssetsRequest(labels={"team": "a\x00"})),
        "registry.ApplyAssets": registry.ApplyAssets(registry_pb2.ApplyAssetsRequest(assets=[
            registry_pb2.AssetApply(spec=asset_pb2.AssetSpec(asset_id="fine", display_name="a\x00"))])),
        "registry.ReportAssetStatus": registry.ReportAssetStatus(
            registry_pb2.ReportAssetStatusRequest(asset_id=TINY_CHAT, status={"message": "x\x00"})),
        "jobs.SubmitOperation": jobs.SubmitOperation(jobs_pb2.SubmitOperationRequest(
            type=jobs_pb2.OPERATION_TYPE_LOAD, asset_id="a\x00b")),
        "jobs.ListOperations": jobs.ListOperations(jobs_pb2.ListOperationsRequest(asset_id="a\x00")),
        "jobs.GetOperation": jobs.GetOperation(jobs_pb2.GetOperationRequest(operation_id="\x00")),
        "jobs.EnsureLoaded": jobs.EnsureLoaded(jobs_pb2.EnsureLoadedRequest(asset_id="a\x00b")),
    }
    for name, call in refused.items():
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert "NUL" in (failed.value.details() or ""), name
    still = await registry.GetAsset(registry_pb2.GetAssetRequest(asset_id=TINY_CHAT))
    assert still.spec.asset_id == TINY_CHAT


# --- the gRPC front checks what HTTP checks -----------------------------------------


async def test_empty_chat_is_invalid_and_the_model_still_serves(stack: Stack) -> None:
    front = await grpc_chat_error(stack.inference, chat(model="tiny-alias", max_tokens=4))
    assert front.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages" in (front.details() or "")
    assert await chat_text(stack.inference, hello())
    # The worker refuses it too (the jobs service and tests call workers directly).
    worker = await grpc_chat_error(stack.workers[0].inference, chat(max_tokens=4))
    assert worker.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await chat_text(stack.workers[0].inference, hello())
    assert await chat_text(stack.inference, hello())


@pytest.mark.parametrize(
    ("request_fields", "named"),
    [
        ({"messages": [inference_pb2.ChatMessage(role="user", content="hi")], "prompt": "hi"},
         "prompt"),
        ({"messages": [inference_pb2.ChatMessage(role="robot", content="hi")]},
         "messages[0].role"),
        ({"prompt": "hi", "top_p": 1.5}, "top_p"),
        ({"prompt": "hi", "temperature": 2.5}, "temperature"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "stop": ["ok", ""]}, "stop[1]"),
        ({"prompt": "hi", "stop": [f"s{i}" for i in range(17)]}, "stop"),
        ({"messages": [inference_pb2.ChatMessage(role="user", content="hi")],
          "tools": [inference_pb2.Tool(name="f", parameters_json="{nope")]},
         "tools[0].function.parameters"),
    ],
)
async def test_grpc_front_refuses_what_http_refuses(
    stack: Stack, request_fields: dict[str, Any], named: str
) -> None:
    for stub in (stack.inference, stack.workers[0].inference):
        error = await grpc_chat_error(stub, chat(**request_fields))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (error.details() or "").startswith(f"{named}: "), error.details()


async def test_grpc_embed_refuses_empty_text(stack: Stack) -> None:
    for stub, model in ((stack.inference, TINY_EMBED), (stack.workers[0].inference, TINY_EMBED)):
        await stack.inference.Embed(inference_pb2.EmbedRequest(
            model=TINY_EMBED, inputs=[inference_pb2.EmbedInput(text="x")]), timeout=60)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.Embed(inference_pb2.EmbedRequest(model=model, inputs=[
                inference_pb2.EmbedInput(text="fine"), inference_pb2.EmbedInput(text="")]), timeout=60)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (failed.value.details() or "").startswith("input[1]: ")


async def test_too_many_inputs_are_refused_before_any_work(stack: Stack) -> None:
    inputs = [inference_pb2.EmbedInput(text=f"w{i % 200}") for i in range(3000)]
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await stack.inference.Embed(
            inference_pb2.EmbedRequest(model=IDLE_EMBED, inputs=inputs), timeout=60)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = failed.value.details() or ""
    assert details.startswith("input: ") and "2048" in details and "split" in details
    assert IDLE_EMBED not in await held_models(stack), "the model was woken for a refused request"


async def test_top_p_that_rounds_to_zero_is_served_greedily(
    stack: Stack, client: openai.AsyncOpenAI
) -> None:
    greedy = await chat_text(stack.inference, hello())
    assert await chat_text(stack.inference, chat(
        messages=[inference_pb2.ChatMessage(role="user", content="hello")],
        max_tokens=4, top_p=5e-324)) == greedy
    reply = await client.chat.completions.create(
        model=TINY_CHAT, messages=HELLO, max_tokens=4, top_p=5e-324)
    assert reply.choices[0].message.content == greedy
    zero = await client.chat.completions.create(
        model=TINY_CHAT, messages=HELLO, max_tokens=4, top_p=0, temperature=1.5, seed=7)
    assert zero.choices[0].message.content == greedy


# --- parameters Roundhouse does not implement ---------------------------------------


@pytest.mark.parametrize(
    ("param", "value", "extra"),
    [
        ("reasoning_effort", "low", {}),
        ("service_tier", "flex", {}),
        ("modalities", ["text", "audio"], {}),
        ("audio", {"voice": "alloy", "format": "wav"}, {}),
        ("functions", [{"name": "lookup"}], {}),
    ],
)
async def test_unimplemented_chat_parameters_are_refused_by_name(
    client: openai.AsyncOpenAI, param: str, value: Any, extra: dict[str, Any]
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(
            model=TINY_CHAT, messages=HELLO, max_tokens=2, extra_body={param: value, **extra})
    assert refused.value.body["param"] == param
    assert param in refused.value.message


@pytest.mark.parametrize(
    ("param", "value", "extra"),
    [
        ("presence_penalty", 2.5, {}),
        ("logit_bias", {"50256": -101}, {}),
        ("top_logprobs", 3, {}),
        ("top_logprobs", 21, {"logprobs": True}),
        ("n", 17, {}),
        ("tool_choice", "auto", {}),
        ("tool_choice", "required", {}),
        ("tool_choice", {"type": "function", "function": {"name": "other"}}, {"tools": TOOLS}),
        ("parallel_tool_calls", False, {}),
        ("response_format", {"type": "json_object"}, {"tools": TOOLS}),
    ],
)
async def test_generation_parameters_out_of_bounds_are_refused_by_name(
    client: openai.AsyncOpenAI, param: str, value: Any, extra: dict[str, Any]
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(
            model=TINY_CHAT, messages=HELLO, max_tokens=2, extra_body={param: value, **extra})
    assert (refused.value.body["param"] or "").split(".")[0] == param
    assert refused.value.body["code"] != "unsupported_parameter"


@pytest.mark.parametrize(
    ("param", "value"),
    [("suffix", "after"), ("best_of", 3), ("n", -607), ("logprobs", 6)],
)
async def test_unimplemented_completion_parameters_are_refused_by_name(
    client: openai.AsyncOpenAI, param: str, value: Any
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await client.completions.create(
            model=TINY_CHAT, prompt="once", max_tokens=2, extra_body={param: value})
    assert refused.value.body["param"] == param


async def test_neutral_values_change_nothing_and_are_accepted(
    client: openai.AsyncOpenAI, http: httpx.AsyncClient
) -> None:
    plain = await client.chat.completions.create(
        model=TINY_CHAT, messages=HELLO, max_tokens=4, temperature=0)
    neutral = await client.chat.completions.create(
        model=TINY_CHAT, messages=HELLO, max_tokens=4, temperature=0,
        presence_penalty=0, frequency_penalty=0, logit_bias={}, response_format={"type": "text"},
        logprobs=False, top_logprobs=0, tool_choice="none", service_tier="auto",
        modalities=["text"], n=1, extra_body={"reasoning_effort": None})
    assert neutral.choices[0].message.content == plain.choices[0].message.content
    completion = await http.post(COMPLETIONS, json={
        "model": TINY_CHAT, "prompt": "once", "max_tokens": 2, "suffix": "", "logprobs": None,
        "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "best_of": 1, "n": 1})
    assert completion.status_code == 200, completion.text


async def test_user_metadata_and_store_are_accepted_and_recorded(
    client: openai.AsyncOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="services")
    raw = await client.chat.completions.with_raw_response.create(
        model=TINY_CHAT, messages=HELLO, max_tokens=2, user="user-1234",
        metadata={"ticket": "T-77"}, store=False)
    request_id = raw.headers["x-request-id"]
    assert raw.parse().choices[0].message.content is not None
    vectors = await client.embeddings.create(model=TINY_EMBED, input="hello", user="user-1234")
    assert len(vectors.data) == 1
    completion = await client.completions.create(
        model=TINY_CHAT, prompt="once", max_tokens=2, user="user-1234")
    assert completion.choices[0].text is not None
    recorded = [r.getMessage() for r in caplog.records if request_id in r.getMessage()]
    assert any("user-1234" in m for m in recorded), recorded
    assert any("T-77" in m and "store" in m for m in recorded), recorded


async def test_tool_message_needs_content(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(model=TINY_CHAT, max_tokens=2, messages=[
            *HELLO, {"role": "tool", "tool_call_id": "c1"}])  # type: ignore[list-item]
    assert refused.value.body["param"] == "messages[1].content"


async def test_empty_embedding_input_list_is_400(http: httpx.AsyncClient) -> None:
    reply = await http.post(EMBEDDINGS, json={"model": TINY_EMBED, "input": []})
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "input"


async def test_worker_errors_name_the_field(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as too_long:
        await client.chat.completions.create(
            model=TINY_CHAT, messages=[{"role": "user", "content": "hello " * 5000}])
    assert too_long.value.body["code"] == "context_length_exceeded"
    assert too_long.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as prompt_too_long:
        await client.completions.create(model=TINY_CHAT, prompt="hello " * 5000)
    assert prompt_too_long.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as bias:
        await client.chat.completions.create(
            model=TINY_CHAT, messages=HELLO, max_tokens=2, logit_bias={"999999": 1})
    assert (bias.value.body["param"] or "").startswith("logit_bias") and "999999" in bias.value.message
    with pytest.raises(openai.BadRequestError) as tokens:
        await client.embeddings.create(model=TINY_EMBED, input=[[5, 10**6]])
    assert tokens.value.body["param"] is not None and tokens.value.body["param"].startswith("input")
