"""`roundhouse up` as an operator runs it: a real process tree, Ctrl-C, and a second start."""

from __future__ import annotations

import asyncio
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from openai import AuthenticationError, OpenAI
from up_harness import READY_LINE, UpProcess, admin_key, models_ls, up_environment

from roundhouse.v1 import inference_pb2, inference_pb2_grpc, registry_pb2, registry_pb2_grpc

pytestmark = pytest.mark.catalog


@pytest.fixture
def up_env(server_root: Path, catalog_store, tmp_path: Path) -> Iterator[dict[str, str]]:
    yield up_environment(server_root / f"home-{tmp_path.name}", catalog_store.root)


def cosine(a: list[float], b: list[float]) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def check_openai_client(base_url: str, key: str) -> None:
    """What an app sees through the official client, with a key."""
    client = OpenAI(base_url=f"{base_url}/v1", api_key=key, timeout=180)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=question, max_tokens=40, temperature=0
    )
    assert "paris" in reply.choices[0].message.content.lower()
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens > 0
    pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model="default-chat", messages=question, max_tokens=40, temperature=0, stream=True
        )
        if chunk.choices
    ]
    assert len(pieces) > 3 and "paris" in "".join(pieces).lower()
    texts = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell today."]
    vectors = [d.embedding for d in client.embeddings.create(model="all-minilm-l6-v2", input=texts).data]
    assert all(len(v) == 384 for v in vectors)
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])


async def check_grpc_stubs(router_address: str, key: str) -> None:
    """What an internal service sees with only the roundhouse.v1 stubs and a key."""
    metadata = (("authorization", f"Bearer {key}"),)
    async with grpc.aio.insecure_channel(router_address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        chunks = [c async for c in stub.Chat(inference_pb2.ChatRequest(
            model="smollm2-135m-instruct", max_tokens=40, temperature=0,
            messages=[inference_pb2.ChatMessage(role="user", content="What is the capital of France?")],
        ), timeout=180, metadata=metadata)]
        assert "paris" in "".join(c.delta for c in chunks).lower()
        assert chunks[-1].finish_reason in (inference_pb2.FINISH_REASON_STOP, inference_pb2.FINISH_REASON_LENGTH)
        assert chunks[-1].usage.completion_tokens > 0
        reply = await stub.Embed(inference_pb2.EmbedRequest(
            model="default-embedding", inputs=[inference_pb2.EmbedInput(text="hello world")]), timeout=60,
            metadata=metadata)
        assert reply.dimensions == 384 and len(reply.embeddings[0].values) == 384


def check_internal_token(up: UpProcess, env: dict[str, str]) -> None:
    """The services require the token `roundhouse up` made (the CLI found it in its private
    file); it was never printed."""
    path = Path(env["ROUNDHOUSE_HOME"]) / "run" / "internal_token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text().strip()
    assert len(token) >= 32 and not any(token in line for line in up.seen)

    async def list_without_token() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(env["ROUNDHOUSE_REGISTRY_ADDRESS"]) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await registry_pb2_grpc.RegistryStub(channel).ListAssets(registry_pb2.ListAssetsRequest(), timeout=10)
        return refused.value.code()

    assert asyncio.run(list_without_token()) == grpc.StatusCode.UNAUTHENTICATED


def check_metrics(up: UpProcess, env: dict[str, str]) -> None:
    """`up` listed a `/metrics` URL for the router, the worker and the jobs service (the
    configured port, else a free one), and each answers with Roundhouse metrics."""
    listed = {match[1]: match[2] for line in up.seen
              if (match := re.search(r"(router|worker|jobs) metrics +(http://\S+/metrics)", line))}
    assert set(listed) == {"router", "worker", "jobs"}, up.seen
    assert listed["jobs"].endswith(f":{env['ROUNDHOUSE_JOBS_METRICS_PORT']}/metrics")
    for service, url in listed.items():
        reply = httpx.get(url, timeout=10)
        assert reply.status_code == 200, f"{service}: {reply.status_code}"
        assert re.search(r"^roundhouse_\w+", reply.text, re.M), f"{service}: no roundhouse_ metric"


def test_up_serves_catalog_and_keeps_it_across_restarts(up_env: dict[str, str]) -> None:
    base_url = f"http://127.0.0.1:{up_env['ROUNDHOUSE_HTTP_PORT']}"
    first = UpProcess(up_env)
    try:
        first.wait_for(READY_LINE, timeout=240)
        assert any("catalog: smollm2-135m-instruct created" in line for line in first.seen)
        key = admin_key(first, up_env)
        listing = models_ls(up_env)
        assert "Language models (1)" in listing and "smollm2-135m-instruct" in listing
        assert "Embedding models (1)" in listing and "all-minilm-l6-v2" in listing
        check_internal_token(first, up_env)
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=f"{base_url}/v1", api_key="rh-not-a-key", max_retries=0).models.list()
        check_openai_client(base_url, key)
        asyncio.run(check_grpc_stubs(up_env["ROUNDHOUSE_ROUTER_ADDRESS"], key))
        check_metrics(first, up_env)
    finally:
        assert first.interrupt() == 0

    second = UpProcess(up_env)
    try:
        second.wait_for(READY_LINE, timeout=240)
        catalog = [line for line in second.seen if "catalog:" in line]
        assert len(catalog) == 2 and all("unchanged (revision 1)" in line for line in catalog)
        assert "smollm2-135m-instruct" in models_ls(up_env)
        assert admin_key(second, up_env) == key  # the same key across restarts
        assert [m.id for m in OpenAI(base_url=f"{base_url}/v1", api_key=key).models.list().data]
    finally:
        assert second.interrupt() == 0
