"""Structured outputs on the worker's model layer (no gRPC): `response_format` json_object and
json_schema enforced while decoding, alone and batched with free requests; grammars compiled
once per schema and held only while a model of their folder is; schemas too big to compile
refused by name at every door (the router's HTTP and gRPC fronts, a worker, the model layer).

A random-weight model says nothing sensible, so whatever parses and validates here does so
because the grammar allowed nothing else.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletionFunctionToolParam, ChatCompletionMessageParam
from openai.types.shared_params import ResponseFormatJSONSchema
from stack_harness import TINY_CHAT, Stack, running_stack, tiny_documents
from tiny_bpe import PLAIN, build_tiny_bpe_llama
from tiny_models import spec_for
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from roundhouse.v1 import inference_pb2, worker_pb2
from services.common.assetspec import AssetSpec
from services.common.errors import InvalidArgument
from services.common.inference_requests import check_chat
from services.common.request_schemas import (
    MAX_PATTERN_REPEAT,
    MAX_SCHEMA_CHARS,
    MAX_SCHEMA_DEPTH,
    MAX_SCHEMA_ENUM_VALUES,
)
from services.worker.models import ChatDelta, ChatParams, load_model
from services.worker.models.causal_lm import TransformersChatModel
from services.worker.models.structured import SHARED_COMPILERS, grammar_spec
from services.worker.models.types import ChatMessage, ResponseFormat

HELLO = [ChatMessage("user", "hello")]

PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "address", "active"],
    "additionalProperties": False,
}
"""Nested objects, an array, an enum, bounds and a pattern. Strings are bounded so that a random
model, which never chooses to close a string, still finishes within max_tokens."""


@pytest.fixture(scope="module")
async def bpe_llm(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TransformersChatModel]:
    folder = build_tiny_bpe_llama(tmp_path_factory.mktemp("structured") / "bpe-llm", PLAIN)
    model = await asyncio.to_thread(load_model, spec_for("bpe-llm", "llm-runtime", folder), folder)
    assert isinstance(model, TransformersChatModel)
    yield model
    await model.close()


async def run(model: TransformersChatModel, **params: Any) -> list[ChatDelta]:
    return [delta async for delta in model.chat(ChatParams(**params))]


def text_of(deltas: list[ChatDelta]) -> str:
    return "".join(d.text for d in deltas)


def schema_format(schema: dict[str, Any]) -> ResponseFormat:
    return ResponseFormat("json_schema", schema, name="person", strict=True)


def nested(levels: int) -> dict[str, Any]:
    """A schema nested `levels` deep (arrays of arrays ... of integers)."""
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(levels - 1):
        schema = {"type": "array", "items": schema}
    return schema


def with_enum(values: int) -> dict[str, Any]:
    return {"type": "object", "properties": {"a": {"enum": list(range(values // 2))},
                                             "b": {"enum": [f"v{i}" for i in range(values - values // 2)]}}}


def wide(chars: int) -> dict[str, Any]:
    """An object schema of about `chars` characters as compact JSON."""
    count = chars // len('"field_000000":{"type":"string"},')
    return {"type": "object", "properties": {f"field_{i:06d}": {"type": "string"} for i in range(count)}}


TOO_BIG = {
    "too deep": nested(MAX_SCHEMA_DEPTH + 1),
    "too many enum values": with_enum(MAX_SCHEMA_ENUM_VALUES + 1),
    "too long": wide(MAX_SCHEMA_CHARS + 1000),
    "a pattern repeated too often": {"type": "string", "pattern": f"^[a-z]{{2,{MAX_PATTERN_REPEAT + 1}}}$"},
}
"""Schemas over each bound; each under-bound twin below is accepted."""
AT_THE_BOUNDS = [nested(MAX_SCHEMA_DEPTH), with_enum(MAX_SCHEMA_ENUM_VALUES), wide(MAX_SCHEMA_CHARS - 1000),
                 {"type": "string", "pattern": f"^[a-z]{{2,{MAX_PATTERN_REPEAT}}}$"}]


async def test_capabilities_say_structured_output(bpe_llm: TransformersChatModel) -> None:
    assert bpe_llm.capabilities.supports_structured_output


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.5])
async def test_json_schema_answers_validate(bpe_llm: TransformersChatModel, temperature: float) -> None:
    for seed in range(4):
        deltas = await run(bpe_llm, messages=HELLO, max_tokens=400, temperature=temperature, seed=seed,
                           response_format=schema_format(PERSON))
        assert deltas[-1].finish_reason == "stop"
        jsonschema.validate(json.loads(text_of(deltas)), PERSON)


async def test_json_object_answers_parse_as_objects(bpe_llm: TransformersChatModel) -> None:
    tokenizer = bpe_llm._tokenizer
    # The random model never chooses to close anything; a bias toward `"` and `}` lets it end
    # well within max_tokens, while the grammar alone decides what is allowed.
    closing = {tokenizer.convert_tokens_to_ids(t): 3.0 for t in ('"', "}")}
    for seed in range(6):
        deltas = await run(bpe_llm, messages=HELLO, max_tokens=400, temperature=1.0, seed=seed,
                           response_format=ResponseFormat("json_object"), logit_bias=closing)
        assert deltas[-1].finish_reason == "stop"
        assert isinstance(json.loads(text_of(deltas)), dict)


async def test_unconstrained_answer_of_the_same_model_is_not_json(bpe_llm: TransformersChatModel) -> None:
    deltas = await run(bpe_llm, messages=HELLO, max_tokens=40, temperature=0)
    with pytest.raises(ValueError):
        json.loads(text_of(deltas))


async def test_constrained_and_free_requests_batched_together(bpe_llm: TransformersChatModel) -> None:
    alone = await run(bpe_llm, messages=HELLO, max_tokens=400, temperature=1.0, seed=7,
                      response_format=schema_format(PERSON))
    free_alone = await run(bpe_llm, messages=HELLO, max_tokens=30, temperature=0)
    constrained = [
        run(bpe_llm, messages=HELLO, max_tokens=400, temperature=1.0, seed=seed, response_format=schema_format(PERSON))
        for seed in (7, 8, 9, 10)
    ]
    free = [run(bpe_llm, messages=HELLO, max_tokens=30, temperature=0) for _ in range(2)]
    results = await asyncio.gather(*constrained, *free)
    for deltas in results[:4]:
        jsonschema.validate(json.loads(text_of(deltas)), PERSON)
    # A seeded request draws the same answer alone or in a batch; free rows are not masked.
    assert text_of(results[0]) == text_of(alone)
    for deltas in results[4:]:
        assert text_of(deltas) == text_of(free_alone) and deltas[-1].finish_reason == "length"


async def test_a_repeated_schema_compiles_once(bpe_llm: TransformersChatModel) -> None:
    grammars = bpe_llm.grammars()
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    before = grammars.compilations
    for _ in range(3):
        deltas = await run(bpe_llm, messages=HELLO, max_tokens=50, temperature=0, response_format=schema_format(schema))
        assert json.loads(text_of(deltas)) in ({"ok": True}, {"ok": False})
    assert grammars.compilations == before + 1


async def test_a_schema_the_engine_cannot_enforce_is_invalid_argument(bpe_llm: TransformersChatModel) -> None:
    with pytest.raises(InvalidArgument, match="schema"):
        await run(bpe_llm, messages=HELLO, max_tokens=5, response_format=schema_format({"type": "no-such-type"}))


async def test_requests_missing_the_same_grammar_together_compile_it_once(bpe_llm: TransformersChatModel) -> None:
    grammars = bpe_llm.grammars()
    schema = {"type": "object", "properties": {f"field_{i}": {"type": "string", "maxLength": 20} for i in range(40)}}
    spec = grammar_spec(ChatParams(messages=HELLO, response_format=schema_format(schema)))
    assert spec is not None
    requests = 8
    together = threading.Barrier(requests)

    def compile_after_the_others_arrive() -> object:
        together.wait()
        return grammars.compiled(spec)

    before = grammars.compilations
    with ThreadPoolExecutor(requests) as pool:
        compiled = list(pool.map(lambda _: compile_after_the_others_arrive(), range(requests)))
    assert grammars.compilations == before + 1
    assert all(c is compiled[0] for c in compiled)


async def test_requests_missing_the_same_unenforceable_schema_each_get_the_error(
    bpe_llm: TransformersChatModel,
) -> None:
    params = ChatParams(messages=HELLO, max_tokens=5, response_format=schema_format({"type": "no-such-type"}))
    outcomes = await asyncio.gather(*(run(bpe_llm, **vars(params)) for _ in range(4)), return_exceptions=True)
    assert all(isinstance(o, InvalidArgument) and "schema" in o.message for o in outcomes), outcomes


async def test_a_grammar_compiler_is_held_while_a_model_of_its_folder_is(tmp_path: Path) -> None:
    folder = build_tiny_bpe_llama(tmp_path / "shared-grammars", PLAIN)
    first, second = [await asyncio.to_thread(load_model, spec_for(name, "llm-runtime", folder), folder)
                     for name in ("first", "second")]
    assert isinstance(first, TransformersChatModel) and isinstance(second, TransformersChatModel)
    held = str(folder.resolve())
    try:
        assert held not in SHARED_COMPILERS.folders()  # built at the first constrained request
        answer = schema_format({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                                "additionalProperties": False})
        for model in (first, second):
            deltas = await run(model, messages=HELLO, max_tokens=60, temperature=0, response_format=answer)
            assert json.loads(text_of(deltas))["ok"] in (True, False)
        assert first.grammars() is second.grammars()  # one compiler, the schema compiled once
        assert first.grammars().compilations == 1
        assert held in SHARED_COMPILERS.folders()
        await first.close()
        assert held in SHARED_COMPILERS.folders()  # the second model still uses it
    finally:
        await first.close()
        await second.close()
    assert held not in SHARED_COMPILERS.folders()


@pytest.mark.parametrize("schema", TOO_BIG.values(), ids=TOO_BIG.keys())
async def test_a_schema_too_big_to_compile_is_refused_by_name(bpe_llm: TransformersChatModel,
                                                             schema: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument) as refused:
        await run(bpe_llm, messages=HELLO, max_tokens=5, response_format=schema_format(schema))
    assert refused.value.field == "response_format.json_schema.schema"
    request = inference_pb2.ChatRequest(model="m", messages=[inference_pb2.ChatMessage(role="user", content="hi")],
                                        response_format=inference_pb2.ResponseFormat(
                                            type="json_schema", schema_json=json.dumps(schema, indent=1)))
    with pytest.raises(InvalidArgument) as refused:
        check_chat(request)  # what the router and a worker check first
    assert refused.value.field == "response_format.json_schema.schema"


@pytest.mark.parametrize("schema", AT_THE_BOUNDS, ids=TOO_BIG.keys())
def test_a_schema_at_the_bounds_is_accepted(schema: dict[str, Any]) -> None:
    ChatParams(messages=HELLO, response_format=schema_format(schema)).validate()
    check_chat(inference_pb2.ChatRequest(model="m", messages=[inference_pb2.ChatMessage(role="user", content="hi")],
                                         response_format=inference_pb2.ResponseFormat(
                                             type="json_schema", schema_json=json.dumps(schema))))


def error_param(error: openai.APIStatusError) -> object:
    assert isinstance(error.body, dict)
    return error.body.get("param")


@pytest.fixture(scope="module")
async def stack(db_dsn: str, nats_url: str, sources: Path,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with running_stack(db_dsn, nats_url, sources, tmp_path_factory.mktemp("store")) as running:
        await running.apply(*tiny_documents(sources))
        yield running


async def test_every_door_refuses_a_too_deep_schema_before_any_worker_works(
    stack: Stack, client: openai.AsyncOpenAI
) -> None:
    deep = nested(MAX_SCHEMA_DEPTH + 1)
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
    answer: ResponseFormatJSONSchema = {"type": "json_schema", "json_schema": {"name": "deep", "schema": deep}}
    tools: list[ChatCompletionFunctionToolParam] = [
        {"type": "function", "function": {"name": "fine", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "deep", "parameters": {"type": "object", "properties": {"x": deep}}}},
    ]
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(model=TINY_CHAT, messages=messages, max_tokens=2, response_format=answer)
    assert error_param(refused.value) == "response_format.json_schema.schema"
    assert str(MAX_SCHEMA_DEPTH) in refused.value.message
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(model=TINY_CHAT, messages=messages, max_tokens=2, tools=tools)
    assert error_param(refused.value) == "tools[1].function.parameters"
    request = inference_pb2.ChatRequest(
        model=TINY_CHAT, messages=[inference_pb2.ChatMessage(role="user", content="hi")], max_tokens=2,
        response_format=inference_pb2.ResponseFormat(type="json_schema", schema_json=json.dumps(deep)))
    for stub in (stack.inference, stack.workers[0].inference):  # the router's gRPC front, a worker
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            async for _ in stub.Chat(request, timeout=60):
                pass
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (failed.value.details() or "").startswith("response_format.json_schema.schema: ")
    info = await stack.workers[0].control.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest())
    assert TINY_CHAT not in {m.asset_id for m in info.models}, "the model was woken for a refused request"


@pytest.mark.catalog
async def test_catalog_model_answers_follow_a_schema(catalog_store: Any) -> None:
    from services.common.documents import load_path

    catalog = {item.spec.asset_id: item.spec for item in load_path(Path(__file__).parents[1] / "deploy" / "catalog")
               if isinstance(item.spec, AssetSpec)}
    folder = Path(catalog_store.folder_for(catalog["smollm2-135m-instruct"].source))
    model = await asyncio.to_thread(load_model, spec_for("smollm2-135m-instruct", "llm-runtime", folder), folder)
    assert isinstance(model, TransformersChatModel)
    schema = {**PERSON, "properties": {**PERSON["properties"], "name": {"type": "string"}}}
    try:
        for who in ("a French baker", "a retired astronaut", "a teenage chess champion"):
            messages = [{"role": "user", "content": f"Describe {who} as a JSON object."}]
            deltas = await run(model, messages=messages, max_tokens=200, temperature=0,
                               response_format=schema_format(schema))
            assert deltas[-1].finish_reason == "stop"
            jsonschema.validate(json.loads(text_of(deltas)), schema)
    finally:
        await model.close()


async def test_a_model_without_an_end_token_ends_a_complete_answer(tmp_path: Path) -> None:
    folder = build_tiny_bpe_llama(tmp_path / "no-eos", PLAIN)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.eos_token = None
    tokenizer.save_pretrained(folder)
    config = AutoConfig.from_pretrained(folder)
    config.eos_token_id = None
    config.save_pretrained(folder)
    GenerationConfig(pad_token_id=config.pad_token_id).save_pretrained(folder)
    model = await asyncio.to_thread(load_model, spec_for("no-eos", "llm-runtime", folder), folder)
    assert isinstance(model, TransformersChatModel)
    try:
        answer = schema_format({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                                "additionalProperties": False})
        deltas = await run(model, messages=HELLO, max_tokens=200, temperature=0, response_format=answer)
        assert json.loads(text_of(deltas))["ok"] in (True, False)
        assert deltas[-1].finish_reason == "stop"  # ended by the grammar, not by max_tokens
    finally:
        await model.close()
