"""A loopback OpenAI-compatible upstream for tests of the `openai` runtime: it checks the
bearer key, answers chat and completions whole or streamed (as the request's `stream` asks),
embeds, and records what it received. Chat answers as the request asks: `n` choices,
`logprobs` (made up) with `top_logprobs` alternatives, and two tool calls when tools are
offered (and `tool_choice` is not `none`)."""

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

    usage: Any = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        if denied := refuse(request):
            return denied
        body = await request.json()
        received.append(body)
        if body.get("tools") and body.get("tool_choice") != "none":
            return tool_calls(body)
        choices = [(["Hel", "lo", " there"], "length")]
        choices += [([f"Alt{n}", " answer"], "stop") for n in range(1, body.get("n", 1))]
        if not body.get("stream"):
            return {"object": "chat.completion", "usage": usage, "choices": [
                {"index": n, "message": {"role": "assistant", "content": "".join(words)}, "finish_reason": finish}
                for n, (words, finish) in enumerate(choices)]}
        chunks = []
        for step in range(max(len(words) for words, _ in choices)):  # the choices interleaved
            for n, (words, _) in enumerate(choices):
                if step < len(words):
                    choice = {"index": n, "delta": {"content": words[step]}}
                    if body.get("logprobs"):
                        choice["logprobs"] = {"content": [logprob(words[step], body.get("top_logprobs", 0))]}
                    chunks.append({"choices": [choice]})
        chunks += [{"choices": [{"index": n, "delta": {}, "finish_reason": finish}]}
                   for n, (_, finish) in enumerate(choices)]
        if body.get("stream_options", {}).get("include_usage"):
            chunks.append({"choices": [], "usage": usage})
        return sse(chunks)

    def logprob(token: str, alternatives: int) -> dict[str, Any]:
        """A made-up logprob entry for `token`, with `alternatives` made-up alternatives."""
        top = [{"token": token, "logprob": -0.25, "bytes": list(token.encode())}]
        top += [{"token": f"alt{k}", "logprob": -1.0 - k, "bytes": list(f"alt{k}".encode())}
                for k in range(1, alternatives)]
        return {"token": token, "logprob": -0.25, "bytes": list(token.encode()), "top_logprobs": top}

    def tool_calls(body: dict[str, Any]) -> Any:
        """Two calls of the first tool: the first streamed in pieces as OpenAI does, the second
        sent whole in one delta (as some upstreams do)."""
        name = body["tools"][0]["function"]["name"]
        if not body.get("stream"):
            calls = [{"id": f"call_up{k}", "type": "function",
                      "function": {"name": name, "arguments": f'{{"city": "C{k}"}}'}} for k in (1, 2)]
            message = {"role": "assistant", "content": None, "tool_calls": calls}
            return {"object": "chat.completion", "usage": usage,
                    "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]}
        first = {"index": 0, "id": "call_up1", "type": "function", "function": {"name": name, "arguments": ""}}
        pieces = [{"index": 0, "function": {"arguments": part}} for part in ('{"city": ', '"C1"}')]
        whole = {"index": 1, "id": "call_up2", "type": "function",
                 "function": {"name": name, "arguments": '{"city": "C2"}'}}
        chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": None, "tool_calls": [call]}}]}
                  for call in (first, *pieces, whole)]
        chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
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
