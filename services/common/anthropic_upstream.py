"""A remote Anthropic Messages API (Claude, or another Roundhouse's `/v1/messages`), as one
pooled HTTP client for the `anthropic` assets a worker holds.

As `openai_upstream` does for OpenAI-compatible upstreams: the key is read from the
environment variable the asset names (`source.api_key_env`), after that variable and the URL
pass the caller's `UpstreamRules`, and is only ever put in the `x-api-key` header; every error
message is scrubbed of it. The upstream's refusals keep their meaning as domain errors, so a
route falls back on them by class:

- 400 `prompt is too long` → `ContextLengthExceeded`; any other 400 or 413 → `InvalidArgument`
  (the request itself is at fault, another asset would refuse it too);
- 401 / 403 → `UpstreamError` naming the key variable (the asset's key is wrong, not the
  caller's);
- 404 → `UpstreamError` naming the upstream model and URL;
- 429 (rate limited) and 529 (`overloaded_error`) → `Overloaded`, with the upstream's
  `Retry-After`;
- 5xx, anything else, and an upstream that cannot be reached → `UpstreamError`.

An `error` event in the middle of a stream is mapped by its type the same way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import aiohttp
import orjson

from services.common.assetspec import AssetSpec
from services.common.errors import (
    ContextLengthExceeded,
    FieldProblem,
    InvalidArgument,
    InvalidSpec,
    Overloaded,
    RoundhouseError,
    UpstreamError,
)
from services.common.openai_upstream import (
    CONNECT_TIMEOUT_S,
    MAX_CONNECTIONS,
    MAX_ERROR_DETAIL,
    READ_TIMEOUT_S,
    _seconds,
)
from services.common.upstreams import UpstreamRules

log = logging.getLogger(__name__)

ANTHROPIC_VERSION = "2023-06-01"
"""The `anthropic-version` header sent with every request."""

OVERLOADED_STATUS = 529
"""Anthropic's status for an API that is overloaded for everyone (not a rate limit)."""


class AnthropicUpstream:
    """The client of one asset's upstream: `{source.url}/v1/messages`, model
    `source.upstream_model` (the asset id when unset), key from `source.api_key_env`."""

    def __init__(self, spec: AssetSpec, *, upstreams: UpstreamRules, resolve: bool = True) -> None:
        """Check the upstream against `upstreams` (`InvalidSpec` naming the field) before the
        key is read. With `resolve` the URL's host is looked up (blocking: call from a thread),
        so a name for a metadata address is refused too. The URL is the API's root
        (`https://api.anthropic.com`); one ending in `/v1` is taken as well."""
        problems = [FieldProblem(f"source.{name}", problem) for name, problem in (
            ("api_key_env", upstreams.key_env_problem(spec.source.api_key_env)),
            ("url", upstreams.url_problem(spec.source.url, resolve=resolve)),
        ) if problem]
        if problems:
            raise InvalidSpec.from_problems(problems)
        self.asset_id = spec.asset_id
        self.model = spec.source.upstream_model or spec.asset_id
        root = spec.source.url.rstrip("/")
        self.base_url = root.removesuffix("/v1") + "/v1/"
        self.key_env = spec.source.api_key_env
        self._key = os.environ.get(self.key_env, "") if self.key_env else ""
        if self.key_env and not self._key:
            log.warning("%s: environment variable %s is empty; calling without a key", self.asset_id, self.key_env)
        self._headers = {"Content-Type": "application/json", "anthropic-version": ANTHROPIC_VERSION,
                         **({"x-api-key": self._key} if self._key else {})}
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS, ttl_dns_cache=60),
                timeout=aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S),
                # One client serves every caller: no cookie one of them got goes to another.
                cookie_jar=aiohttp.DummyCookieJar(),
                raise_for_status=False,
            )
        return self._session

    async def stream(self, body: dict[str, Any], *, timeout_s: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """POST `body` (a Messages request; `stream` is set here) and yield each event's payload
        (`{"type": "message_start", ...}`) as it arrives, through `message_stop`. An `error`
        event raises its mapped error; a stream that ends before `message_stop` raises
        `UpstreamError`."""
        try:
            async with self._client().post(self.base_url + "messages", data=orjson.dumps({**body, "stream": True}),
                                           timeout=_timeout(timeout_s)) as response:
                await self._raise_for_status(response)
                async for event in sse_events(response.content):
                    if event.get("type") == "error":
                        raise self._scrubbed(event_error(event.get("error")))
                    yield event
                    if event.get("type") == "message_stop":
                        return
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._unreachable(exc) from None
        raise UpstreamError("upstream stream ended before message_stop")

    async def count_tokens(self, body: dict[str, Any], *, timeout_s: float | None = None) -> int:
        """The input tokens the upstream counts for `body` (`model`, `system`, `messages`,
        `tools`, `tool_choice`), from `/v1/messages/count_tokens`."""
        try:
            async with self._client().post(self.base_url + "messages/count_tokens", data=orjson.dumps(body),
                                           timeout=_timeout(timeout_s)) as response:
                await self._raise_for_status(response)
                payload = await response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._unreachable(exc) from None
        try:
            counted = orjson.loads(payload)["input_tokens"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise UpstreamError("upstream answered count_tokens without input_tokens") from None
        if not isinstance(counted, int) or counted < 0:
            raise UpstreamError("upstream answered count_tokens with an input_tokens that is no count")
        return counted

    async def _raise_for_status(self, response: aiohttp.ClientResponse) -> None:
        if response.status < 400:
            return
        raw = await response.read()
        kind, detail = _error_body(raw)
        status = response.status
        words = f"upstream returned HTTP {status}{f' ({kind})' if kind else ''}: {detail}"
        log.warning("%s: %s", self.asset_id, self._scrub(words))
        retry_after = _seconds(response.headers.get("Retry-After"))
        if status in (401, 403):
            where = f"the key in {self.key_env}" if self.key_env else "no key (source.api_key_env is unset)"
            exc: RoundhouseError = UpstreamError(f"upstream refused {where}: {words}")
        elif status == 404:
            exc = UpstreamError(f"upstream has no model '{self.model}' or no Messages API at "
                                f"{self.base_url}messages: {words}")
        elif status in (429, OVERLOADED_STATUS) or kind in ("rate_limit_error", "overloaded_error"):
            exc = Overloaded(words, retry_after_s=retry_after)
        elif status in (400, 413, 422):
            exc = _refusal(detail, words)
        else:
            exc = UpstreamError(words)
        raise self._scrubbed(exc)

    def _unreachable(self, exc: BaseException) -> UpstreamError:
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        message = self._scrub(f"upstream request failed: {reason}")
        log.warning("%s: %s", self.asset_id, message)
        return UpstreamError(message)

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _scrubbed(self, exc: RoundhouseError) -> RoundhouseError:
        exc.message = self._scrub(exc.message)
        exc.args = (exc.message,)
        return exc

    async def close(self) -> None:
        """Close the connection pool."""
        if self._session is not None:
            await self._session.close()
            self._session = None


def event_error(error: Any) -> RoundhouseError:
    """The domain error of an `error` event's `error` object (`{"type", "message"}`)."""
    kind = str(error.get("type") or "") if isinstance(error, dict) else ""
    detail = str(error.get("message") or "") if isinstance(error, dict) else str(error or "")
    words = f"upstream error{f' ({kind})' if kind else ''}: {detail}"
    if kind in ("overloaded_error", "rate_limit_error"):
        return Overloaded(words)
    if kind in ("invalid_request_error", "request_too_large"):
        return _refusal(detail, words)
    return UpstreamError(words)


async def sse_events(lines: AsyncIterable[bytes]) -> AsyncIterator[dict[str, Any]]:
    """The JSON payloads of a server-sent event stream (Anthropic's: `event:` and `data:` lines,
    a blank line after each event). The payload's `type` is the event's name where the payload
    has none; comments and events without data are skipped."""
    name, data = "", []
    async for raw in lines:
        line = raw.rstrip(b"\r\n")
        if line.startswith(b"data:"):
            data.append(line[5:].removeprefix(b" "))
        elif line.startswith(b"event:"):
            name = line[6:].strip().decode(errors="replace")
        elif not line and data:
            yield _payload(name, b"\n".join(data))
            name, data = "", []
        elif not line:
            name = ""
    if data:
        yield _payload(name, b"\n".join(data))


def _payload(name: str, data: bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise UpstreamError("upstream sent an event that is not JSON") from None
    if not isinstance(value, dict):
        raise UpstreamError("upstream sent an event that is not a JSON object")
    if name and "type" not in value:
        value["type"] = name
    return value


def _refusal(detail: str, words: str) -> InvalidArgument:
    """A 400 of the upstream: the prompt is too long, or the request is otherwise refused."""
    if "prompt is too long" in detail or "too many tokens" in detail:
        return ContextLengthExceeded(words)
    return InvalidArgument(words)


def _error_body(raw: bytes) -> tuple[str, str]:
    """An Anthropic error body's type and message (`{"type": "error", "error": {...}}`); for a
    body of another shape, no type and its first bytes."""
    detail = raw[:MAX_ERROR_DETAIL].decode(errors="replace")
    try:
        error = orjson.loads(raw).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return "", detail
    if isinstance(error, dict):
        return str(error.get("type") or ""), str(error.get("message") or detail)[:MAX_ERROR_DETAIL]
    return "", str(error or detail)[:MAX_ERROR_DETAIL]


def _timeout(timeout_s: float | None) -> aiohttp.ClientTimeout | None:
    return None if timeout_s is None else aiohttp.ClientTimeout(
        total=timeout_s, connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S)
