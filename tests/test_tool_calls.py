"""Tool calls, n > 1 and log probabilities on the worker's model layer (no gRPC).

Two tiny random-weight models with a byte-level tokenizer: one whose template has a tool slot
like Qwen's (`tool_calling` "template"), one plain ChatML without (`"constrained"`: the tools are
described in the system prompt). Either way the calls are produced by constrained decoding.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import pytest
from tiny_bpe import PLAIN, QWEN_LIKE, build_tiny_bpe_llama
from tiny_models import spec_for

from roundhouse.v1 import inference_pb2
from services.common.errors import InvalidArgument
from services.common.inference_requests import check_chat
from services.common.request_schemas import MAX_SCHEMA_CHARS, MAX_SCHEMA_DEPTH
from services.worker.models import ChatDelta, ChatParams, Tool, load_model
from services.worker.models.causal_lm import TransformersChatModel
from services.worker.models.chat_template import PromptBuilder
from services.worker.models.types import ChatMessage, ToolCall, ToolChoice

HELLO = [ChatMessage("user", "What is the weather in Paris?")]
WEATHER = Tool("get_weather", "The weather in a city", {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
})
SEARCH = Tool("search", "Search the web", {
    "type": "object",
    "properties": {"query": {"type": "string", "maxLength": 12}, "limit": {"type": "integer", "minimum": 1,
                                                                           "maximum": 9}},
    "required": ["query"],
    "additionalProperties": False,
})
PING = Tool("ping")
TOOLS = [WEATHER, SEARCH, PING]
BY_NAME = {t.name: t for t in TOOLS}
NO_TOOL_ROLE = (
    "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool role') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


async def load(tmp_path_factory: pytest.TempPathFactory, name: str, template: str) -> TransformersChatModel:
    folder = build_tiny_bpe_llama(tmp_path_factory.mktemp("tools") / name, template)
    model = await asyncio.to_thread(load_model, spec_for(name, "llm-runtime", folder), folder)
    assert isinstance(model, TransformersChatModel)
    return model


@pytest.fixture(scope="module", params=["constrained", "template"])
async def llm(request: pytest.FixtureRequest,
              tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TransformersChatModel]:
    template = PLAIN if request.param == "constrained" else QWEN_LIKE
    model = await load(tmp_path_factory, f"tools-{request.param}", template)
    assert model.capabilities.tool_calling == request.param and model.capabilities.supports_tools
    yield model
    await model.close()


async def run(model: TransformersChatModel, **params: Any) -> list[ChatDelta]:
    return [delta async for delta in model.chat(ChatParams(messages=HELLO, **params))]


def calls_of(deltas: list[ChatDelta], choice: int = 0) -> list[dict[str, str]]:
    """The calls streamed in deltas, checked to come as OpenAI streams them."""
    calls: list[dict[str, str]] = []
    for delta in (d for d in deltas if d.index == choice):
        for piece in delta.tool_calls:
            if piece.id:
                assert piece.index == len(calls) and re.fullmatch(r"call_[A-Za-z0-9]{24}", piece.id)
                assert piece.name and piece.arguments == ""
                calls.append({"id": piece.id, "name": piece.name, "arguments": ""})
            else:
                assert piece.index == len(calls) - 1 and not piece.name
                calls[-1]["arguments"] += piece.arguments
    return calls


def check_call(call: dict[str, str]) -> None:
    tool = BY_NAME[call["name"]]
    jsonschema.validate(json.loads(call["arguments"]), tool.parameters or {"type": "object"})


async def test_required_makes_valid_calls(llm: TransformersChatModel) -> None:
    for seed in range(3):
        deltas = await run(llm, tools=TOOLS, tool_choice=ToolChoice("required"), max_tokens=300, temperature=1.0,
                           seed=seed)
        calls = calls_of(deltas)
        assert calls and deltas[-1].finish_reason == "tool_calls"
        assert "".join(d.text for d in deltas) == ""
        for call in calls:
            check_call(call)


async def test_named_function_makes_exactly_that_call(llm: TransformersChatModel) -> None:
    deltas = await run(llm, tools=TOOLS, tool_choice=ToolChoice("function", "search"), max_tokens=300, temperature=0)
    calls = calls_of(deltas)
    assert [c["name"] for c in calls] == ["search"] and deltas[-1].finish_reason == "tool_calls"
    check_call(calls[0])


async def test_parallel_tool_calls_false_makes_one_call(llm: TransformersChatModel) -> None:
    for seed in range(3):
        deltas = await run(llm, tools=TOOLS, tool_choice=ToolChoice("required"), parallel_tool_calls=False,
                           max_tokens=300, temperature=1.0, seed=seed)
        assert len(calls_of(deltas)) == 1


async def test_auto_gives_text_or_calls(llm: TransformersChatModel) -> None:
    for seed in range(4):
        deltas = await run(llm, tools=TOOLS, max_tokens=60, temperature=1.0, seed=seed)
        text, calls = "".join(d.text for d in deltas), calls_of(deltas)
        assert bool(text) != bool(calls)
        if text:
            assert not text.startswith("<") and deltas[-1].finish_reason in ("stop", "length")
        else:
            assert deltas[-1].finish_reason in ("tool_calls", "length")


async def test_none_gives_text(llm: TransformersChatModel) -> None:
    deltas = await run(llm, tools=TOOLS, tool_choice=ToolChoice("none"), max_tokens=20, temperature=0)
    assert "".join(d.text for d in deltas) and not any(d.tool_calls for d in deltas)
    assert deltas[-1].finish_reason == "length"


async def test_tool_descriptions_count_as_prompt_tokens(llm: TransformersChatModel) -> None:
    bare = llm.count_tokens(ChatParams(messages=HELLO))
    with_tools = llm.count_tokens(ChatParams(messages=HELLO, tools=TOOLS))
    assert with_tools > bare
    deltas = await run(llm, tools=TOOLS, max_tokens=5, temperature=0)
    assert deltas[-1].usage is not None and deltas[-1].usage.prompt_tokens == with_tools


def conversation() -> list[ChatMessage]:
    call = ToolCall("call_abc123", "get_weather", '{"city": "Paris", "unit": "celsius"}')
    return [
        ChatMessage("user", "What is the weather in Paris?"),
        ChatMessage("assistant", "", tool_calls=(call,)),
        ChatMessage("tool", "18 degrees and sunny", tool_call_id="call_abc123"),
    ]


@pytest.mark.parametrize(("template", "mode", "expected"), [
    (QWEN_LIKE, "template", ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"',
                             "<tool_response>\n18 degrees and sunny\n</tool_response>", "# Tools"]),
    (PLAIN, "constrained", ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"',
                            "<|im_start|>tool\n18 degrees and sunny", "You can call these functions",
                            '"name": "search"']),
    (NO_TOOL_ROLE, "constrained", ["Result of get_weather (call call_abc123): 18 degrees and sunny"]),
])
def test_tool_results_and_earlier_calls_render_into_the_prompt(template: str, mode: str, expected: list[str]) -> None:
    from tiny_bpe import bpe_tokenizer

    tokenizer = bpe_tokenizer(template)
    builder = PromptBuilder(tokenizer, supports_system_role=True, tool_calling=mode)
    prompt = tokenizer.decode(builder.prompt_ids(ChatParams(messages=conversation(), tools=TOOLS)))
    for text in expected:
        assert text in prompt


async def test_n_choices_come_indexed_with_usage_of_all(llm: TransformersChatModel) -> None:
    deltas = await run(llm, n=3, max_tokens=8, temperature=1.0, seed=5, logprobs=True, top_logprobs=2)
    finals = [d for d in deltas if d.finish_reason is not None]
    assert sorted(d.index for d in finals) == [0, 1, 2]
    assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == 24
    assert all(d.usage is None for d in deltas[:-1])
    for choice in range(3):
        mine = [d for d in deltas if d.index == choice]
        alone = await run(llm, max_tokens=8, temperature=1.0, seed=5 + choice)
        assert "".join(d.text for d in mine) == "".join(d.text for d in alone)
        logprobs = [lp for d in mine for lp in d.logprobs]
        assert len(logprobs) == 8
        # A token may hold part of a character: its bytes, joined, give the text.
        assert b"".join(lp.bytes for lp in logprobs).decode(errors="replace") == "".join(d.text for d in mine)
        for lp in logprobs:
            assert lp.logprob <= 0 and len(lp.top) == 2 and lp.top[0].logprob >= lp.top[1].logprob


async def test_n_choices_of_tool_calls(llm: TransformersChatModel) -> None:
    deltas = await run(llm, n=2, tools=TOOLS, tool_choice=ToolChoice("required"), max_tokens=300, temperature=1.0,
                       seed=11)
    for choice in (0, 1):
        calls = calls_of(deltas, choice)
        assert calls
        for call in calls:
            check_call(call)


def deep_parameters() -> dict[str, Any]:
    """Objects in objects: each takes two levels (its schema, its `properties`), one too many."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(MAX_SCHEMA_DEPTH // 2):
        schema = {"type": "object", "properties": {"inner": schema}}
    return schema


def many_properties(count: int) -> dict[str, Any]:
    return {"type": "object", "properties": {f"p{i:05d}": {"type": "integer"} for i in range(count)}}


@pytest.mark.parametrize(("tools", "field"), [
    ([WEATHER, Tool("deep", "", deep_parameters())], "tools[1].function.parameters"),
    # Each under the bound, too big together: the tools make one grammar.
    ([Tool(f"t{n}", "", many_properties(MAX_SCHEMA_CHARS // 2 // 26)) for n in range(3)], "tools"),
], ids=["one too deep", "too long together"])
async def test_tool_schemas_too_big_to_compile_are_refused_by_name(llm: TransformersChatModel, tools: list[Tool],
                                                                   field: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        await run(llm, tools=tools, tool_choice=ToolChoice("required"), max_tokens=5)
    assert refused.value.field == field
    request = inference_pb2.ChatRequest(
        model="m", messages=[inference_pb2.ChatMessage(role="user", content="hi")],
        tools=[inference_pb2.Tool(name=t.name, parameters_json=json.dumps(t.parameters)) for t in tools])
    with pytest.raises(InvalidArgument) as refused:
        check_chat(request)  # what the router and a worker check first
    assert refused.value.field == field
