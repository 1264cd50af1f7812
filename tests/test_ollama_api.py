"""The Ollama-compatible API end to end: the official `ollama` client against a running stack
that checks keys.

Registry, worker, jobs service and router run in-process on free ports with tiny
random-weight models (`stack_harness`); the client speaks real HTTP to the router, which
serves through the same gateway as the OpenAI API (keys, limits, usage).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import ollama
import pytest
from limits_harness import ledger_rows, new_key
from polling import wait_until
from stack_harness import TINY_CHAT, TINY_EMBED, Stack, running_stack, tiny_documents

from roundhouse.v1 import asset_pb2, inference_pb2, registry_pb2, worker_pb2
from services.common.route_proto import declared_to_proto
from services.common.routespec import parse_document
from services.router.http.ollama.serving import Turn

HELLO = [{"role": "user", "content": "hello"}]
GREEDY = {"temperature": 0, "num_predict": 6}
PULLED = "ollama-pulled"
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
async def stack(
    own_db: str, nats_url: str, sources: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    """A stack of the module's own (keep_alive changes its assets' lifecycles), checking keys."""
    async with running_stack(own_db, nats_url, sources, tmp_path_factory.mktemp("store"),
                             auth=True) as running:
        await running.apply(*tiny_documents(sources))
        yield running


@pytest.fixture
async def key(admin: httpx.AsyncClient) -> str:
    """A plain key that may use every model."""
    secret, _ = await new_key(admin, "ollama")
    return secret


def client_for(stack: Stack, secret: str) -> ollama.AsyncClient:
    """The official client with `secret` as its bearer key."""
    return ollama.AsyncClient(host=stack.http_url, headers={"Authorization": f"Bearer {secret}"},
                              timeout=60)


@pytest.fixture
async def client(stack: Stack, key: str) -> ollama.AsyncClient:
    """The official client with a plain key."""
    return client_for(stack, key)


async def loaded(client: ollama.AsyncClient) -> dict[str, ollama.ProcessResponse.Model]:
    """What `/api/ps` lists, by name."""
    return {m.model or "": m for m in (await client.ps()).models}


async def test_root_answers_as_ollama_does_without_a_key(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.http_url) as http:
        assert (await http.get("/")).text == "Ollama is running"
        assert (await http.head("/")).status_code == 200
        refused = await http.get("/api/version")
    assert refused.status_code == 401 and isinstance(refused.json()["error"], str)


async def test_version_list_and_show(stack: Stack, key: str, client: ollama.AsyncClient) -> None:
    async with httpx.AsyncClient(base_url=stack.http_url, headers={"Authorization": f"Bearer {key}"}) as http:
        assert (await http.get("/api/version")).json() == {"version": "0.1.0"}
    listed = {m.model: m for m in (await client.list()).models}
    assert {TINY_CHAT, TINY_EMBED} <= set(listed)
    chat = listed[TINY_CHAT]
    assert chat.digest and len(chat.digest) == 64 and chat.details is not None
    assert chat.details.format == "safetensors" and chat.size is not None and chat.size > 0
    shown = await client.show(f"{TINY_CHAT}:latest")
    assert shown.capabilities == ["completion"]
    assert shown.modelfile and f"FROM {TINY_CHAT}" in shown.modelfile
    assert (await client.show(TINY_EMBED)).capabilities == ["embedding"]
    with pytest.raises(ollama.ResponseError) as unknown:
        await client.show("no-such-model")
    assert unknown.value.status_code == 404 and "no-such-model" in unknown.value.error


async def test_chat_whole_and_streamed_agree(client: ollama.AsyncClient) -> None:
    whole = await client.chat(model=TINY_CHAT, messages=HELLO, options=GREEDY)
    assert whole.done and whole.done_reason == "length"
    assert whole.message.role == "assistant" and whole.message.content
    assert whole.eval_count == 6 and whole.prompt_eval_count and whole.prompt_eval_count > 0
    assert whole.total_duration and whole.eval_duration is not None
    parts = [part async for part in await client.chat(
        model=TINY_CHAT, messages=HELLO, options=GREEDY, stream=True)]
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert "".join(p.message.content or "" for p in parts) == whole.message.content
    assert parts[-1].eval_count == 6 and parts[-1].done_reason == "length"


async def test_chat_takes_a_tool_conversation(client: ollama.AsyncClient) -> None:
    tools = [{"type": "function", "function": {
        "name": "weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    messages: list[dict[str, Any]] = [*HELLO,
                {"role": "assistant", "content": "",
                 "tool_calls": [{"function": {"name": "weather", "arguments": {"city": "Oslo"}}}]},
                {"role": "tool", "content": "sunny", "tool_name": "weather"}]
    reply = await client.chat(model=TINY_CHAT, messages=messages, tools=tools, options=GREEDY)
    assert reply.done and (reply.message.content or reply.message.tool_calls)


def test_streamed_tool_call_pieces_become_ollama_calls() -> None:
    turn = Turn(started=0.0, woken=False)
    pieces = [
        inference_pb2.ToolCallDelta(index=0, id="call_a", name="weather"),
        inference_pb2.ToolCallDelta(index=0, arguments='{"city": '),
        inference_pb2.ToolCallDelta(index=1, id="call_b", name="time"),
        inference_pb2.ToolCallDelta(index=0, arguments='"Oslo"}'),
    ]
    for piece in pieces:
        turn.take(inference_pb2.ChatChunk(tool_calls=[piece]))
    turn.take(inference_pb2.ChatChunk(finish_reason=inference_pb2.FINISH_REASON_TOOL_CALLS,
                                      usage=inference_pb2.Usage(prompt_tokens=9, completion_tokens=4)))
    assert turn.tool_calls() == [
        {"id": "call_a", "function": {"index": 0, "name": "weather", "arguments": {"city": "Oslo"}}},
        {"id": "call_b", "function": {"index": 1, "name": "time", "arguments": {}}},
    ]
    stats = turn.stats()
    assert (stats["done_reason"], stats["prompt_eval_count"], stats["eval_count"]) == ("stop", 9, 4)


async def test_a_client_leaving_a_stream_stops_the_generation(
    stack: Stack, client: ollama.AsyncClient
) -> None:
    async def in_flight() -> int:
        info = await stack.workers[0].control.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest())
        return sum(m.in_flight for m in info.models if m.asset_id == TINY_CHAT)

    parts = await client.chat(model=TINY_CHAT, messages=HELLO, options={"num_predict": 4000}, stream=True)
    assert isinstance(parts, AsyncGenerator)
    await anext(parts)
    await wait_until(in_flight, timeout=10, interval=0.05)
    await parts.aclose()

    async def stopped() -> bool:
        return await in_flight() == 0

    await wait_until(stopped, timeout=5, interval=0.05)


async def test_generate_templated_raw_and_streamed(client: ollama.AsyncClient) -> None:
    options = {"temperature": 0, "num_predict": 5, "seed": 7, "top_k": 3}
    templated = await client.generate(model=TINY_CHAT, prompt="once upon a time", system="be brief",
                                      options=options)
    assert templated.response and templated.eval_count == 5
    raw = await client.generate(model=TINY_CHAT, prompt="once upon a time", raw=True, options=options)
    assert raw.eval_count == 5 and raw.prompt_eval_count != templated.prompt_eval_count
    parts = [part async for part in await client.generate(
        model=TINY_CHAT, prompt="once upon a time", raw=True, options=options, stream=True)]
    assert "".join(p.response or "" for p in parts) == raw.response
    assert parts[-1].done and parts[-1].eval_count == 5


async def test_embed_and_the_older_embeddings_agree(client: ollama.AsyncClient) -> None:
    many = await client.embed(model=TINY_EMBED, input=["hello w1", "hi w2 w3"])
    assert len(many.embeddings) == 2 and len(many.embeddings[0]) > 0
    one = await client.embeddings(model=TINY_EMBED, prompt="hello w1")
    assert list(one.embedding) == pytest.approx(list(many.embeddings[0]), rel=1e-5)
    with pytest.raises(ollama.ResponseError) as wrong:
        await client.embed(model=TINY_CHAT, input="x")
    assert wrong.value.status_code == 400 and "llm-runtime" in wrong.value.error


@pytest.mark.parametrize(("options", "named"), [
    ({"repeat_penalty": 1.1}, "repeat_penalty"),
    ({"mirostat": 1}, "mirostat"),
    ({"no_such_option": 1}, "no_such_option"),
    ({"num_ctx": 1_000_000}, "num_ctx"),
    ({"temperature": 9}, "temperature"),
])
async def test_an_option_not_implemented_or_out_of_range_is_400_naming_it(
    client: ollama.AsyncClient, options: dict, named: str
) -> None:
    with pytest.raises(ollama.ResponseError) as refused:
        await client.chat(model=TINY_CHAT, messages=HELLO, options=options)
    assert refused.value.status_code == 400 and f"options.{named}" in refused.value.error


async def test_num_ctx_within_the_context_and_images_refused(client: ollama.AsyncClient) -> None:
    fits = await client.chat(model=TINY_CHAT, messages=HELLO, options={"num_ctx": 2048, "num_predict": 2})
    assert fits.eval_count == 2
    with pytest.raises(ollama.ResponseError) as refused:
        await client.chat(model=TINY_CHAT, messages=[{**HELLO[0], "images": [b"\x89PNG"]}])
    assert refused.value.status_code == 400 and "images" in refused.value.error


async def test_format_schema_gives_json_that_validates(client: ollama.AsyncClient) -> None:
    for seed in range(3):
        reply = await client.chat(model=TINY_CHAT, messages=HELLO, format=SCHEMA,
                                  options={"seed": seed, "num_predict": 200})
        jsonschema.validate(json.loads(reply.message.content or ""), SCHEMA)
    whole = await client.generate(model=TINY_CHAT, prompt="a person", format="json",
                                  options={"num_predict": 200})
    assert isinstance(json.loads(whole.response or ""), dict)


async def test_keep_alive_zero_unloads_and_minus_one_pins(
    stack: Stack, client: ollama.AsyncClient
) -> None:
    await client.chat(model=TINY_CHAT, messages=HELLO, options={"num_predict": 2})
    held = (await loaded(client))[TINY_CHAT]
    assert held.size and held.expires_at and held.context_length == 4096
    answered = await client.chat(model=TINY_CHAT, messages=HELLO, options={"num_predict": 2}, keep_alive=0)
    assert answered.done
    assert TINY_CHAT not in await loaded(client)

    pinned = await client.generate(model=TINY_CHAT, prompt="", keep_alive=-1)
    assert pinned.done_reason == "load"
    lifecycle = (await stack.registry_asset(TINY_CHAT)).spec.lifecycle
    assert lifecycle.desired == asset_pb2.DESIRED_STATE_RUNNING
    held = (await loaded(client))[TINY_CHAT]
    assert held.expires_at is not None and held.expires_at.year > 2200  # never for idleness

    unloaded = await client.generate(model=TINY_CHAT, prompt="", keep_alive="0s")
    assert unloaded.done_reason == "unload"
    assert TINY_CHAT not in await loaded(client)
    lifecycle = (await stack.registry_asset(TINY_CHAT)).spec.lifecycle
    assert lifecycle.desired == asset_pb2.DESIRED_STATE_ON_DEMAND


async def test_a_keep_alive_duration_keeps_the_model_at_least_that_long(
    stack: Stack, client: ollama.AsyncClient
) -> None:
    await client.chat(model=TINY_CHAT, messages=HELLO, options={"num_predict": 1}, keep_alive="1h")
    assert (await stack.registry_asset(TINY_CHAT)).spec.lifecycle.auto_sleep_min == 60
    held = (await loaded(client))[TINY_CHAT]
    assert held.expires_at is not None
    assert 55 * 60 < (held.expires_at - datetime.now(UTC)).total_seconds() <= 60 * 60
    await client.chat(model=TINY_CHAT, messages=HELLO, options={"num_predict": 1}, keep_alive=300)
    assert (await stack.registry_asset(TINY_CHAT)).spec.lifecycle.auto_sleep_min == 60  # never shortened


async def test_pull_streams_progress_in_order_then_delete(
    stack: Stack, sources: Path, client: ollama.AsyncClient
) -> None:
    source = sources / PULLED
    if not source.exists():
        shutil.copytree(sources / TINY_CHAT, source)
    spec = parse_document({"asset_id": PULLED, "interface": "llm-runtime",
                           "source": {"kind": "path", "path": str(source)}}, source_roots=[sources])
    await stack.registry.stub.ApplyAssets(registry_pb2.ApplyAssetsRequest(
        assets=[registry_pb2.AssetApply(spec=declared_to_proto(spec))]))
    updates = [u async for u in await client.pull(f"{PULLED}:latest", stream=True)]
    statuses = [u.status for u in updates]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    completed = [u.completed or 0 for u in updates if u.digest]
    assert completed and completed == sorted(completed) and completed[-1] == 100
    assert all(u.total == 100 for u in updates if u.digest)
    listed = {m.model: m for m in (await client.list()).models}
    assert (listed[PULLED].size or 0) > 0
    again = await client.pull(PULLED)  # installed already: one line, success
    assert again.status == "success"

    with pytest.raises(ollama.ResponseError) as not_admin:
        await client.delete(PULLED)
    assert not_admin.value.status_code == 403
    admin = ollama.AsyncClient(host=stack.http_url, headers=stack.admin_headers, timeout=60)
    assert (await admin.delete(PULLED)).status == "success"
    assert PULLED not in {m.model for m in (await client.list()).models}
    with pytest.raises(ollama.ResponseError) as gone:
        await admin.delete(PULLED)
    assert gone.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as unknown:
        await client.pull("no-such-model")
    assert unknown.value.status_code == 404


async def test_keys_scope_and_usage_apply_to_the_ollama_api(
    stack: Stack, admin: httpx.AsyncClient, own_db: str
) -> None:
    secret, name = await new_key(admin, "ollama-embed-only", models=[TINY_EMBED])
    scoped = client_for(stack, secret)
    assert [m.model for m in (await scoped.list()).models] == [TINY_EMBED]
    with pytest.raises(ollama.ResponseError) as refused:
        await scoped.chat(model=TINY_CHAT, messages=HELLO)
    assert refused.value.status_code == 403
    secret, name = await new_key(admin, "ollama-usage")
    counted = client_for(stack, secret)
    reply = await counted.chat(model=TINY_CHAT, messages=HELLO, options={"num_predict": 3})

    async def recorded() -> bool:
        return len(await ledger_rows(own_db, name)) == 1

    await wait_until(recorded, timeout=5, interval=0.1)
    (row,) = await ledger_rows(own_db, name)
    assert (row["status"], row["asset_id"], row["interface"]) == ("ok", TINY_CHAT, "llm-runtime")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (reply.prompt_eval_count, reply.eval_count)
