"""The `anthropic` runtime without a stack: the spec, the Messages request built from a chat,
and Anthropic's streamed answers and errors (recorded wire text, served over real HTTP)
turned into deltas and domain errors. Against a second Roundhouse: test_anthropic_upstream_stack."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from services.common.anthropic_upstream import event_error, sse_events
from services.common.asset_proto import spec_from_proto, spec_to_proto
from services.common.assetspec import Generation, parse_spec
from services.common.errors import (
    ContextLengthExceeded,
    InvalidArgument,
    InvalidSpec,
    Overloaded,
    UpstreamError,
)
from services.worker.models import AnthropicRemoteModel, ChatParams, Tool, load_model
from services.worker.models.anthropic_messages import DEFAULT_MAX_TOKENS, MessagesStream, conversation, sampling
from services.worker.models.types import ResponseFormat, ToolCall, ToolChoice

KEY = "sk-ant-test-0123456789abcdef"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "upstreams.md"
WEATHER = Tool("get_weather", "Weather of a city", {"type": "object", "properties": {"city": {"type": "string"}},
                                                    "required": ["city"]})

# Anthropic's streamed answer with text and a tool call, as its API sends it.
TOOL_STREAM = """\
event: message_start
data: {"type":"message_start","message":{"id":"msg_014p7gG3wDgGV9EUtLvnow3U","type":"message","role":"assistant",\
"model":"claude-sonnet-4-5","stop_sequence":null,"usage":{"input_tokens":472,"output_tokens":2,\
"cache_read_input_tokens":8},"content":[],"stop_reason":null}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Okay"}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":", checking."}}

event: content_block_stop
data: {"type":"content_block_stop","index":0}

event: content_block_start
data: {"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6",\
"name":"get_weather","input":{}}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\\"city\\":"}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":" \\"Paris\\"}"}}

event: content_block_stop
data: {"type":"content_block_stop","index":1}

event: content_block_start
data: {"type":"content_block_start","index":2,"content_block":{"type":"tool_use","id":"toolu_02","name":"now",\
"input":{}}}

event: content_block_stop
data: {"type":"content_block_stop","index":2}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":89}}

event: message_stop
data: {"type":"message_stop"}

"""

STOPPED_STREAM = """\
event: message_start
data: {"type":"message_start","message":{"usage":{"input_tokens":12,"output_tokens":1},"content":[]}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"one, two"}}

event: content_block_stop
data: {"type":"content_block_stop","index":0}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"stop_sequence","stop_sequence":", three"},\
"usage":{"output_tokens":4}}

event: message_stop
data: {"type":"message_stop"}

"""

OVERLOADED_MID_STREAM = STOPPED_STREAM.split("event: content_block_stop")[0] + """\
event: error
data: {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}

"""


def chat(*messages: dict[str, Any], **fields: Any) -> ChatParams:
    return ChatParams(messages=list(messages), **fields)  # type: ignore[arg-type]  # dicts are taken


def spec(url: str = "https://api.anthropic.com", **fields: Any):
    return parse_spec({"asset_id": "claude", "interface": "llm-runtime", "runtime": "anthropic",
                       "source": {"kind": "url", "url": url, "api_key_env": "ANTHROPIC_API_KEY",
                                  "upstream_model": "claude-sonnet-4-5"}, **fields})


async def lines(text: str) -> AsyncIterator[bytes]:
    for line in text.encode().splitlines(keepends=True):
        yield line


async def answer(text: str) -> list[Any]:
    stream = MessagesStream()
    deltas = [d async for event in sse_events(lines(text)) for d in stream.feed(event)]
    return [*deltas, stream.last()]


# --- the spec -----------------------------------------------------------------------------


def test_an_anthropic_asset_is_a_url_source_that_chats() -> None:
    parsed = spec(metadata={"context_length": 200000}, generation={"temperature": 0.7, "max_tokens": 1024})
    assert parsed.runtime == "anthropic"
    carried = spec_from_proto(spec_to_proto(parsed))  # as the registry hands it to workers
    assert (carried.runtime, carried.source, carried.generation.max_tokens) == ("anthropic", parsed.source, 1024)
    refusals: list[tuple[dict[str, Any], str]] = [
        ({"source": {"kind": "hf", "repo": "org/name"}}, "runtime: 'anthropic' goes with source kind 'url'"),
        ({"interface": ["llm-runtime", "embedding-runtime"]}, "interface: runtime 'anthropic' serves llm-runtime"),
        ({"generation": {"temperature": 1.5}}, "generation.temperature: runtime 'anthropic' takes 0 to 1"),
        ({"source": {"kind": "url", "url": "http://169.254.169.254/"}}, "source.url: 169.254.169.254 is a link"),
        ({"source": {"kind": "url", "url": "https://api.anthropic.com", "api_key_env": "ROUNDHOUSE_DATABASE_URL"}},
         "source.api_key_env: ROUNDHOUSE_DATABASE_URL is a Roundhouse setting"),
    ]
    for change, named in refusals:
        document = {"asset_id": "claude", "interface": "llm-runtime", "runtime": "anthropic",
                    "source": {"kind": "url", "url": "https://api.anthropic.com"}, **change}
        with pytest.raises(InvalidSpec) as refused:
            parse_spec(document)
        assert any(str(p).startswith(named) for p in refused.value.problems), refused.value.problems


def test_loading_refuses_a_key_variable_the_worker_does_not_allow(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.common.upstreams import UpstreamRules

    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    model = load_model(spec(metadata={"context_length": 200000}), None)
    assert isinstance(model, AnthropicRemoteModel)
    caps = model.capabilities
    assert (caps.context_length, caps.tool_calling, caps.supports_structured_output, caps.streaming) == (
        200000, "upstream", True, True)
    with pytest.raises(InvalidSpec, match="source.api_key_env: ANTHROPIC_API_KEY is not an allowed"):
        load_model(spec(), None, upstreams=UpstreamRules(key_envs=("OPENAI_API_KEY",)))


# --- the request --------------------------------------------------------------------------


def test_a_conversation_becomes_system_turns_and_blocks() -> None:
    call = ToolCall("toolu_1", "get_weather", '{"city": "Paris"}')
    params = chat(
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": (call,)},
        {"role": "tool", "content": "18 C", "tool_call_id": "toolu_1"},
        {"role": "user", "content": "And tomorrow?"},
        {"role": "developer", "content": "Answer in French."},
        tools=[WEATHER, Tool("now")], tool_choice=ToolChoice("function", "get_weather"), parallel_tool_calls=False,
    )
    assert conversation(params) == {
        "system": "Be brief.\n\nAnswer in French.",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "18 C"},
                                         {"type": "text", "text": "And tomorrow?"}]},
        ],
        "tools": [{"name": "get_weather", "description": "Weather of a city", "input_schema": WEATHER.parameters},
                  {"name": "now", "input_schema": {"type": "object", "properties": {}}}],
        "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
    }


@pytest.mark.parametrize(("choice", "expected"), [
    (None, None), (ToolChoice("auto"), {"type": "auto"}), (ToolChoice("none"), {"type": "none"}),
    (ToolChoice("required"), {"type": "any"}),
])
def test_tool_choice_maps_to_anthropic(choice: ToolChoice | None, expected: dict | None) -> None:
    params = chat({"role": "user", "content": "hi"}, tools=[WEATHER], tool_choice=choice)
    assert conversation(params).get("tool_choice") == expected


def test_sampling_applies_the_asset_defaults_and_max_tokens_is_always_set() -> None:
    params = chat({"role": "user", "content": "hi"}, top_k=40, stop=["\n\n"])
    assert sampling(params, Generation()) == {"max_tokens": DEFAULT_MAX_TOKENS, "top_k": 40, "stop_sequences": ["\n\n"]}
    defaults = Generation(temperature=0.2, top_p=0.9, max_tokens=300)
    assert sampling(params, defaults) == {"max_tokens": 300, "temperature": 0.2, "top_p": 0.9, "top_k": 40,
                                          "stop_sequences": ["\n\n"]}
    mine = chat({"role": "user", "content": "hi"}, temperature=0, top_p=1, max_tokens=5)
    assert sampling(mine, defaults) == {"max_tokens": 5, "temperature": 0, "top_p": 1}


def test_a_json_schema_goes_as_the_output_format_and_strict_tools_stay_strict() -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    params = chat({"role": "user", "content": "6 x 7?"}, response_format=ResponseFormat("json_schema", schema))
    assert sampling(params, Generation())["output_config"] == {"format": {"type": "json_schema", "schema": schema}}
    strict = Tool("get_weather", "", WEATHER.parameters, strict=True)
    assert conversation(chat({"role": "user", "content": "hi"}, tools=[strict]))["tools"] == [
        {"name": "get_weather", "input_schema": WEATHER.parameters, "strict": True}]


@pytest.mark.parametrize(("fields", "named"), [
    ({"temperature": 1.5}, "temperature: runtime anthropic takes 0 to 1"),
    ({"n": 2}, "n: runtime anthropic answers one choice"),
    ({"logprobs": True}, "logprobs: is not supported"),
    ({"presence_penalty": 0.5}, "presence_penalty: is not supported"),
    ({"frequency_penalty": -1}, "frequency_penalty: is not supported"),
    ({"logit_bias": {42: 5.0}}, "logit_bias: is not supported"),
    ({"seed": 7}, "seed: is not supported"),
    ({"response_format": ResponseFormat("json_object")},
     "response_format: json_object is not supported by runtime anthropic; send json_schema"),
])
def test_what_the_messages_api_cannot_do_is_refused_by_name(fields: dict[str, Any], named: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(named)) as refused:
        sampling(chat({"role": "user", "content": "hi"}, **fields), Generation())
    assert refused.value.field == named.split(":")[0]


@pytest.mark.parametrize(("params", "named"), [
    (ChatParams(prompt="Once upon"), "prompt: runtime anthropic serves chat messages only"),
    (chat({"role": "tool", "content": "42"}), "messages[0].tool_call_id: a tool message must name"),
    (chat({"role": "user", "content": "hi"}, {"role": "function", "content": "x"}), "messages[1].role:"),
    (chat({"role": "user", "content": ""}), "messages[0].content: must not be empty"),
    (chat({"role": "assistant", "content": "", "tool_calls": (ToolCall("c", "f", "[1]"),)}),
     "messages[0].tool_calls[0].arguments: must be a JSON object"),
    (chat({"role": "assistant", "content": "", "tool_calls": (ToolCall("c", "f", "{oops"),)}),
     "messages[0].tool_calls[0].arguments: not valid JSON"),
])
def test_messages_the_api_cannot_take_are_refused_by_name(params: ChatParams, named: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(named)):
        conversation(params)


# --- the answer ---------------------------------------------------------------------------


async def test_text_and_tool_calls_stream_as_openai_streams_them() -> None:
    deltas = await answer(TOOL_STREAM)
    assert "".join(d.text for d in deltas) == "Okay, checking."
    calls = [c for d in deltas for c in d.tool_calls]
    assert (calls[0].index, calls[0].id, calls[0].name, calls[0].arguments) == (
        0, "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "get_weather", "")
    assert "".join(c.arguments for c in calls if c.index == 0) == '{"city": "Paris"}'
    assert json.loads("".join(c.arguments for c in calls if c.index == 1)) == {}  # a call without arguments
    assert [(c.id, c.name) for c in calls if c.index == 1][0] == ("toolu_02", "now")
    last = deltas[-1]
    assert last.finish_reason == "tool_calls"
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (480, 89)


async def test_a_stop_sequence_finishes_with_stop_and_is_reported() -> None:
    deltas = await answer(STOPPED_STREAM)
    assert [d.text for d in deltas] == ["one, two", ""]
    assert (deltas[-1].finish_reason, deltas[-1].stop_sequence) == ("stop", ", three")
    assert (deltas[-1].usage.prompt_tokens, deltas[-1].usage.completion_tokens) == (12, 4)


async def test_max_tokens_finishes_with_length() -> None:
    text = STOPPED_STREAM.replace('"stop_reason":"stop_sequence","stop_sequence":", three"',
                                  '"stop_reason":"max_tokens","stop_sequence":null')
    assert (await answer(text))[-1].finish_reason == "length"


def test_error_events_keep_their_meaning() -> None:
    assert isinstance(event_error({"type": "overloaded_error", "message": "Overloaded"}), Overloaded)
    assert isinstance(event_error({"type": "rate_limit_error", "message": "slow down"}), Overloaded)
    too_long = event_error({"type": "invalid_request_error", "message": "prompt is too long: 210000 tokens > 200000"})
    assert isinstance(too_long, ContextLengthExceeded)
    assert type(event_error({"type": "invalid_request_error", "message": "bad"})) is InvalidArgument
    failed = event_error({"type": "api_error", "message": "Internal server error"})
    assert type(failed) is UpstreamError and "api_error" in failed.message


# --- over HTTP: recorded answers and refusals from a loopback server ------------------------


class Recorded:
    """A loopback server that answers `/v1/messages` with recorded wire text and records the
    requests it got (headers and bodies)."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.reply: tuple[int, str, dict[str, str]] = (200, TOOL_STREAM, {})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((dict(request.headers), await request.json()))
        status, body, headers = self.reply
        if request.path.endswith("/count_tokens"):
            return web.json_response({"input_tokens": 31})
        kind = "text/event-stream" if status == 200 else "application/json"
        return web.Response(status=status, text=body, content_type=kind, headers=headers)


@pytest.fixture
async def recorded() -> AsyncIterator[tuple[Recorded, str]]:
    server = Recorded()
    app = web.Application()
    app.router.add_post("/v1/messages", server.handle)
    app.router.add_post("/v1/messages/count_tokens", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, sock)
    await site.start()
    try:
        yield server, f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await runner.cleanup()


async def test_a_chat_is_posted_with_the_key_and_version_and_streams_back(
    recorded: tuple[Recorded, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, url = recorded
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    model = load_model(spec(url + "/v1", generation={"max_tokens": 77}), None)
    params = chat({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
                  tools=[WEATHER], temperature=0.3)
    try:
        deltas = [d async for d in model.chat(params)]
        counted = await model.count_tokens(params)  # type: ignore[attr-defined]
    finally:
        await model.close()
    assert "".join(d.text for d in deltas) == "Okay, checking." and deltas[-1].finish_reason == "tool_calls"
    assert deltas[-1].phases is not None and deltas[-1].phases.end_ns >= deltas[-1].phases.first_token_ns > 0
    assert counted == 31
    (headers, body), (count_headers, count_body) = server.requests
    assert headers["x-api-key"] == KEY and headers["anthropic-version"] == "2023-06-01"
    assert "Authorization" not in headers
    assert body["model"] == "claude-sonnet-4-5" and body["stream"] is True and body["max_tokens"] == 77
    assert body["system"] == "Be brief." and body["temperature"] == 0.3 and body["tools"][0]["name"] == "get_weather"
    assert count_body == {"model": "claude-sonnet-4-5", "system": "Be brief.", "messages": body["messages"],
                          "tools": body["tools"]}


def anthropic_error(kind: str, message: str) -> str:
    return json.dumps({"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_1"})


@pytest.mark.parametrize(("reply", "error", "words"), [
    ((401, anthropic_error("authentication_error", f"invalid x-api-key {KEY}"), {}), UpstreamError,
     "upstream refused the key in ANTHROPIC_API_KEY: upstream returned HTTP 401 (authentication_error)"),
    ((404, anthropic_error("not_found_error", "model: claude-sonnet-4-5"), {}), UpstreamError,
     "upstream has no model 'claude-sonnet-4-5' or no Messages API at"),
    ((429, anthropic_error("rate_limit_error", "Number of requests has exceeded your rate limit"),
      {"Retry-After": "17"}), Overloaded, "HTTP 429 (rate_limit_error)"),
    ((529, anthropic_error("overloaded_error", "Overloaded"), {}), Overloaded, "HTTP 529 (overloaded_error)"),
    ((500, anthropic_error("api_error", "Internal server error"), {}), UpstreamError, "HTTP 500 (api_error)"),
    ((502, "<html>Bad Gateway</html>", {}), UpstreamError, "HTTP 502: <html>Bad Gateway</html>"),
    ((400, anthropic_error("invalid_request_error", "prompt is too long: 210000 tokens > 200000 maximum"), {}),
     ContextLengthExceeded, "prompt is too long"),
    ((400, anthropic_error("invalid_request_error", "top_k: Input should be greater than 0"), {}),
     InvalidArgument, "HTTP 400 (invalid_request_error): top_k"),
    ((200, OVERLOADED_MID_STREAM, {}), Overloaded, "upstream error (overloaded_error): Overloaded"),
    ((200, STOPPED_STREAM.split("event: message_stop")[0], {}), UpstreamError, "ended before message_stop"),
])
async def test_refusals_become_domain_errors_without_the_key(
    recorded: tuple[Recorded, str], monkeypatch: pytest.MonkeyPatch,
    reply: tuple[int, str, dict[str, str]], error: type[Exception], words: str,
) -> None:
    server, url = recorded
    server.reply = reply
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    model = load_model(spec(url), None)
    try:
        with pytest.raises(error) as failed:
            [d async for d in model.chat(chat({"role": "user", "content": "hi"}))]
    finally:
        await model.close()
    assert type(failed.value) is error and words in str(failed.value) and KEY not in str(failed.value)
    if reply[0] == 429:
        assert failed.value.retry_after_s == 17  # type: ignore[attr-defined]


async def test_an_upstream_that_does_not_answer_is_an_upstream_error(monkeypatch: pytest.MonkeyPatch) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound, never listening: the connection is refused
    model = load_model(spec(f"http://127.0.0.1:{sock.getsockname()[1]}"), None)
    try:
        with pytest.raises(UpstreamError, match="upstream request failed"):
            [d async for d in model.chat(chat({"role": "user", "content": "hi"}))]
    finally:
        await model.close()
        sock.close()


# --- the documentation --------------------------------------------------------------------


def test_every_yaml_example_in_the_upstreams_guide_is_a_valid_asset() -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), re.DOTALL)
    assert len(blocks) >= 9
    runtimes = set()
    for block in blocks:
        for document in yaml.safe_load_all(block):
            parsed = parse_spec(document)
            assert parsed.source.kind == "url"
            runtimes.add(parsed.runtime)
    assert runtimes == {"anthropic", "openai"}
