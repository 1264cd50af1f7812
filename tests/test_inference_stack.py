"""The inference path end to end with tiny models: router → worker over real gRPC and HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from stack_harness import TINY_CHAT, TINY_EMBED, Stack, running_stack, tiny_documents

from roundhouse.v1 import inference_pb2, worker_pb2


@pytest.fixture
async def stack(db_dsn: str, nats_url: str, sources: Path, tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(db_dsn, nats_url, sources, tmp_path / "store") as running:
        await running.apply(*tiny_documents(sources))
        yield running


def chat_request(model: str = TINY_CHAT, max_tokens: int = 8) -> inference_pb2.ChatRequest:
    return inference_pb2.ChatRequest(
        model=model, max_tokens=max_tokens, temperature=0,
        messages=[inference_pb2.ChatMessage(role="user", content="hello")],
    )


async def worker_in_flight(stack: Stack, asset_id: str) -> int:
    info = await stack.workers[0].control.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest())
    return sum(m.in_flight for m in info.models if m.asset_id == asset_id)


async def test_grpc_chat_and_embed_through_the_router(stack: Stack) -> None:
    chunks = [c async for c in stack.inference.Chat(chat_request(model="tiny-alias"), timeout=60)]
    assert len(chunks) >= 2
    assert chunks[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].asset_id == TINY_CHAT
    reply = await stack.inference.Embed(inference_pb2.EmbedRequest(model=TINY_EMBED, inputs=[
        inference_pb2.EmbedInput(text="hello w1"),
        inference_pb2.EmbedInput(tokens=inference_pb2.TokenIds(ids=[5, 6, 7])),
    ]), timeout=60)
    assert len(reply.embeddings) == 2 and reply.dimensions == len(reply.embeddings[0].values) > 0


async def test_grpc_errors_carry_proper_status(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stack.inference.Embed(inference_pb2.EmbedRequest(
            model="nope", inputs=[inference_pb2.EmbedInput(text="x")]))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as wrong:
        async for _ in stack.inference.Chat(chat_request(model=TINY_EMBED)):
            pass
    assert wrong.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "embedding-runtime" in wrong.value.details()


async def test_openai_client_end_to_end(stack: Stack) -> None:
    client = openai.AsyncOpenAI(base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0)
    reply = await client.chat.completions.create(
        model=TINY_CHAT, messages=[{"role": "user", "content": "hello"}], max_tokens=6)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 6
    stream = await client.chat.completions.create(
        model=TINY_CHAT, messages=[{"role": "user", "content": "hello"}], max_tokens=6,
        stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    vectors = await client.embeddings.create(model=TINY_EMBED, input=["hello", "hi w2"])
    assert len(vectors.data) == 2
    with pytest.raises(openai.NotFoundError) as missing:
        await client.embeddings.create(model="no-such-model", input="x")
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as wrong:
        await client.chat.completions.create(model=TINY_EMBED, messages=[{"role": "user", "content": "x"}])
    assert "embedding-runtime" in wrong.value.message
    models = await client.models.list()
    assert {TINY_CHAT, TINY_EMBED} <= {m.id for m in models.data}


async def test_cancelled_stream_frees_its_slot(stack: Stack) -> None:
    call = stack.inference.Chat(chat_request(max_tokens=2000), timeout=60)
    await call.read()
    assert await worker_in_flight(stack, TINY_CHAT) == 1
    call.cancel()

    async def drained() -> None:
        while await worker_in_flight(stack, TINY_CHAT):
            await asyncio.sleep(0.05)

    await asyncio.wait_for(drained(), 10)
    assert stack.router.gateway.admission.stats(TINY_CHAT).in_flight == 0


async def test_admission_caps_the_worker_and_overflow_gets_429(stack: Stack) -> None:
    # tiny-chat: max_concurrency 2, max_queue 2. Six long streams: 2 run, 2 wait, 2 are refused.
    calls = [stack.inference.Chat(chat_request(max_tokens=400), timeout=60) for _ in range(6)]
    outcomes = await asyncio.gather(*(_drain(c, stack) for c in calls), return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(refused) == 2
    assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refused)
    peaks = [o for o in outcomes if isinstance(o, int)]
    assert len(peaks) == 4 and max(peaks) <= 2
    async with httpx.AsyncClient(base_url=stack.http_url, timeout=60) as http:
        body = {"model": TINY_CHAT, "max_tokens": 400, "messages": [{"role": "user", "content": "hello"}]}
        replies = await asyncio.gather(*(http.post("/v1/chat/completions", json=body) for _ in range(6)))
    statuses = sorted(r.status_code for r in replies)
    assert statuses.count(429) == 2 and statuses.count(200) == 4
    limited = next(r for r in replies if r.status_code == 429)
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.json()["error"]["type"]


async def _drain(call: grpc.aio.UnaryStreamCall, stack: Stack) -> int:
    """Read a stream to its end; returns the most requests the worker had in flight meanwhile."""
    peak = 0
    async for _ in call:
        peak = max(peak, await worker_in_flight(stack, TINY_CHAT))
    return peak


async def test_no_worker_answers_503_with_retry_after(
    db_dsn: str, nats_url: str, sources: Path, tmp_path: Path
) -> None:
    async with running_stack(db_dsn, nats_url, sources, tmp_path / "store", workers=0,
                             extra_workers=["127.0.0.1:9"]) as lonely:
        await lonely.apply(*tiny_documents(sources))
        async with httpx.AsyncClient(base_url=lonely.http_url, timeout=30) as http:
            reply = await http.post("/v1/embeddings", json={"model": TINY_EMBED, "input": "x"})
    assert reply.status_code == 503
    assert int(reply.headers["retry-after"]) >= 1
    assert reply.json()["error"]["message"]


async def test_openai_runtime_proxies_an_upstream_roundhouse(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stack's own HTTP API is the OpenAI-compatible upstream of two `openai` assets.
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret")
    upstream = {"kind": "url", "url": f"{stack.http_url}/v1", "api_key_env": "OPENAI_API_KEY"}
    await stack.apply(
        {"asset_id": "remote-chat", "interface": "llm-runtime", "runtime": "openai",
         "source": {**upstream, "upstream_model": TINY_CHAT}},
        {"asset_id": "remote-embed", "interface": "embedding-runtime", "runtime": "openai",
         "source": {**upstream, "upstream_model": TINY_EMBED}},
    )
    client = openai.AsyncOpenAI(base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0)
    direct = await client.chat.completions.create(
        model=TINY_CHAT, messages=[{"role": "user", "content": "hello"}], max_tokens=6, temperature=0)
    proxied = await client.chat.completions.create(
        model="remote-chat", messages=[{"role": "user", "content": "hello"}], max_tokens=6, temperature=0)
    assert proxied.model == "remote-chat"
    assert proxied.choices[0].message.content == direct.choices[0].message.content
    assert proxied.usage.completion_tokens == 6
    stream = await client.chat.completions.create(
        model="remote-chat", messages=[{"role": "user", "content": "hello"}], max_tokens=6, temperature=0,
        stream=True)
    streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert streamed == direct.choices[0].message.content
    local = await client.embeddings.create(model=TINY_EMBED, input=["hello w1"])
    remote = await client.embeddings.create(model="remote-embed", input=["hello w1"])
    assert remote.data[0].embedding == pytest.approx(local.data[0].embedding, abs=1e-5)
    with pytest.raises(openai.APIStatusError) as failed:
        await client.chat.completions.create(
            model="remote-chat", messages=[{"role": "user", "content": "hello"}], max_tokens=100_000)
    assert "sk-test-secret" not in str(failed.value.body)
