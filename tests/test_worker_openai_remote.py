"""The `openai` runtime against a real OpenAI-compatible HTTP server started by the test."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from services.common.assetspec import parse_spec
from services.common.errors import UpstreamError, WrongInterface
from services.worker.models import ChatParams, load_model
from services.worker.models.openai_remote import OpenAIRemoteModel

KEY = "sk-test-0123456789abcdef"


def upstream_app(received: list[dict[str, Any]]) -> FastAPI:
    """A small OpenAI-compatible server: checks the bearer key, streams chat, embeds."""
    app = FastAPI()

    def refuse(request: Request) -> JSONResponse | None:
        auth = request.headers.get("authorization", "")
        if auth == f"Bearer {KEY}":
            return None
        given = auth.removeprefix("Bearer ")
        error = {"message": f"Incorrect API key provided: {given}", "type": "invalid_request_error"}
        return JSONResponse({"error": error}, status_code=401)

    def sse(chunks: list[dict[str, Any]]) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        if denied := refuse(request):
            return denied
        body = await request.json()
        received.append(body)
        words = ["Hel", "lo", " there"]
        chunks = [{"choices": [{"index": 0, "delta": {"content": w}}]} for w in words]
        chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
        if body.get("stream_options", {}).get("include_usage"):
            usage = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
            chunks.append({"choices": [], "usage": usage})
        return sse(chunks)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        if denied := refuse(request):
            return denied
        received.append(await request.json())
        return sse([{"choices": [{"index": 0, "text": "raw!", "finish_reason": "stop"}]}])

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Any:
        if denied := refuse(request):
            return denied
        body = await request.json()
        received.append(body)
        data = [
            {"object": "embedding", "index": i, "embedding": [float(len(item)), 1.0, 0.0]}
            for i, item in enumerate(body["input"])
        ]
        return {"object": "list", "data": data[::-1], "usage": {"prompt_tokens": 7}}

    return app


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(upstream_app(received), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "upstream did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}/v1", received
    server.should_exit = True
    thread.join(10)
    sock.close()


def remote(url: str, interface: Any = "llm-runtime", key_env: str = "OPENAI_API_KEY"):
    spec = parse_spec(
        {
            "asset_id": "remote-chat",
            "interface": interface,
            "runtime": "openai",
            "source": {
                "kind": "url",
                "url": url,
                "api_key_env": key_env,
                "upstream_model": "upstream-7b",
            },
            "metadata": {"context_length": 32768},
        }
    )
    return load_model(spec, None)


async def test_streams_chat_with_usage(upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    url, received = upstream
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    model = remote(url)
    assert isinstance(model, OpenAIRemoteModel)
    assert model.capabilities.context_length == 32768 and model.capabilities.streaming
    params = ChatParams(messages=[{"role": "user", "content": "hi"}], max_tokens=3, stop=["\n"], seed=5)
    deltas = [d async for d in model.chat(params)]
    await model.close()
    assert [d.text for d in deltas] == ["Hel", "lo", " there", ""]
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].usage.prompt_tokens == 11 and deltas[-1].usage.completion_tokens == 3
    body = received[-1]
    assert body["model"] == "upstream-7b" and body["stream"] is True
    assert body["max_tokens"] == 3 and body["stop"] == ["\n"] and body["seed"] == 5
    assert "temperature" not in body


async def test_raw_prompt_uses_completions(upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    url, received = upstream
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    model = remote(url)
    deltas = [d async for d in model.chat(ChatParams(prompt="Say it", temperature=0))]
    await model.close()
    assert "".join(d.text for d in deltas) == "raw!"
    assert deltas[-1].finish_reason == "stop" and deltas[-1].usage is None
    assert received[-1]["prompt"] == "Say it" and received[-1]["temperature"] == 0


async def test_embeddings_keep_input_order(upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = upstream
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    model = remote(url, interface="embedding-runtime")
    result = await model.embed(["a", "abc", [1, 2, 3, 4], "ab"])
    await model.close()
    assert [v[0] for v in result.vectors] == [1.0, 3.0, 4.0, 2.0]
    assert result.dimensions == 3
    assert result.prompt_tokens == 14  # one request for the texts, one for the token array
    with pytest.raises(WrongInterface):
        model.chat(ChatParams(prompt="x"))


async def test_wrong_key_is_an_upstream_error_without_the_key(
    upstream, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    url, _ = upstream
    caplog.set_level("DEBUG")
    wrong = "sk-wrong-key-that-must-not-leak"
    monkeypatch.setenv("OPENAI_API_KEY", wrong)
    model = remote(url, interface=["llm-runtime", "embedding-runtime"])
    with pytest.raises(UpstreamError) as caught:
        _ = [d async for d in model.chat(ChatParams(prompt="x"))]
    assert "401" in caught.value.message and "Incorrect API key" in caught.value.message
    assert caught.value.status == 401
    assert wrong not in str(caught.value) and wrong not in repr(caught.value.args)
    with pytest.raises(UpstreamError) as caught:
        await model.embed(["x"])
    assert wrong not in str(caught.value)
    await model.close()
    assert "Incorrect API key" in caplog.text and wrong not in caplog.text


async def test_no_key_sends_no_auth_and_unreachable_is_upstream_error(
    upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _ = upstream
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    model = remote(url, key_env="")
    with pytest.raises(UpstreamError, match="401"):
        _ = [d async for d in model.chat(ChatParams(prompt="x"))]
    await model.close()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_url = f"http://127.0.0.1:{closed.getsockname()[1]}/v1"
    closed.close()
    model = remote(dead_url)
    with pytest.raises(UpstreamError, match="upstream request failed"):
        _ = [d async for d in model.chat(ChatParams(prompt="x"))]
    await model.close()
