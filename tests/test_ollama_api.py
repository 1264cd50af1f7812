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

import anthropic
import httpx
import jsonschema
import ollama
import pytest
from limits_harness import clear_of_minute_boundary, ledger_rows, new_key
from polling import wait_until
from stack_harness import TINY_CHAT, TINY_EMBED, Stack, running_router, running_stack, tiny_documents
from tiny_bpe import PLAIN, build_tiny_bpe_llama

from roundhouse.v1 import asset_pb2, inference_pb2, registry_pb2, worker_pb2
from services.common.route_proto import declared_to_proto
from services.common.routespec import parse_document
from services.router.http.ollama.serving import Turn

HELLO = [{"role": "user", "content": "hello"}]
GREEDY = {"temperature": 0, "num_predict": 6}
PULLED = "ollama-pulled"
TINY_JSON = "tiny-json"
"""A tiny model that can spell JSON (byte-level BPE); the tiny chat model's word-level vocabulary
has no JSON punctuation."""
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12},
                   "age": {"type": "integer", "minimum": 0, "maximum": 150}},
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
        json_model = sources / TINY_JSON
        if not json_model.exists():
            build_tiny_bpe_llama(json_model, PLAIN)
        await running.apply(*tiny_documents(sources), {"asset_id": TINY_JSON, "interface": "llm-runtime",
                                                       "source": {"kind": "path", "path": str(json_model)}})
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


@pytest.fixture
async def operator(stack: Stack) -> ollama.AsyncClient:
    """The official client with an admin key (lifecycle changes are operator actions)."""
    return ollama.AsyncClient(host=stack.http_url, headers=stack.admin_headers, timeout=60)


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
    with pytest.raises(ollama.ResponseError) as both:
        await client.generate(model=TINY_CHAT, prompt="once", system="be brief", raw=True, options=options)
    assert both.value.status_code == 400 and "'system'" in both.value.error and "raw" in both.value.error


async def test_embed_and_the_older_embeddings_agree(client: ollama.AsyncClient) -> None:
    many = await client.embed(model=TINY_EMBED, input=["hello w1", "hi w2 w3"])
    assert len(many.embeddings) == 2 and len(many.embeddings[0]) > 0
    one = await client.embeddings(model=TINY_EMBED, prompt="hello w1")
    assert list(one.embedding) == pytest.approx(list(many.embeddings[0]), rel=1e-5)
    with pytest.raises(ollama.ResponseError) as wrong:
        await client.embed(model=TINY_CHAT, input="x")
    assert wrong.value.status_code == 400 and "llm-runtime" in wrong.value.error


@pytest.mark.parametrize(("options", "named"), [
    ({"temperature": 0.5}, "options.temperature"),
    ({"num_ctx": 1_000_000}, "options.num_ctx"),
    ({"no_such_option": 1}, "options.no_such_option"),
])
async def test_embed_refuses_options_it_cannot_honour(
    client: ollama.AsyncClient, options: dict, named: str
) -> None:
    with pytest.raises(ollama.ResponseError) as refused:
        await client.embed(model=TINY_EMBED, input="hello w1", options=options)
    assert refused.value.status_code == 400 and named in refused.value.error


async def test_embed_takes_a_num_ctx_within_the_models_context(client: ollama.AsyncClient) -> None:
    plain = await client.embed(model=TINY_EMBED, input="hello w1")

    async def context_known() -> bool:  # the loaded model's context reaches the router's catalog
        info = (await client.show(TINY_EMBED)).modelinfo or {}
        return any(name.endswith("context_length") and value for name, value in info.items())

    await wait_until(context_known, timeout=30, interval=0.1)
    within = await client.embed(model=TINY_EMBED, input="hello w1", options={"num_ctx": 16})
    assert list(within.embeddings[0]) == pytest.approx(list(plain.embeddings[0]), rel=1e-5)


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
        reply = await client.chat(model=TINY_JSON, messages=HELLO, format=SCHEMA,
                                  options={"seed": seed, "num_predict": 400})
        jsonschema.validate(json.loads(reply.message.content or ""), SCHEMA)
    # "json" bounds nothing, and the random model rarely closes a string: a seed that does.
    whole = await client.generate(model=TINY_JSON, prompt="a person", format="json",
                                  options={"seed": 1, "num_predict": 400})
    assert isinstance(json.loads(whole.response or ""), dict)


async def test_keep_alive_zero_unloads_and_minus_one_pins(
    stack: Stack, operator: ollama.AsyncClient
) -> None:
    await operator.chat(model=TINY_CHAT, messages=HELLO, options={"num_predict": 2})
    held = (await loaded(operator))[TINY_CHAT]
    assert held.size and held.expires_at and held.context_length == 4096
    answered = await operator.chat(model=TINY_CHAT, messages=HELLO, options={"num_predict": 2}, keep_alive=0)
    assert answered.done
    assert TINY_CHAT not in await loaded(operator)

    pinned = await operator.generate(model=TINY_CHAT, prompt="", keep_alive=-1)
    assert pinned.done_reason == "load"
    lifecycle = (await stack.registry_asset(TINY_CHAT)).spec.lifecycle
    assert lifecycle.desired == asset_pb2.DESIRED_STATE_RUNNING
    held = (await loaded(operator))[TINY_CHAT]
    assert held.expires_at is not None and held.expires_at.year > 2200  # never for idleness

    # An unload of a pinned model unpins it first (else the reconciler would load it back).
    unloaded = await operator.generate(model=TINY_CHAT, prompt="", keep_alive="0s")
    assert unloaded.done_reason == "unload"
    assert TINY_CHAT not in await loaded(operator)
    lifecycle = (await stack.registry_asset(TINY_CHAT)).spec.lifecycle
    assert lifecycle.desired == asset_pb2.DESIRED_STATE_ON_DEMAND


@pytest.mark.parametrize("keep_alive", [0, "0s", -1, "-1m", "10000h"])
async def test_a_plain_key_may_not_change_a_models_lifecycle(
    stack: Stack, client: ollama.AsyncClient, operator: ollama.AsyncClient, keep_alive: Any
) -> None:
    await operator.generate(model=TINY_CHAT, prompt="")
    declared = (await stack.registry_asset(TINY_CHAT)).spec.lifecycle
    with pytest.raises(ollama.ResponseError) as chat:
        await client.chat(model=TINY_CHAT, messages=HELLO, options={"num_predict": 1}, keep_alive=keep_alive)
    with pytest.raises(ollama.ResponseError) as load:
        await client.generate(model=TINY_CHAT, prompt="", keep_alive=keep_alive)
    for refused in (chat, load):
        assert refused.value.status_code == 403
        assert refused.value.error.startswith("keep_alive") and "admin key" in refused.value.error
    assert TINY_CHAT in await loaded(client)
    assert (await stack.registry_asset(TINY_CHAT)).spec.lifecycle == declared


async def test_a_keep_alive_duration_keeps_the_model_at_least_that_long(
    stack: Stack, client: ollama.AsyncClient, operator: ollama.AsyncClient
) -> None:
    await operator.chat(model=TINY_CHAT, messages=HELLO, options={"num_predict": 1}, keep_alive="1h")
    assert (await stack.registry_asset(TINY_CHAT)).spec.lifecycle.auto_sleep_min == 60
    held = (await loaded(client))[TINY_CHAT]
    assert held.expires_at is not None
    assert 55 * 60 < (held.expires_at - datetime.now(UTC)).total_seconds() <= 60 * 60
    # A plain key may send a keep_alive that changes nothing: the model already keeps longer.
    kept = await client.chat(model=TINY_CHAT, messages=HELLO, options={"num_predict": 1}, keep_alive=300)
    assert kept.done
    assert (await stack.registry_asset(TINY_CHAT)).spec.lifecycle.auto_sleep_min == 60  # never shortened
    with pytest.raises(ollama.ResponseError) as longer:
        await client.chat(model=TINY_CHAT, messages=HELLO, options={"num_predict": 1}, keep_alive="2h")
    assert longer.value.status_code == 403 and "auto_sleep_min" in longer.value.error
    assert (await stack.registry_asset(TINY_CHAT)).spec.lifecycle.auto_sleep_min == 60
    with pytest.raises(ollama.ResponseError) as endless:
        await operator.chat(model=TINY_CHAT, messages=HELLO, keep_alive="3000000h")
    assert endless.value.status_code == 400 and "'keep_alive'" in endless.value.error


async def test_a_keep_alive_that_fails_after_the_answer_is_the_answer(
    stack: Stack, operator: ollama.AsyncClient
) -> None:
    """A second router whose jobs service cannot be reached: the chat is answered by the worker
    holding the model, then the unload keep_alive 0 asks for cannot be queued."""
    await operator.generate(model=TINY_CHAT, prompt="")
    assert stack.router_settings is not None
    settings = stack.router_settings.model_copy(update={"jobs_address": "127.0.0.1:1"})
    async with running_router(settings, stack.bus) as (router, _):
        await wait_until(lambda: router.gateway.workers.pick(TINY_CHAT), timeout=10, interval=0.05)
        cut_off = ollama.AsyncClient(host=f"http://127.0.0.1:{router.http_port}",
                                     headers=stack.admin_headers, timeout=60)
        with pytest.raises(ollama.ResponseError) as whole:
            await cut_off.chat(model=TINY_CHAT, messages=HELLO, options={"num_predict": 2}, keep_alive=0)
        assert whole.value.status_code == 503
        assert whole.value.error.startswith("the answer was generated, but keep_alive 0s was not applied")
        assert "jobs service" in whole.value.error
        parts = await cut_off.chat(model=TINY_CHAT, messages=HELLO, options={"num_predict": 2}, keep_alive=0,
                                   stream=True)
        assert isinstance(parts, AsyncGenerator)
        streamed = ""
        with pytest.raises(ollama.ResponseError) as last:
            async for part in parts:
                assert not part.done
                streamed += part.message.content or ""
        assert streamed and "the answer was generated" in last.value.error
    assert TINY_CHAT in await loaded(operator)


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
    with pytest.raises(ollama.ResponseError) as unknown_context:  # never loaded: its context is not known
        await client.chat(model=PULLED, messages=HELLO, options={"num_ctx": 512})
    assert unknown_context.value.status_code == 400
    assert unknown_context.value.error.startswith("options.num_ctx") and "not known" in unknown_context.value.error
    with pytest.raises(ollama.ResponseError) as plain_pull:
        await client.pull(PULLED)
    assert plain_pull.value.status_code == 403 and "admin key" in plain_pull.value.error
    admin = ollama.AsyncClient(host=stack.http_url, headers=stack.admin_headers, timeout=60)
    updates = [u async for u in await admin.pull(f"{PULLED}:latest", stream=True)]
    statuses = [u.status for u in updates]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    completed = [u.completed or 0 for u in updates if u.digest]
    assert completed and completed == sorted(completed) and completed[-1] == 100
    assert all(u.total == 100 for u in updates if u.digest)
    listed = {m.model: m for m in (await client.list()).models}
    assert (listed[PULLED].size or 0) > 0
    again = await admin.pull(PULLED)  # installed already: one line, success
    assert again.status == "success"

    with pytest.raises(ollama.ResponseError) as not_admin:
        await client.delete(PULLED)
    assert not_admin.value.status_code == 403
    assert (await admin.delete(PULLED)).status == "success"
    assert PULLED not in {m.model for m in (await client.list()).models}
    with pytest.raises(ollama.ResponseError) as gone:
        await admin.delete(PULLED)
    assert gone.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as unknown:
        await admin.pull("no-such-model")
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


async def test_requests_that_generate_nothing_spend_the_keys_rate(
    stack: Stack, admin: httpx.AsyncClient, own_db: str
) -> None:
    """A load (Ollama's empty prompt) and a token count (Anthropic's count_tokens) each spend
    one request of the key's rpm, and are recorded with zero tokens."""
    await clear_of_minute_boundary()
    secret, name = await new_key(admin, "ollama-load-rpm", rpm=1)
    limited = client_for(stack, secret)
    assert (await limited.generate(model=TINY_CHAT, prompt="")).done_reason == "load"
    with pytest.raises(ollama.ResponseError) as again:
        await limited.generate(model=TINY_CHAT, prompt="")
    assert again.value.status_code == 429 and "1 requests per minute" in again.value.error

    async def recorded() -> bool:
        return len(await ledger_rows(own_db, name)) == 2

    await wait_until(recorded, timeout=5, interval=0.1)
    loaded_row, refused_row = await ledger_rows(own_db, name)
    assert (loaded_row["status"], loaded_row["asset_id"], loaded_row["prompt_tokens"],
            loaded_row["completion_tokens"]) == ("ok", TINY_CHAT, 0, 0)
    assert refused_row["status"] != "ok"

    secret, name = await new_key(admin, "count-rpm", rpm=1)
    async with anthropic.AsyncAnthropic(base_url=stack.http_url, api_key=secret, max_retries=0,
                                        timeout=60) as api:
        counted = await api.messages.count_tokens(model=TINY_CHAT, messages=HELLO)  # type: ignore[arg-type]
        assert counted.input_tokens > 0
        with pytest.raises(anthropic.RateLimitError):
            await api.messages.count_tokens(model=TINY_CHAT, messages=HELLO)  # type: ignore[arg-type]

    async def counted_rows() -> bool:
        return len(await ledger_rows(own_db, name)) == 2

    await wait_until(counted_rows, timeout=5, interval=0.1)
    count_row, _ = await ledger_rows(own_db, name)
    assert (count_row["status"], count_row["prompt_tokens"], count_row["completion_tokens"]) == ("ok", 0, 0)
