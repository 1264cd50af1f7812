"""A loopback OpenAI-compatible upstream for tests of the `openai` runtime: it checks the
bearer key, answers chat and completions whole or streamed (as the request's `stream` asks),
embeds, and records what it received."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

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

    usage = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        if denied := refuse(request):
            return denied
        body = await request.json()
        received.append(body)
        words = ["Hel", "lo", " there"]
        if not body.get("stream"):
            message = {"role": "assistant", "content": "".join(words)}
            return {"object": "chat.completion", "usage": usage,
                    "choices": [{"index": 0, "message": message, "finish_reason": "length"}]}
        chunks = [{"choices": [{"index": 0, "delta": {"content": w}}]} for w in words]
        chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
        if body.get("stream_options", {}).get("include_usage"):
            chunks.append({"choices": [], "usage": usage})
        return sse(chunks)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        if denied := refuse(request):
            return denied
        body = await request.json()
        received.append(body)
        choice = {"index": 0, "text": "raw!", "finish_reason": "stop"}
        if not body.get("stream"):
            return {"object": "text_completion", "choices": [choice]}
        return sse([{"choices": [choice]}])

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


@contextmanager
def serving_upstream(received: list[dict[str, Any]]) -> Iterator[str]:
    """`upstream_app(received)` on a free loopback port while the block runs; yields its /v1 URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(upstream_app(received), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "upstream did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
