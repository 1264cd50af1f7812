"""Anthropic's Messages API end to end: the official `anthropic` SDK against a running stack.

Registry, worker, jobs and router run in-process on free ports (`stack_harness`), checking API
keys; requests go over real HTTP to the router and real gRPC to the worker. Text, streams,
stops and errors use the tiny random-weight chat model; tool use needs a model that can write
JSON, the catalog's SmolLM2 (marked `catalog`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import anthropic
import httpx
import jsonschema
import pytest
import yaml
from anthropic.types import MessageParam, ToolChoiceParam, ToolParam
from limits_harness import clear_of_minute_boundary, ledger_rows, new_key
from polling import wait_until
from stack_harness import TINY_CHAT, TINY_EMBED, Stack, running_stack, tiny_documents

from roundhouse.v1 import inference_pb2
from services.common.errors import ModelNotReady, Overloaded, RateLimited, UpstreamError
from services.router.http.anthropic.errors import anthropic_error
from services.router.http.anthropic.streaming import MessageBuilder, MessageEvents, message_events

HELLO: list[Any] = [{"role": "user", "content": "hello"}]
CATALOG_CHAT = "smollm2-135m-instruct"
CATALOG_DOCUMENT = Path(__file__).resolve().parents[1] / "deploy" / "catalog" / f"{CATALOG_CHAT}.yaml"
WEATHER: ToolParam = {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
}
TIME: ToolParam = {
    "name": "get_time",
    "description": "The current time in a time zone.",
    "input_schema": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
}
GREEDY = {"temperature": 0}
"""The SDK no longer offers sampling parameters as arguments; the API takes them."""
STREAM_SHAPE = ("message_start", "content_block_start", "ping")


@pytest.fixture(scope="module")
async def stack(db_dsn: str, nats_url: str, sources: Path,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """The tiny models behind a router that checks API keys."""
    async with running_stack(db_dsn, nats_url, sources, tmp_path_factory.mktemp("store"),
                             auth=True) as running:
        await running.apply(*tiny_documents(sources))
        yield running


@pytest.fixture(scope="module")
async def key(stack: Stack) -> str:
    """A key of this module's own, without limits."""
    async with httpx.AsyncClient(base_url=f"{stack.http_url}/admin/v1", timeout=60,
                                 headers=stack.admin_headers) as admin:
        secret, _ = await new_key(admin, "anthropic")
    return secret


def sdk(stack: Stack, api_key: str | None, **options: Any) -> anthropic.AsyncAnthropic:
    """The official client against the stack's router, without retries."""
    return anthropic.AsyncAnthropic(base_url=stack.http_url, api_key=api_key, max_retries=0,
                                    timeout=120, **options)


@pytest.fixture
async def client(stack: Stack, key: str) -> AsyncIterator[anthropic.AsyncAnthropic]:
    """The SDK with the module's key (sent in `x-api-key`, as the SDK does)."""
    async with sdk(stack, key) as api:
        yield api


def text_of(message: anthropic.types.Message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


async def test_create_answers_a_message_that_ends_at_max_tokens(client: anthropic.AsyncAnthropic) -> None:
    message = await client.messages.create(model="tiny-alias", max_tokens=6, messages=HELLO,
                                           extra_body=GREEDY)
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == TINY_CHAT
    assert [block.type for block in message.content] == ["text"] and text_of(message)
    assert message.stop_reason == "max_tokens" and message.stop_sequence is None
    assert message.usage.output_tokens == 6 and message.usage.input_tokens > 0


async def test_stream_sends_anthropics_events_and_the_same_text(client: anthropic.AsyncAnthropic) -> None:
    whole = await client.messages.create(model=TINY_CHAT, max_tokens=8, messages=HELLO, extra_body=GREEDY)
    raw = await client.messages.with_raw_response.create(
        model=TINY_CHAT, max_tokens=8, messages=HELLO, extra_body=GREEDY, stream=True)
    body = (await raw.http_response.aread()).decode()
    names = [line.removeprefix("event: ") for line in body.splitlines() if line.startswith("event: ")]
    assert tuple(names[:3]) == STREAM_SHAPE
    assert set(names[3:-3]) == {"content_block_delta"} and len(names) > 6
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert raw.headers["request-id"] == raw.headers["x-request-id"]

    async with client.messages.stream(model=TINY_CHAT, max_tokens=8, messages=HELLO,
                                      extra_body=GREEDY) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_message()
    assert "text" in kinds and kinds[-1] == "message_stop"
    assert text_of(final) == text_of(whole)
    assert final.stop_reason == "max_tokens"
    assert final.usage.input_tokens == whole.usage.input_tokens
    assert final.usage.output_tokens == whole.usage.output_tokens == 8


async def test_count_tokens_equals_the_input_tokens_of_a_create(client: anthropic.AsyncAnthropic) -> None:
    system = "w1 w2 w3"
    message = await client.messages.create(model=TINY_CHAT, max_tokens=2, system=system, messages=HELLO)
    counted = await client.messages.count_tokens(model=TINY_CHAT, system=system, messages=HELLO)
    assert counted.input_tokens == message.usage.input_tokens > 0


async def test_system_prompt_reaches_the_model_as_string_or_blocks(client: anthropic.AsyncAnthropic) -> None:
    plain = await client.messages.create(model=TINY_CHAT, max_tokens=6, messages=HELLO, extra_body=GREEDY)
    as_string = await client.messages.create(model=TINY_CHAT, max_tokens=6, messages=HELLO,
                                             extra_body=GREEDY, system="w7 w8 w9 w10")
    as_blocks = await client.messages.create(
        model=TINY_CHAT, max_tokens=6, messages=HELLO, extra_body=GREEDY,
        system=[{"type": "text", "text": "w7 w8 w9 w10", "cache_control": {"type": "ephemeral"}}])
    in_messages = await client.messages.create(
        model=TINY_CHAT, max_tokens=6, extra_body=GREEDY,
        messages=[{"role": "system", "content": "w7 w8 w9 w10"}, *HELLO])
    assert as_string.usage.input_tokens > plain.usage.input_tokens
    for same in (as_blocks, in_messages):
        assert same.usage.input_tokens == as_string.usage.input_tokens
        assert text_of(same) == text_of(as_string)


async def test_a_stop_sequence_ends_the_message_before_it(client: anthropic.AsyncAnthropic) -> None:
    whole = text_of(await client.messages.create(model=TINY_CHAT, max_tokens=12, messages=HELLO,
                                                 extra_body=GREEDY))
    words = whole.split()
    # The first word that is not part of an earlier one: the text stops right before it.
    stop = next(w for n, w in enumerate(words[2:], start=2) if w not in " ".join(words[:n]))
    stopped = await client.messages.create(model=TINY_CHAT, max_tokens=12, messages=HELLO,
                                           extra_body=GREEDY, stop_sequences=["w199", stop])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop
    assert text_of(stopped).rstrip() == whole[:whole.index(stop)].rstrip()
    assert stop not in text_of(stopped)


async def test_a_key_in_authorization_bearer_works_too(stack: Stack, key: str) -> None:
    async with sdk(stack, None, auth_token=key) as api:
        message = await api.messages.create(model=TINY_CHAT, max_tokens=2, messages=HELLO)
    assert message.usage.output_tokens == 2


async def test_invalid_requests_are_400_invalid_request_error(client: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as missing:
        # The SDK refuses to send this itself; its plain `post` sends anything.
        await client.post("/v1/messages", body={"model": TINY_CHAT, "messages": HELLO}, cast_to=object)
    assert missing.value.body["type"] == "error"  # type: ignore[index]
    assert missing.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "max_tokens" in missing.value.body["error"]["message"]  # type: ignore[index]
    assert missing.value.request_id
    with pytest.raises(anthropic.BadRequestError) as unsupported:
        await client.messages.create(model=TINY_CHAT, max_tokens=4, messages=HELLO,
                                     thinking={"type": "enabled", "budget_tokens": 1024})
    assert "thinking" in unsupported.value.body["error"]["message"]  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as image:
        await client.messages.create(model=TINY_CHAT, max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}]}])
    assert "messages[0].content[0]" in image.value.body["error"]["message"]  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as hot:
        await client.messages.create(model=TINY_CHAT, max_tokens=4, messages=HELLO,
                                     extra_body={"temperature": 1.5})
    assert "temperature" in hot.value.body["error"]["message"]  # type: ignore[index]


async def test_a_final_assistant_message_is_refused_as_a_prefill(client: anthropic.AsyncAnthropic) -> None:
    prefilled: list[MessageParam] = [*HELLO, {"role": "assistant", "content": "Sure"}]
    with pytest.raises(anthropic.BadRequestError) as refused:
        await client.messages.create(model=TINY_CHAT, max_tokens=2, messages=prefilled)
    assert refused.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "prefill" in refused.value.body["error"]["message"]  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError):
        await client.messages.count_tokens(model=TINY_CHAT, messages=prefilled)


async def test_a_strict_tool_is_taken(client: anthropic.AsyncAnthropic) -> None:
    strict: ToolParam = {**TIME, "strict": True}
    counted = await client.messages.count_tokens(model=TINY_CHAT, messages=HELLO, tools=[strict])
    message = await client.messages.create(model=TINY_CHAT, max_tokens=2, messages=HELLO, tools=[strict],
                                           tool_choice={"type": "none"})
    assert message.usage.input_tokens == counted.input_tokens and message.usage.output_tokens == 2


async def test_a_prompt_beyond_the_context_is_refused_as_anthropic_says_it(
    client: anthropic.AsyncAnthropic,
) -> None:
    long: list[MessageParam] = [{"role": "user", "content": " ".join(["w1"] * 5000)}]
    with pytest.raises(anthropic.BadRequestError) as refused:
        await client.messages.create(model=TINY_CHAT, max_tokens=2, messages=long)
    assert refused.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert refused.value.body["error"]["message"].startswith("prompt is too long: ")  # type: ignore[index]


async def test_an_undeclared_method_is_405_in_anthropics_shape(stack: Stack, key: str) -> None:
    async with httpx.AsyncClient(base_url=stack.http_url, timeout=60, headers={"x-api-key": key}) as http:
        reply = await http.get("/v1/messages")
    assert reply.status_code == 405 and reply.headers["allow"] == "POST"
    assert reply.json()["type"] == "error" and reply.json()["error"]["type"] == "invalid_request_error"


async def test_a_bad_key_is_401_authentication_error(stack: Stack) -> None:
    async with sdk(stack, "rh-not-a-key") as api:
        with pytest.raises(anthropic.AuthenticationError) as refused:
            await api.messages.create(model=TINY_CHAT, max_tokens=2, messages=HELLO)
        with pytest.raises(anthropic.AuthenticationError):
            await api.messages.count_tokens(model=TINY_CHAT, messages=HELLO)
    assert refused.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    assert refused.value.request_id


async def test_an_unknown_model_is_404_not_found_error(client: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        await client.messages.create(model="no-such-model", max_tokens=2, messages=HELLO)
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert "no-such-model" in missing.value.body["error"]["message"]  # type: ignore[index]


async def test_a_model_outside_the_keys_scope_is_403_permission_error(
    stack: Stack, admin: httpx.AsyncClient
) -> None:
    secret, _ = await new_key(admin, "anthropic-scoped", models=[TINY_EMBED])
    async with sdk(stack, secret) as api:
        with pytest.raises(anthropic.PermissionDeniedError) as refused:
            await api.messages.create(model=TINY_CHAT, max_tokens=2, messages=HELLO)
    assert refused.value.body["error"]["type"] == "permission_error"  # type: ignore[index]


async def test_over_the_rate_limit_is_429_rate_limit_error(stack: Stack, admin: httpx.AsyncClient) -> None:
    await clear_of_minute_boundary()
    secret, _ = await new_key(admin, "anthropic-limited", rpm=1)
    async with sdk(stack, secret) as api:
        await api.messages.create(model=TINY_CHAT, max_tokens=2, messages=HELLO)
        with pytest.raises(anthropic.RateLimitError) as refused:
            await api.messages.create(model=TINY_CHAT, max_tokens=2, messages=HELLO)
    assert refused.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert 1 <= int(refused.value.response.headers["retry-after"]) <= 60


async def test_messages_are_recorded_in_the_usage_ledger(
    stack: Stack, admin: httpx.AsyncClient, db_dsn: str
) -> None:
    secret, name = await new_key(admin, "anthropic-ledger")
    async with sdk(stack, secret) as api:
        whole = await api.messages.create(model="tiny-alias", max_tokens=3, messages=HELLO)
        async with api.messages.stream(model=TINY_CHAT, max_tokens=4, messages=HELLO) as stream:
            streamed = await stream.get_final_message()

    async def recorded() -> bool:
        return len(await ledger_rows(db_dsn, name)) == 2

    await wait_until(recorded, timeout=5, interval=0.1)
    rows = await ledger_rows(db_dsn, name)
    assert [r["route"] for r in rows] == ["tiny-alias", TINY_CHAT]
    assert all(r["status"] == "ok" and r["asset_id"] == TINY_CHAT for r in rows)
    assert [(r["prompt_tokens"], r["completion_tokens"]) for r in rows] == [
        (m.usage.input_tokens, m.usage.output_tokens) for m in (whole, streamed)]


async def test_the_openapi_document_has_the_messages_api(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.http_url, headers=stack.admin_headers) as http:
        document = (await http.get("/openapi.json")).json()
    create = document["paths"]["/v1/messages"]["post"]
    count = document["paths"]["/v1/messages/count_tokens"]["post"]
    error = {"$ref": "#/components/schemas/AnthropicErrorResponse"}
    for operation in (create, count):
        for status in ("400", "401", "403", "404", "429"):
            assert operation["responses"][status]["content"]["application/json"]["schema"] == error
    request = document["components"]["schemas"]["MessagesRequest"]
    assert {"model", "messages", "max_tokens"} <= set(request["required"])
    assert "text/event-stream" in create["responses"]["200"]["content"]


# -- the event stream and error shapes, from chunks (no network) -----------------------------


def chunk(**fields: Any) -> inference_pb2.ChatChunk:
    return inference_pb2.ChatChunk(asset_id="m", **fields)


def call(index: int, arguments: str, id: str = "", name: str = "") -> inference_pb2.ToolCallDelta:
    return inference_pb2.ToolCallDelta(index=index, id=id, name=name, arguments=arguments)


TOOL_CHUNKS = [
    chunk(delta="Let me look."),
    chunk(tool_calls=[call(0, "", id="call_a", name="get_weather")]),
    chunk(tool_calls=[call(0, '{"city": '), call(0, '"Paris"}')]),
    chunk(tool_calls=[call(1, '{"zone": "CET"}', id="call_b", name="get_time")]),
    chunk(finish_reason=inference_pb2.FINISH_REASON_TOOL_CALLS,
          usage=inference_pb2.Usage(prompt_tokens=30, completion_tokens=12, total_tokens=42)),
]


def parsed(events: list[bytes]) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each server-sent event, checking the name is the data's type."""
    out = []
    for event in b"".join(events).decode().split("\n\n")[:-1]:
        name_line, data_line = event.split("\n")
        name, data = name_line.removeprefix("event: "), json.loads(data_line.removeprefix("data: "))
        assert data["type"] == name
        out.append((name, data))
    return out


async def relayed(chunks: list[inference_pb2.ChatChunk], failure: Exception | None = None) -> list[bytes]:
    async def stream() -> AsyncIterator[inference_pb2.ChatChunk]:
        for item in chunks[1:]:
            yield item
        if failure is not None:
            raise failure

    events = MessageEvents("msg_1", "m")
    return [e async for e in message_events(chunks[0], stream(), events, request_id="r1")]


async def test_blocks_stream_in_the_order_the_model_wrote_them() -> None:
    events = parsed(await relayed(TOOL_CHUNKS))
    assert [name for name, _ in events] == [
        "message_start", "content_block_start", "ping", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
        "message_stop"]
    starts = [data for name, data in events if name == "content_block_start"]
    assert [s["index"] for s in starts] == [0, 1, 2]
    assert starts[1]["content_block"] == {"type": "tool_use", "id": "call_a", "name": "get_weather",
                                          "input": {}}
    pieces = [d["delta"]["partial_json"] for n, d in events
              if n == "content_block_delta" and d["index"] == 1]
    assert json.loads("".join(pieces)) == {"city": "Paris"}
    assert events[-2][1]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert events[-2][1]["usage"] == {"input_tokens": 30, "output_tokens": 12}

    builder = MessageBuilder()
    for item in TOOL_CHUNKS:
        builder.add(item)
    message = builder.message("msg_1", "m")
    assert [b.model_dump() for b in message.content] == [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_b", "name": "get_time", "input": {"zone": "CET"}}]
    assert message.stop_reason == "tool_use" and message.usage.output_tokens == 12


async def test_a_failure_midway_ends_the_stream_with_an_error_event() -> None:
    events = parsed(await relayed(TOOL_CHUNKS[:2], Overloaded("the model is busy")))
    name, data = events[-1]
    assert name == "error" and data["request_id"] == "r1"
    assert data["error"] == {"type": "overloaded_error", "message": "the model is busy"}


@pytest.mark.parametrize(("failure", "status", "kind"), [
    (Overloaded("busy"), 529, "overloaded_error"),
    (RateLimited("over rpm"), 429, "rate_limit_error"),
    (ModelNotReady("waking"), 503, "overloaded_error"),
    (UpstreamError("upstream down"), 502, "api_error"),
    (RuntimeError("a secret detail"), 500, "api_error"),
])
def test_failures_take_anthropics_status_and_type(failure: Exception, status: int, kind: str) -> None:
    got_status, body, headers = anthropic_error(failure, "r2")
    assert (got_status, body.error.type, body.type) == (status, kind, "error")
    assert "secret" not in body.error.message
    assert ("Retry-After" in headers) == (status in (429, 503, 529))


# -- tool use, on a model that can write JSON ---------------------------------------------------


@pytest.fixture(scope="module")
async def catalog_stack(db_dsn: str, nats_url: str, sources: Path, catalog_store: Any) -> AsyncIterator[Stack]:
    """The catalog chat model behind a router that checks no keys."""
    async with running_stack(db_dsn, nats_url, sources, catalog_store.root) as running:
        await running.apply(yaml.safe_load(CATALOG_DOCUMENT.read_text()))
        yield running


@pytest.fixture
async def catalog(catalog_stack: Stack) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with sdk(catalog_stack, "unused") as api:
        yield api


WEATHER_QUESTION: list[MessageParam] = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]


@pytest.mark.catalog
@pytest.mark.parametrize("choice", [{"type": "any"}, {"type": "tool", "name": "get_weather"}])
async def test_forced_tool_use_gives_input_that_follows_the_schema(
    catalog: anthropic.AsyncAnthropic, choice: dict[str, Any]
) -> None:
    message = await catalog.messages.create(model=CATALOG_CHAT, max_tokens=200, tools=[WEATHER, TIME],
                                            tool_choice=cast(ToolChoiceParam, choice),
                                            messages=WEATHER_QUESTION)
    calls = [block for block in message.content if block.type == "tool_use"]
    assert message.stop_reason == "tool_use" and calls
    for call in calls:
        tool = {"get_weather": WEATHER, "get_time": TIME}[call.name]
        jsonschema.validate(call.input, tool["input_schema"])
        assert call.id
    if choice["type"] == "tool":
        assert [call.name for call in calls] == ["get_weather"]


@pytest.mark.catalog
async def test_streamed_tool_use_arrives_as_input_json_deltas(catalog: anthropic.AsyncAnthropic) -> None:
    async with catalog.messages.stream(
        model=CATALOG_CHAT, max_tokens=200, tools=[WEATHER], messages=WEATHER_QUESTION,
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
    ) as stream:
        events = [event async for event in stream]
        final = await stream.get_final_message()
    starts = [e for e in events if e.type == "content_block_start"]
    assert [s.content_block.type for s in starts] == ["tool_use"]
    pieces = [e.delta.partial_json for e in events
              if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
    assert pieces and final.stop_reason == "tool_use"
    (call,) = final.content
    assert call.type == "tool_use" and call.name == "get_weather"
    jsonschema.validate(call.input, WEATHER["input_schema"])


@pytest.mark.catalog
async def test_a_tool_result_fed_back_gets_an_answer(catalog: anthropic.AsyncAnthropic) -> None:
    asked = await catalog.messages.create(
        model=CATALOG_CHAT, max_tokens=200, tools=[WEATHER], messages=WEATHER_QUESTION,
        tool_choice={"type": "tool", "name": "get_weather"})
    call = next(block for block in asked.content if block.type == "tool_use")
    conversation: list[Any] = [
        *WEATHER_QUESTION,
        {"role": "assistant", "content": asked.content},  # as the SDK's own examples do
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                      "content": "18 degrees celsius and sunny"}]},
    ]
    answer = await catalog.messages.create(model=CATALOG_CHAT, max_tokens=60, tools=[WEATHER],
                                           messages=conversation, tool_choice={"type": "none"})
    assert [block.type for block in answer.content] == ["text"] and text_of(answer).strip()
    assert answer.stop_reason in ("end_turn", "max_tokens")
    counted = await catalog.messages.count_tokens(model=CATALOG_CHAT, tools=[WEATHER],
                                                  messages=conversation, tool_choice={"type": "none"})
    assert counted.input_tokens == answer.usage.input_tokens


@pytest.mark.catalog
async def test_output_config_format_gives_json_that_follows_the_schema(
    catalog: anthropic.AsyncAnthropic,
) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}
    message = await catalog.messages.create(
        model=CATALOG_CHAT, max_tokens=120, output_config={"format": {"type": "json_schema", "schema": schema}},
        messages=[{"role": "user", "content": "Name a big city and its population."}])
    assert message.stop_reason == "end_turn"
    jsonschema.validate(json.loads(text_of(message)), schema)
