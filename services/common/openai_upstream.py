"""A remote OpenAI-compatible upstream (Ollama, vLLM, LM Studio, a cloud API), as one pooled
HTTP client: the worker uses it for the `openai` assets it holds, and the router calls it
directly for the requests it sends past the worker.

The HTTP side (the upstream rules checked before the key is read, the key only ever in the
Authorization header and scrubbed from every error, pooled connections) is `upstream_http`'s.
Every failure is an `UpstreamError` of that class exactly (a service passes it on over gRPC by
its name, so a caller one hop up gets the same error: a 502 with the upstream's words), except
the refusals whose meaning a route falls back on by class: 429 → `Overloaded` (with the
upstream's `Retry-After`), `context_length_exceeded` → `ContextLengthExceeded`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any

from services.common.assetspec import AssetSpec
from services.common.errors import ContextLengthExceeded, Overloaded, RoundhouseError, UpstreamError
from services.common.openai_answer import (
    FinishReason,
    StreamedAnswer,
    UpstreamLogprob,
    UpstreamText,
    UpstreamToolCall,
    UpstreamUsage,
    whole_answer,
)
from services.common.openai_chat import ChatOptions, chat_body
from services.common.upstream_http import UpstreamHTTP, error_body, json_object, sse_messages
from services.common.upstreams import UpstreamRules

__all__ = [
    "ChatOptions",
    "FinishReason",
    "OpenAIUpstream",
    "UpstreamLogprob",
    "UpstreamText",
    "UpstreamToolCall",
    "UpstreamUsage",
    "chat_body",
]


class OpenAIUpstream(UpstreamHTTP):
    """The client of one asset's upstream: `source.url`, model `source.upstream_model` (the
    asset id when unset), key from `source.api_key_env`."""

    def __init__(self, spec: AssetSpec, *, upstreams: UpstreamRules, resolve: bool = True) -> None:
        """Check the upstream against `upstreams` (`InvalidSpec` naming the field) before the
        key is read. With `resolve` the URL's host is looked up (blocking: call from a thread),
        so a name for a metadata address is refused too."""
        super().__init__(spec, upstreams=upstreams, resolve=resolve, base_url=spec.source.url.rstrip("/") + "/",
                         key_header="Authorization", key_prefix="Bearer ")

    async def complete(self, path: str, body: dict[str, Any], *,
                       timeout_s: float | None = None) -> UpstreamText:
        """The whole answer to a request that does not stream (see `chat_body`): its first
        choice, with the usage."""
        return (await self.complete_choices(path, body, timeout_s=timeout_s))[0]

    async def complete_choices(self, path: str, body: dict[str, Any], *,
                               timeout_s: float | None = None) -> list[UpstreamText]:
        """Every choice of an answer that does not stream, whole, in index order (at least
        one); the usage is on each."""
        return whole_answer(json_object(await self._post(path, body, timeout_s), "returned a body"))

    async def stream(self, path: str, body: dict[str, Any], *,
                     timeout_s: float | None = None) -> AsyncIterator[UpstreamText]:
        """The pieces of a streamed answer as they arrive (text, tool-call pieces, logprobs, each
        of its choice), then per choice, in index order, a last piece with no text and the
        finish reason; the very last one has the usage (when the upstream reported it). See
        `StreamedAnswer`."""
        answer = StreamedAnswer()
        async with self._posted(path, body, timeout_s) as response, \
                aclosing(sse_messages(response.content)) as events:
            async for _, data in events:
                if data.strip() == b"[DONE]":
                    break
                event = json_object(data, "sent an event")
                if event.get("error"):
                    raise UpstreamError(self._scrub(f"upstream error: {event['error']}"))
                for piece in answer.pieces(event):
                    yield piece
        for piece in answer.endings():
            yield piece

    async def embed(self, inputs: Sequence[str | Sequence[int]], *,
                    timeout_s: float | None = None) -> tuple[list[list[float]], int]:
        """One vector per input, in input order, and the prompt tokens the upstream counted.
        OpenAI takes either strings or token arrays in one request, not a mix: a mixed batch
        is sent as two requests."""
        groups: dict[bool, list[int]] = {}
        for i, item in enumerate(inputs):
            groups.setdefault(isinstance(item, str), []).append(i)
        vectors: list[list[float]] = [[] for _ in inputs]
        tokens = 0
        for indices in groups.values():
            batch = [item if isinstance(item, str) else [int(t) for t in item]
                     for item in (inputs[i] for i in indices)]
            payload = await self._post("embeddings", {"model": self.model, "input": batch}, timeout_s)
            data = json_object(payload, "returned a body")
            rows = sorted(data.get("data") or [], key=lambda row: row.get("index", 0))
            if len(rows) != len(indices):
                raise UpstreamError(f"upstream returned {len(rows)} embeddings for {len(indices)} inputs")
            for i, row in zip(indices, rows, strict=True):
                vectors[i] = [float(v) for v in row["embedding"]]
            tokens += int((data.get("usage") or {}).get("prompt_tokens") or 0)
        return vectors, tokens

    def _status_error(self, status: int, body: bytes, retry_after_s: float) -> RoundhouseError:
        error, detail = error_body(body)
        message = f"upstream returned HTTP {status}: {detail}"
        # What the upstream's refusal means keeps its class: a route falls back on it by class.
        if status == 429:
            return Overloaded(message, retry_after_s=retry_after_s)
        if str(error.get("code") or "") == "context_length_exceeded":
            return ContextLengthExceeded(message)
        return UpstreamError(message)
