"""A minimal OpenAI-compatible upstream that answers at once, for `bench.gateway`.

`POST /v1/chat/completions` gets a fixed completion ("Hello there", 3 tokens, usage included):
one JSON object, or, when the body asks for `"stream": true`, the same answer as server-sent
events ending in `[DONE]`. `POST /v1/embeddings` gets one fixed 8-dimension vector per input.
Every other path is a 404. The answers are rendered once at start;
a request costs its parse and one write, so what a benchmark measures is the caller's path,
not this server. Raw asyncio on uvloop (HTTP/1.1 keep-alive, pipelining, Content-Length bodies
only), no framework.

Run: .venv/bin/python -m bench.upstream [--host 127.0.0.1] [--port 0]
It prints `listening on http://HOST:PORT/v1` once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import orjson
import uvloop

MODEL = "bench-upstream"
TEXT = ["Hel", "lo", " there"]
USAGE = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
CHAT_PATH = b"/v1/chat/completions"
EMBEDDINGS_PATH = b"/v1/embeddings"
VECTOR = [0.125] * 8
MAX_HEAD_BYTES = 64 * 1024


def _response(status: str, content_type: bytes, body: bytes) -> bytes:
    head = (f"HTTP/1.1 {status}\r\ncontent-type: ".encode() + content_type
            + f"\r\ncontent-length: {len(body)}\r\n\r\n".encode())
    return head + body


def _whole() -> bytes:
    body = {"id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(TEXT)},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": USAGE}
    return _response("200 OK", b"application/json", orjson.dumps(body))


def _streamed() -> bytes:
    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        event = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0,
                 "model": MODEL, "choices": choices, **extra}
        return b"data: " + orjson.dumps(event) + b"\n\n"

    events = [chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}])]
    events += [chunk([{"index": 0, "delta": {"content": t}}]) for t in TEXT]
    events.append(chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    events.append(chunk([], usage=USAGE))
    events.append(b"data: [DONE]\n\n")
    return _response("200 OK", b"text/event-stream", b"".join(events))


WHOLE = _whole()
STREAMED = _streamed()
NOT_FOUND = _response("404 Not Found", b"application/json",
                      b'{"error":{"message":"not found","type":"invalid_request_error"}}')
BAD_REQUEST = _response("400 Bad Request", b"application/json",
                        b'{"error":{"message":"bad request","type":"invalid_request_error"}}')


def _embeddings(count: int) -> bytes:
    rows = [{"object": "embedding", "index": i, "embedding": VECTOR} for i in range(count)]
    body = {"object": "list", "model": MODEL, "data": rows,
            "usage": {"prompt_tokens": count, "total_tokens": count}}
    return _response("200 OK", b"application/json", orjson.dumps(body))


ONE_EMBEDDING = _embeddings(1)


def answer(path: bytes, body: bytes) -> bytes:
    """The pre-rendered response to a request for `path` with `body`."""
    path = path.split(b"?", 1)[0]
    if path not in (CHAT_PATH, EMBEDDINGS_PATH):
        return NOT_FOUND
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        return BAD_REQUEST
    if not isinstance(request, dict):
        return BAD_REQUEST
    if path == EMBEDDINGS_PATH:
        inputs = request.get("input")
        # A list of texts or of token arrays; else one text, or one array of token ids.
        count = len(inputs) if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else 1
        return ONE_EMBEDDING if count == 1 else _embeddings(count)
    return STREAMED if request.get("stream") is True else WHOLE


class UpstreamProtocol(asyncio.Protocol):
    """One connection: parse each request as its bytes arrive, answer it at once."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD_BYTES:
                    self.transport.close()
                return
            head = bytes(self.buffer[:end]).split(b"\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    if not value.strip().isdigit():
                        self.transport.write(BAD_REQUEST)
                        self.transport.close()
                        return
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            body = bytes(self.buffer[end + 4:end + 4 + length])
            del self.buffer[:end + 4 + length]
            parts = head[0].split(b" ")
            self.transport.write(answer(parts[1] if len(parts) > 1 else b"", body))


async def serve(host: str, port: int) -> None:
    """Serve until cancelled; print the /v1 URL once listening."""
    server = await asyncio.get_running_loop().create_server(
        UpstreamProtocol, host, port, backlog=1024, reuse_address=True)
    bound = server.sockets[0].getsockname()[1]
    print(f"listening on http://{host}:{bound}/v1", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    """Entry point: parse the address, serve on uvloop."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        uvloop.run(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
