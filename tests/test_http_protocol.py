"""The HTTP API's request parsing, validation and error shaping, with no model behind it.

Every request here fails (or is answered) before the gateway is consulted; the app is
given a gateway that fails the test if it is touched at all.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from services.common.inference_requests import MAX_INPUTS
from services.router.http import create_app
from services.router.http.chat.protocol import ChatCompletionRequest
from services.router.http.completion.protocol import CompletionRequest
from services.router.http.embedding.protocol import EmbeddingRequest, encode_vector

LIMIT = 4096
CHAT = "/v1/chat/completions"
USER_HI = [{"role": "user", "content": "hi"}]


class UntouchedGateway:
    """Stands where the gateway goes; any use of it fails the test."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the gateway was used ({name}) on a path that must not reach it")


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(UntouchedGateway(), UntouchedGateway(), max_body_bytes=LIMIT)  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as http:
        yield http


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The `error` object of an OpenAI-shaped error body (asserting the shape)."""
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


async def test_malformed_json_is_400_invalid_json(client: httpx.AsyncClient) -> None:
    response = await client.post(CHAT, content=b'{"model": "m", "messages": [',
                                 headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "invalid_json"
    assert error["type"] == "invalid_request_error"
    assert response.headers["x-request-id"]


async def test_body_that_is_not_an_object_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post(CHAT, json=[1, 2, 3])
    assert response.status_code == 400
    assert "JSON object" in error_of(response)["message"]


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"messages": USER_HI}, "model", "missing_required_parameter"),
        ({"model": "m"}, "messages", "missing_required_parameter"),
        ({"model": "m", "messages": []}, "messages", "invalid_value"),
        ({"model": "m", "messages": "hi"}, "messages", "invalid_type"),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]},
         "messages[0].content", "invalid_value"),
        ({"model": "m", "messages": [{"role": "user"}]},
         "messages[0].content", "missing_required_parameter"),
        ({"model": "m", "messages": [{"role": "robot", "content": "x"}]},
         "messages[0].role", "invalid_value"),
        ({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "x"}},
        ]}]}, "messages[0].content[1]", "invalid_value"),
        ({"model": "m", "messages": USER_HI, "temperature": 2.5}, "temperature", "invalid_value"),
        ({"model": "m", "messages": USER_HI, "temperature": "warm"}, "temperature", "invalid_type"),
        ({"model": "m", "messages": USER_HI, "top_p": 1.5}, "top_p", "invalid_value"),
        ({"model": "m", "messages": USER_HI, "max_tokens": 0}, "max_tokens", "invalid_value"),
        ({"model": "m", "messages": USER_HI, "stop": 7}, "stop", "invalid_type"),
        ({"model": "m", "messages": USER_HI, "stream_options": {"include_usage": True}},
         "stream_options", "invalid_value"),
        ({"model": "m", "messages": USER_HI, "tools": [
            {"type": "function", "function": {"name": "has spaces"}}]},
         "tools[0].function.name", "invalid_value"),
    ],
)
async def test_invalid_chat_request_names_the_field(
    client: httpx.AsyncClient, body: dict[str, Any], param: str, code: str
) -> None:
    response = await client.post(CHAT, json=body)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == param
    assert error["code"] == code
    assert param in error["message"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 17}, "n"),
        ({"n": 0}, "n"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.01}, "frequency_penalty"),
        ({"logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"logit_bias": {"-5": 1}}, "logit_bias.-5"),
        ({"logit_bias": {"tok": 1}}, "logit_bias.tok"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": 1}, "logprobs"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "has space"}}},
         "response_format.json_schema.name"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": "sometimes", "tools": [{"type": "function", "function": {"name": "f"}}]},
         "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "g"}},
          "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
        ({"parallel_tool_calls": False}, "parallel_tool_calls"),
        ({"response_format": {"type": "json_object"},
          "tools": [{"type": "function", "function": {"name": "f"}}]}, "response_format"),
    ],
)
async def test_generation_parameters_out_of_bounds_name_the_field(
    client: httpx.AsyncClient, extra: dict[str, Any], param: str
) -> None:
    response = await client.post(CHAT, json={"model": "m", "messages": USER_HI, **extra})
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == param, error
    assert error["code"] != "unsupported_parameter"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"model": "m", "prompt": [1, 2, 3]}, "prompt"),
        ("/v1/completions", {"model": "m", "prompt": ["a", "b"]}, "prompt"),
        ("/v1/completions", {"model": "m", "prompt": ""}, "prompt"),
        ("/v1/completions", {"model": "m", "prompt": "x", "n": 17}, "n"),
        ("/v1/completions", {"model": "m", "prompt": "x", "best_of": 2}, "best_of"),
        ("/v1/completions", {"model": "m", "prompt": "x", "logprobs": 6}, "logprobs"),
        ("/v1/completions", {"model": "m", "prompt": "x", "logprobs": 1, "echo": True}, "echo"),
        ("/v1/embeddings", {"model": "m"}, "input"),
        ("/v1/embeddings", {"model": "m", "input": []}, "input"),
        ("/v1/embeddings", {"model": "m", "input": ["ok", ""]}, "input[1]"),
        ("/v1/embeddings", {"model": "m", "input": ""}, "input"),
        ("/v1/embeddings", {"model": "m", "input": [[1, -2]]}, "input[0]"),
        ("/v1/embeddings", {"model": "m", "input": {"text": "x"}}, "input"),
        ("/v1/embeddings", {"model": "m", "input": "x", "encoding_format": "int8"},
         "encoding_format"),
        ("/v1/embeddings", {"model": "m", "input": "x", "dimensions": 0}, "dimensions"),
    ],
)
async def test_invalid_completion_and_embedding_requests(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], param: str
) -> None:
    response = await client.post(path, json=body)
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] == param


def test_more_embedding_inputs_than_one_request_takes_are_refused() -> None:
    with pytest.raises(ValidationError) as refused:
        EmbeddingRequest.model_validate({"model": "m", "input": ["x"] * (MAX_INPUTS + 1)})
    assert "split" in str(refused.value)
    assert len(EmbeddingRequest.model_validate({"model": "m", "input": ["x"] * MAX_INPUTS}).input) == MAX_INPUTS


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (CHAT, {"model": "m", "messages": [{"role": "user", "content": "\ud800"}]},
         "messages[0].content"),
        (CHAT, {"model": "m", "messages": USER_HI, "stop": ["ok", "\udfff"]}, "stop[1]"),
        (CHAT, {"model": "m", "messages": USER_HI, "metadata": {"k": "\ud800"}}, "metadata.k"),
        ("/v1/completions", {"model": "m\ud800", "prompt": "x"}, "model"),
        ("/v1/embeddings", {"model": "m", "input": [[1], "\udfff x"]}, "input[1]"),
    ],
)
async def test_lone_surrogates_are_400_before_the_gateway(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], param: str
) -> None:
    response = await client.post(path, content=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == param and "surrogate" in error["message"]


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        (CHAT, {"reasoning_effort": "high"}, "reasoning_effort"),
        (CHAT, {"service_tier": "priority"}, "service_tier"),
        (CHAT, {"modalities": ["audio"]}, "modalities"),
        ("/v1/completions", {"suffix": "tail"}, "suffix"),
        ("/v1/completions", {"best_of": 3}, "best_of"),
    ],
)
async def test_unimplemented_parameters_are_400_naming_them(
    client: httpx.AsyncClient, path: str, extra: dict[str, Any], param: str
) -> None:
    base = {"model": "m", "messages": USER_HI} if path == CHAT else {"model": "m", "prompt": "x"}
    response = await client.post(path, json={**base, **extra})
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == param
    assert error["code"] == "unsupported_parameter"
    assert f"'{param}' is not supported yet" in error["message"]


async def test_tool_choice_auto_needs_tools(client: httpx.AsyncClient) -> None:
    response = await client.post(CHAT, json={"model": "m", "messages": USER_HI, "tool_choice": "auto"})
    assert response.status_code == 400
    assert error_of(response)["param"] == "tool_choice"


def test_new_parameters_reach_the_chat_request() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}, "strict": True}}]
    request = ChatCompletionRequest.model_validate({
        "model": "m", "messages": [
            *USER_HI,
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "42"}],
        "presence_penalty": 0.5, "frequency_penalty": -1, "logit_bias": {"7": -100},
        "logprobs": True, "top_logprobs": 3, "n": 2, "tools": tools,
        "tool_choice": {"type": "function", "function": {"name": "f"}}, "parallel_tool_calls": False,
    }).to_proto("r")
    assert (request.presence_penalty, request.frequency_penalty) == (0.5, -1)
    assert dict(request.logit_bias) == {7: -100} and request.n == 2
    assert request.logprobs and request.top_logprobs == 3
    assert (request.tool_choice.mode, request.tool_choice.function_name) == ("function", "f")
    assert request.HasField("parallel_tool_calls") and not request.parallel_tool_calls
    assert request.tools[0].strict
    assert [(c.id, c.name, c.arguments) for c in request.messages[1].tool_calls] == [("call_1", "f", "{}")]
    assert request.messages[2].tool_call_id == "call_1" and request.messages[2].content == "42"
    shaped = ChatCompletionRequest.model_validate({
        "model": "m", "messages": USER_HI, "response_format": {
            "type": "json_schema", "json_schema": {"name": "point", "strict": True,
                                                   "schema": {"type": "object"}}}}).to_proto("r")
    assert (shaped.response_format.type, shaped.response_format.name) == ("json_schema", "point")
    assert json.loads(shaped.response_format.schema_json) == {"type": "object"}
    assert shaped.response_format.strict
    completion = CompletionRequest.model_validate({"model": "m", "prompt": "x", "logprobs": 2, "n": 3}).to_proto("r")
    assert completion.logprobs and completion.top_logprobs == 2 and completion.n == 3


def test_neutral_values_of_unimplemented_parameters_pass() -> None:
    request = ChatCompletionRequest.model_validate({
        "model": "m", "messages": USER_HI, "reasoning_effort": None, "service_tier": "default",
        "modalities": ["text"], "store": True, "metadata": {"ticket": "T-1"}, "user": "u-1",
    })
    assert request.recorded() == {"user": "u-1", "metadata": {"ticket": "T-1"}, "store": True}
    completion = CompletionRequest.model_validate({
        "model": "m", "prompt": "x", "suffix": "", "logprobs": None, "best_of": 1, "n": None})
    assert completion.to_proto("r").prompt == "x"


async def test_published_schema_says_what_the_server_takes(client: httpx.AsyncClient) -> None:
    schemas = (await client.get("/openapi.json")).json()["components"]["schemas"]
    chat, completion = schemas["ChatCompletionRequest"], schemas["CompletionRequest"]
    embedding, message = schemas["EmbeddingRequest"], schemas["ChatMessage"]
    assert chat["properties"]["n"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 16}
    assert completion["properties"]["logprobs"]["anyOf"][0] == {"type": "integer", "minimum": 0, "maximum": 5}
    assert completion["properties"]["suffix"]["anyOf"][0]["maxLength"] == 0
    assert chat["properties"]["presence_penalty"]["anyOf"][0] == {"type": "number", "minimum": -2, "maximum": 2}
    assert chat["properties"]["reasoning_effort"]["type"] == "null"
    assert chat["properties"]["top_p"]["anyOf"][0]["minimum"] == 0
    assert "most likely token" in chat["properties"]["top_p"]["description"]
    for informational in ("user", "metadata", "store"):
        assert "recorded" in json.dumps(chat["properties"][informational])
    inputs = embedding["properties"]["input"]["anyOf"]
    assert inputs[0]["minLength"] == 1 and all(b.get("minItems") == 1 for b in inputs[1:])
    assert inputs[2]["maxItems"] == MAX_INPUTS
    assert message["allOf"][0]["else"]["required"] == ["content"], "a tool message needs content"
    assert message["allOf"][1]["then"]["required"] == ["tool_call_id"], "and names its call"
    stop = chat["properties"]["stop"]["anyOf"]
    assert stop[0]["minLength"] == 1 and stop[1]["items"]["minLength"] == 1
    assert {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}} in [
        rule["then"] for rule in chat["allOf"]]


async def test_body_over_the_declared_limit_is_413(client: httpx.AsyncClient) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * LIMIT}]}
    response = await client.post(CHAT, json=body, headers={"x-request-id": "big-1"})
    assert response.status_code == 413
    assert error_of(response)["code"] == "request_too_large"
    assert response.headers["x-request-id"] == "big-1"


async def test_streamed_body_over_the_limit_is_413_without_reading_it_all(
    client: httpx.AsyncClient,
) -> None:
    sent: list[int] = []

    async def endless_body() -> AsyncIterator[bytes]:
        # Chunked transfer, no Content-Length: only counting the bytes can stop it.
        for i in range(10_000):
            sent.append(i)
            yield b"x" * 1024

    response = await client.post(CHAT, content=endless_body(),
                                 headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert error_of(response)["code"] == "request_too_large"
    assert len(sent) <= LIMIT // 1024 + 1


async def test_client_request_id_is_echoed_on_errors(client: httpx.AsyncClient) -> None:
    response = await client.post(CHAT, json={"model": "m"}, headers={"x-request-id": "req-42"})
    assert response.status_code == 400
    assert response.headers["x-request-id"] == "req-42"


@pytest.mark.parametrize("bad", ["has spaces", "x" * 300, "semi;colon"])
async def test_unusable_request_id_is_replaced(client: httpx.AsyncClient, bad: str) -> None:
    response = await client.get("/healthz", headers={"x-request-id": bad})
    returned = response.headers["x-request-id"]
    assert returned and returned != bad and len(returned) <= 128


async def test_generated_request_ids_differ(client: httpx.AsyncClient) -> None:
    first = await client.get("/healthz")
    second = await client.get("/healthz")
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


async def test_healthz_answers_without_the_gateway(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz", headers={"x-request-id": "probe-1"})
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert response.headers["x-request-id"] == "probe-1"


async def test_unknown_route_and_method_have_openai_shape(client: httpx.AsyncClient) -> None:
    missing = await client.post("/v1/nothing-here", json={})
    assert missing.status_code == 404
    assert error_of(missing)["code"] == "not_found"
    wrong_method = await client.get(CHAT)
    assert wrong_method.status_code == 405
    assert error_of(wrong_method)["code"] == "method_not_allowed"
    assert wrong_method.headers["allow"] == "POST"


async def test_metrics_count_requests_by_route_and_status(client: httpx.AsyncClient) -> None:
    await client.get("/healthz")
    await client.post(CHAT, json={"model": "m"})
    text = (await client.get("/metrics")).text
    assert 'roundhouse_http_requests_total{method="GET",route="/healthz",status="200"} 1.0' in text
    assert (
        'roundhouse_http_requests_total{method="POST",route="/v1/chat/completions",status="400"}'
        ' 1.0' in text
    )
    assert "roundhouse_http_request_duration_seconds_bucket" in text


def test_chat_request_converts_to_proto() -> None:
    request = ChatCompletionRequest.model_validate({
        "model": "default-chat",
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"},
                                         {"type": "text", "text": "b"}], "name": "ann"},
        ],
        "max_tokens": 5, "max_completion_tokens": 7, "stop": "END", "seed": 3,
        "temperature": 0, "tools": [{"type": "function", "function": {
            "name": "lookup", "description": "find", "parameters": {"type": "object"}}}],
        "logit_bias": {}, "presence_penalty": 0, "user": "ann-42", "metadata": {"k": "v"},
        "some_future_field": True,
    })
    proto = request.to_proto("rid-1")
    assert proto.model == "default-chat" and proto.request_id == "rid-1" and proto.user == "ann-42"
    assert [(m.role, m.content, m.name) for m in proto.messages] == [
        ("system", "be brief", ""), ("user", "a\nb", "ann")]
    assert proto.max_tokens == 7
    assert list(proto.stop) == ["END"]
    assert proto.seed == 3
    assert proto.HasField("temperature") and proto.temperature == 0
    assert not proto.HasField("top_p")
    assert proto.tools[0].name == "lookup"
    assert json.loads(proto.tools[0].parameters_json) == {"type": "object"}
    assert not proto.prompt


@pytest.mark.parametrize(("seed", "sent"), [(3, 3), (-3, -3), (2**64 + 3, 3), (2**63, -(2**63)), (7.0, 7)])
def test_any_integer_seed_is_one_64_bit_seed(seed: int, sent: int) -> None:
    proto = CompletionRequest.model_validate({"model": "m", "prompt": "x", "seed": seed}).to_proto("r")
    assert proto.seed == sent


def test_completion_request_converts_to_proto() -> None:
    proto = CompletionRequest.model_validate(
        {"model": "m", "prompt": ["Once upon"], "stop": ["\n", "."], "max_tokens": 4}
    ).to_proto("rid-2")
    assert proto.prompt == "Once upon" and not proto.messages
    assert list(proto.stop) == ["\n", "."] and proto.max_tokens == 4


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("one", [("text", "one")]),
        (["a", "b"], [("text", "a"), ("text", "b")]),
        ([1, 2, 3], [("tokens", [1, 2, 3])]),
        ([[1, 2], [3]], [("tokens", [1, 2]), ("tokens", [3])]),
    ],
)
def test_embedding_inputs_convert_to_proto(value: Any, expected: list[tuple[str, Any]]) -> None:
    proto = EmbeddingRequest.model_validate({"model": "m", "input": value}).to_proto("r")
    got = [(i.WhichOneof("kind"), i.text if i.HasField("text") else list(i.tokens.ids))
           for i in proto.inputs]
    assert got == expected


def test_base64_vectors_are_little_endian_float32() -> None:
    values = [0.5, -1.25, 3.0]
    encoded = encode_vector(values, "base64")
    assert isinstance(encoded, str)
    assert list(struct.unpack("<3f", base64.b64decode(encoded))) == values
    assert encode_vector(values, "float") == values
