"""A remote OpenAI-compatible upstream (Ollama, vLLM, LM Studio, a cloud API), as one pooled
HTTP client: the worker uses it for the `openai` assets it holds, and the router calls it
directly for the requests it sends past the worker.

The API key is read from the environment variable the asset names (`source.api_key_env`) and is
only ever put in the Authorization header: every error message is scrubbed of it before it
leaves here, and every failure is an `UpstreamError` of that class exactly (a service passes it
on over gRPC by its name, so a caller one hop up gets the same error: a 502 with the upstream's
words). The variable and the URL are checked against the caller's `UpstreamRules` before
either is used, whatever the registry accepted. Connections are kept alive and reused
(aiohttp); the session is opened on the first request, on the caller's event loop.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import orjson

from services.common.assetspec import AssetSpec
from services.common.errors import (
    ContextLengthExceeded,
    FieldProblem,
    InvalidSpec,
    Overloaded,
    UpstreamError,
)
from services.common.openai_chat import (
    ChatOptions,
    FinishReason,
    StreamedAnswer,
    UpstreamLogprob,
    UpstreamText,
    UpstreamToolCall,
    UpstreamUsage,
    chat_body,
    whole_answer,
)
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

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 30.0
READ_TIMEOUT_S = 300.0
"""Longest silence between two reads of an answer (a slow upstream's first token included)."""
MAX_CONNECTIONS = 256
"""Connections kept to one upstream at most; more concurrent requests wait for one."""
MAX_ERROR_DETAIL = 500
JSON_HEADERS = {"Content-Type": "application/json"}


class OpenAIUpstream:
    """The client of one asset's upstream: `source.url`, model `source.upstream_model` (the
    asset id when unset), key from `source.api_key_env`."""

    def __init__(self, spec: AssetSpec, *, upstreams: UpstreamRules, resolve: bool = True) -> None:
        """Check the upstream against `upstreams` (`InvalidSpec` naming the field) before the
        key is read. With `resolve` the URL's host is looked up (blocking: call from a thread),
        so a name for a metadata address is refused too."""
        problems = [FieldProblem(f"source.{name}", problem) for name, problem in (
            ("api_key_env", upstreams.key_env_problem(spec.source.api_key_env)),
            ("url", upstreams.url_problem(spec.source.url, resolve=resolve)),
        ) if problem]
        if problems:
            raise InvalidSpec.from_problems(problems)
        self.asset_id = spec.asset_id
        self.model = spec.source.upstream_model or spec.asset_id
        self.base_url = spec.source.url.rstrip("/") + "/"
        env = spec.source.api_key_env
        self._key = os.environ.get(env, "") if env else ""
        if env and not self._key:
            log.warning("%s: environment variable %s is empty; calling without auth", self.asset_id, env)
        self._headers = {**JSON_HEADERS, **({"Authorization": f"Bearer {self._key}"} if self._key else {})}
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS, ttl_dns_cache=60),
                timeout=aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT_S,
                                              sock_read=READ_TIMEOUT_S),
                # One client serves every caller: no cookie one of them got goes to another.
                cookie_jar=aiohttp.DummyCookieJar(),
                raise_for_status=False,
            )
        return self._session

    def _url(self, path: str) -> str:
        return self.base_url + path

    @staticmethod
    def _timeout(timeout_s: float | None) -> aiohttp.ClientTimeout | None:
        return None if timeout_s is None else aiohttp.ClientTimeout(
            total=timeout_s, connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S)

    async def complete(self, path: str, body: dict[str, Any], *,
                       timeout_s: float | None = None) -> UpstreamText:
        """The whole answer to a request that does not stream (see `chat_body`): its first
        choice, with the usage."""
        return (await self.complete_choices(path, body, timeout_s=timeout_s))[0]

    async def complete_choices(self, path: str, body: dict[str, Any], *,
                               timeout_s: float | None = None) -> list[UpstreamText]:
        """Every choice of an answer that does not stream, whole, in index order (at least
        one); the usage is on each."""
        return whole_answer(await self._post_json(path, body, timeout_s))

    async def stream(self, path: str, body: dict[str, Any], *,
                     timeout_s: float | None = None) -> AsyncIterator[UpstreamText]:
        """The pieces of a streamed answer as they arrive (text, tool-call pieces, logprobs, each
        of its choice), then per choice, in index order, a last piece with no text and the
        finish reason; the very last one has the usage (when the upstream reported it). See
        `StreamedAnswer`."""
        answer = StreamedAnswer()
        try:
            async with self._client().post(self._url(path), data=orjson.dumps(body),
                                           timeout=self._timeout(timeout_s)) as response:
                await self._raise_for_status(response)
                async for event in _sse_events(response):
                    if event.get("error"):
                        raise UpstreamError(self._scrub(f"upstream error: {event['error']}"))
                    for piece in answer.pieces(event):
                        yield piece
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._unreachable(exc) from None
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
            data = await self._post_json("embeddings", {"model": self.model, "input": batch}, timeout_s)
            rows = sorted(data.get("data") or [], key=lambda row: row.get("index", 0))
            if len(rows) != len(indices):
                raise UpstreamError(f"upstream returned {len(rows)} embeddings for {len(indices)} inputs")
            for i, row in zip(indices, rows, strict=True):
                vectors[i] = [float(v) for v in row["embedding"]]
            tokens += int((data.get("usage") or {}).get("prompt_tokens") or 0)
        return vectors, tokens

    async def _post_json(self, path: str, body: dict[str, Any], timeout_s: float | None) -> dict[str, Any]:
        try:
            async with self._client().post(self._url(path), data=orjson.dumps(body),
                                           timeout=self._timeout(timeout_s)) as response:
                await self._raise_for_status(response)
                payload = await response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._unreachable(exc) from None
        return _json_object(payload, "returned a body")

    async def _raise_for_status(self, response: aiohttp.ClientResponse) -> None:
        if response.status < 400:
            return
        raw = await response.read()
        detail, code = raw[:MAX_ERROR_DETAIL].decode(errors="replace"), ""
        try:
            error = orjson.loads(raw).get("error")
            detail = error.get("message", detail) if isinstance(error, dict) else str(error or detail)
            code = str(error.get("code") or "") if isinstance(error, dict) else ""
        except (orjson.JSONDecodeError, AttributeError):
            pass
        message = self._scrub(f"upstream returned HTTP {response.status}: {detail}")
        log.warning("%s: %s", self.asset_id, message)
        # What the upstream's refusal means keeps its class: a route falls back on it by class.
        if response.status == 429:
            raise Overloaded(message, retry_after_s=_seconds(response.headers.get("Retry-After")))
        if code == "context_length_exceeded":
            raise ContextLengthExceeded(message)
        raise UpstreamError(message)

    def _unreachable(self, exc: BaseException) -> UpstreamError:
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        message = self._scrub(f"upstream request failed: {reason}")
        log.warning("%s: %s", self.asset_id, message)
        return UpstreamError(message)

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    async def close(self) -> None:
        """Close the connection pool."""
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The JSON payloads of a server-sent event stream, until `[DONE]`."""
    data: list[bytes] = []
    async for raw in response.content:
        line = raw.rstrip(b"\r\n")
        if line.startswith(b"data:"):
            data.append(line[5:].strip())
            continue
        if line or not data:
            continue
        payload, data = b"\n".join(data), []
        if payload == b"[DONE]":
            return
        yield _json_object(payload, "sent an event")
    if data and data[0] != b"[DONE]":
        yield _json_object(b"\n".join(data), "sent an event")


def _json_object(payload: bytes, what: str) -> dict[str, Any]:
    """`payload` parsed as a JSON object; `UpstreamError` saying what the upstream `what`
    ("returned a body", "sent an event") was otherwise."""
    try:
        value = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise UpstreamError(f"upstream {what} that is not JSON") from None
    if not isinstance(value, dict):
        raise UpstreamError(f"upstream {what} that is not a JSON object")
    return value


def _seconds(retry_after: str | None) -> float:
    """An upstream's `Retry-After` in seconds, 1 to 3600 (1 when absent or not a number of
    seconds)."""
    try:
        seconds = float(retry_after or 1)
    except ValueError:
        return 1.0
    return min(max(1.0, seconds), 3600.0) if math.isfinite(seconds) else 1.0
