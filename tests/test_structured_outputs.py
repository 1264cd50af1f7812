"""Structured outputs on the worker's model layer (no gRPC): `response_format` json_object and
json_schema enforced while decoding, alone and batched with free requests.

A random-weight model says nothing sensible, so whatever parses and validates here does so
because the grammar allowed nothing else.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from tiny_bpe import PLAIN, build_tiny_bpe_llama
from tiny_models import spec_for

from services.common.errors import InvalidArgument
from services.worker.models import ChatDelta, ChatParams, load_model
from services.worker.models.causal_lm import TransformersChatModel
from services.worker.models.types import ResponseFormat

HELLO = [{"role": "user", "content": "hello"}]

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
async def bpe_llm(tmp_path_factory: pytest.TempPathFactory) -> TransformersChatModel:
    folder = build_tiny_bpe_llama(tmp_path_factory.mktemp("structured") / "bpe-llm", PLAIN)
    model = await asyncio.to_thread(load_model, spec_for("bpe-llm", "llm-runtime", folder), folder)
    yield model
    await model.close()


async def run(model: TransformersChatModel, **params: Any) -> list[ChatDelta]:
    return [delta async for delta in model.chat(ChatParams(**params))]


def text_of(deltas: list[ChatDelta]) -> str:
    return "".join(d.text for d in deltas)


def schema_format(schema: dict[str, Any]) -> ResponseFormat:
    return ResponseFormat("json_schema", schema, name="person", strict=True)


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


@pytest.mark.catalog
async def test_catalog_model_answers_follow_a_schema(catalog_store: Any) -> None:
    from services.common.documents import load_path

    catalog = {item.spec.asset_id: item.spec for item in load_path(Path(__file__).parents[1] / "deploy" / "catalog")}
    folder = Path(catalog_store.folder_for(catalog["smollm2-135m-instruct"].source))
    model = await asyncio.to_thread(load_model, spec_for("smollm2-135m-instruct", "llm-runtime", folder), folder)
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
