"""The OpenAI-compatible API end to end: the official `openai` client against a running stack.

Registry, worker and router run in-process on free ports with tiny random-weight models
(`stack_harness`); requests go over real HTTP to the router and real gRPC to the worker.
"""

from __future__ import annotations

import asyncio
import base64
import struct

import httpx
import openai
import pytest
from stack_harness import TINY_CHAT, TINY_EMBED, Stack

from roundhouse.v1 import worker_pb2

HELLO = [{"role": "user", "content": "hello"}]
# Generating LONG tokens takes the tiny model several seconds; a generation whose client
# left must stop well within that.
LONG = 4000
STOPPED_WITHIN_S = 2.0


async def worker_in_flight(stack: Stack, asset_id: str) -> int:
    """Requests the worker is generating for `asset_id` right now."""
    info = await stack.workers[0].control.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest())
    return sum(m.in_flight for m in info.models if m.asset_id == asset_id)


async def until_in_flight(stack: Stack, expected: int, deadline_s: float = 10.0) -> None:
    """Poll the worker until it has `expected` chat requests in flight."""

    async def poll() -> None:
        while await worker_in_flight(stack, TINY_CHAT) != expected:
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), deadline_s)


async def test_chat_completion_by_alias(client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(
        model="tiny-alias", messages=HELLO, max_tokens=6, temperature=0)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.model == TINY_CHAT
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 6 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 6


async def test_chat_stream_matches_the_whole_reply(client: openai.AsyncOpenAI) -> None:
    whole = await client.chat.completions.create(
        model=TINY_CHAT, messages=HELLO, max_tokens=8, temperature=0)
    stream = await client.chat.completions.create(
        model=TINY_CHAT, messages=HELLO, max_tokens=8, temperature=0, stream=True)
    chunks = [chunk async for chunk in stream]
    assert all(c.object == "chat.completion.chunk" and c.model == TINY_CHAT for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content


async def test_stream_include_usage_ends_with_a_usage_chunk(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=TINY_CHAT, messages=HELLO, max_tokens=5, stream=True,
        stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 5
    assert chunks[-2].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks[:-1])


async def test_text_completion_whole_and_streamed(client: openai.AsyncOpenAI) -> None:
    whole = await client.completions.create(
        model=TINY_CHAT, prompt="once upon a time", max_tokens=6, temperature=0)
    assert whole.object == "text_completion" and whole.model == TINY_CHAT
    assert whole.choices[0].text and whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 6
    stream = await client.completions.create(
        model=TINY_CHAT, prompt="once upon a time", max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


async def test_embeddings_float_and_base64_agree(
    client: openai.AsyncOpenAI, http: httpx.AsyncClient
) -> None:
    inputs = ["hello w1", "hi w2 w3"]
    floats = await client.embeddings.create(model=TINY_EMBED, input=inputs, encoding_format="float")
    assert floats.model == TINY_EMBED and [d.index for d in floats.data] == [0, 1]
    assert floats.usage.prompt_tokens > 0
    dim = len(floats.data[0].embedding)
    assert dim > 0
    # The client asks for base64 by default and decodes it itself.
    decoded = await client.embeddings.create(model=TINY_EMBED, input=inputs)
    for a, b in zip(floats.data, decoded.data, strict=True):
        assert a.embedding == pytest.approx(b.embedding, rel=1e-6)
    raw = await http.post("/v1/embeddings", json={
        "model": TINY_EMBED, "input": inputs[0], "encoding_format": "base64"})
    packed = base64.b64decode(raw.json()["data"][0]["embedding"])
    assert list(struct.unpack(f"<{dim}f", packed)) == pytest.approx(floats.data[0].embedding)


async def test_embeddings_of_token_arrays_and_dimensions(client: openai.AsyncOpenAI) -> None:
    one = await client.embeddings.create(model=TINY_EMBED, input=[5, 6, 7], encoding_format="float")
    many = await client.embeddings.create(model=TINY_EMBED, input=[[5, 6, 7], [8]])
    assert len(one.data) == 1 and len(many.data) == 2
    assert one.data[0].embedding == pytest.approx(many.data[0].embedding, rel=1e-5)
    dim = len(one.data[0].embedding)
    same = await client.embeddings.create(model=TINY_EMBED, input="x", dimensions=dim)
    assert len(same.data[0].embedding) == dim
    with pytest.raises(openai.BadRequestError) as refused:
        await client.embeddings.create(model=TINY_EMBED, input="x", dimensions=dim + 1)
    assert refused.value.body["param"] == "dimensions"


async def test_models_are_listed_without_loading_anything(client: openai.AsyncOpenAI) -> None:
    listed = {m.id: m for m in (await client.models.list()).data}
    assert {TINY_CHAT, TINY_EMBED} <= set(listed)
    chat = listed[TINY_CHAT]
    assert chat.object == "model" and chat.owned_by == "roundhouse" and chat.created > 0
    extra = chat.model_extra or {}
    assert extra["interfaces"] == ["llm-runtime"] and extra["aliases"] == ["tiny-alias"]
    assert extra["state"]
    by_alias = await client.models.retrieve("tiny-alias")
    assert by_alias.id == TINY_CHAT


async def test_unknown_model_is_404_model_not_found(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as chat:
        await client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert chat.value.body["code"] == "model_not_found" and chat.value.body["param"] == "model"
    assert chat.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as embed:
        await client.embeddings.create(model="no-such-model", input="x")
    assert embed.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError) as streamed:
        await client.chat.completions.create(model="no-such-model", messages=HELLO, stream=True)
    assert streamed.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("no-such-model")


async def test_wrong_interface_is_400_naming_the_interface(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as chat:
        await client.chat.completions.create(model=TINY_EMBED, messages=HELLO)
    assert "embedding-runtime" in chat.value.message
    assert chat.value.body["param"] == "model" and chat.value.body["code"] == "model_not_supported"
    with pytest.raises(openai.BadRequestError) as embed:
        await client.embeddings.create(model=TINY_CHAT, input="x")
    assert "llm-runtime" in embed.value.message


async def test_prompt_beyond_the_context_is_400(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as too_long:
        await client.chat.completions.create(
            model=TINY_CHAT, messages=[{"role": "user", "content": "hello " * 5000}])
    assert too_long.value.body["code"] == "context_length_exceeded"
    assert too_long.value.body["param"] == "messages"
    assert "4096" in too_long.value.message


async def test_request_id_in_and_out(client: openai.AsyncOpenAI) -> None:
    sent = {"x-request-id": "trace-0042"}
    whole = await client.chat.completions.with_raw_response.create(
        model=TINY_CHAT, messages=HELLO, max_tokens=2, extra_headers=sent)
    assert whole.headers["x-request-id"] == "trace-0042"
    async with client.chat.completions.with_streaming_response.create(
        model=TINY_CHAT, messages=HELLO, max_tokens=2, stream=True, extra_headers=sent
    ) as streamed:
        assert streamed.headers["x-request-id"] == "trace-0042"
        assert "data: [DONE]" in [line async for line in streamed.iter_lines()]
    with pytest.raises(openai.NotFoundError) as failed:
        await client.embeddings.create(model="no-such-model", input="x", extra_headers=sent)
    assert failed.value.response.headers["x-request-id"] == "trace-0042"
    generated = await client.models.with_raw_response.list()
    assert generated.headers["x-request-id"]


async def test_client_leaving_a_stream_stops_the_generation(
    stack: Stack, client: openai.AsyncOpenAI
) -> None:
    stream = await client.chat.completions.create(
        model=TINY_CHAT, messages=HELLO, max_tokens=LONG, stream=True)
    await anext(aiter(stream))
    await until_in_flight(stack, 1)
    await stream.close()
    await until_in_flight(stack, 0, deadline_s=STOPPED_WITHIN_S)


async def test_client_leaving_a_whole_request_stops_the_generation(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    body = {"model": TINY_CHAT, "messages": HELLO, "max_tokens": LONG}
    pending = asyncio.create_task(http.post("/v1/chat/completions", json=body))
    await until_in_flight(stack, 1)
    pending.cancel()
    await until_in_flight(stack, 0, deadline_s=STOPPED_WITHIN_S)
    assert stack.router.gateway.admission.stats(TINY_CHAT).in_flight == 0


async def test_probes_and_metrics(http: httpx.AsyncClient, client: openai.AsyncOpenAI) -> None:
    assert (await http.get("/healthz")).status_code == 200
    ready = await http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    await client.chat.completions.create(model=TINY_CHAT, messages=HELLO, max_tokens=3)
    text = (await http.get("/metrics")).text
    assert (f'roundhouse_generated_tokens_total{{asset_id="{TINY_CHAT}",interface="llm-runtime",'
            f'model_type="transformers",route=""}}') in text
    assert 'route="/v1/chat/completions",status="200"' in text


async def test_oversized_body_is_413(http: httpx.AsyncClient) -> None:
    prompt = "w1 " * (3 * 1024 * 1024)
    reply = await http.post("/v1/completions", json={"model": TINY_CHAT, "prompt": prompt})
    assert reply.status_code == 413
    assert reply.json()["error"]["code"] == "request_too_large"
