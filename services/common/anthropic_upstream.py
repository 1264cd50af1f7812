"""A remote Anthropic Messages API (Claude, or another Roundhouse's `/v1/messages`), as one
pooled HTTP client for the `anthropic` assets a worker holds.

The HTTP side is `upstream_http`'s, as for OpenAI-compatible upstreams: the key is read from
the environment variable the asset names (`source.api_key_env`), after that variable and the
URL pass the caller's `UpstreamRules`, and is only ever put in the `x-api-key` header; every
error message is scrubbed of it. The upstream's refusals keep their meaning as domain errors, so a
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

from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator
from contextlib import aclosing
from typing import Any

import orjson

from services.common.assetspec import AssetSpec
from services.common.errors import (
    ContextLengthExceeded,
    InvalidArgument,
    Overloaded,
    RoundhouseError,
    UpstreamError,
)
from services.common.upstream_http import UpstreamHTTP, error_body, json_object, sse_messages
from services.common.upstreams import UpstreamRules

ANTHROPIC_VERSION = "2023-06-01"
"""The `anthropic-version` header sent with every request."""

OVERLOADED_STATUS = 529
"""Anthropic's status for an API that is overloaded for everyone (not a rate limit)."""


class AnthropicUpstream(UpstreamHTTP):
    """The client of one asset's upstream: `{source.url}/v1/messages`, model
    `source.upstream_model` (the asset id when unset), key from `source.api_key_env`."""

    def __init__(self, spec: AssetSpec, *, upstreams: UpstreamRules, resolve: bool = True) -> None:
        """Check the upstream against `upstreams` (`InvalidSpec` naming the field) before the
        key is read. With `resolve` the URL's host is looked up (blocking: call from a thread),
        so a name for a metadata address is refused too. The URL is the API's root
        (`https://api.anthropic.com`); one ending in `/v1` is taken as well."""
        super().__init__(spec, upstreams=upstreams, resolve=resolve,
                         base_url=spec.source.url.rstrip("/").removesuffix("/v1") + "/v1/",
                         key_header="x-api-key", headers={"anthropic-version": ANTHROPIC_VERSION})

    async def stream(self, body: dict[str, Any], *, timeout_s: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """POST `body` (a Messages request; `stream` is set here) and yield each event's payload
        (`{"type": "message_start", ...}`) as it arrives, through `message_stop`. An `error`
        event raises its mapped error; a stream that ends before `message_stop` raises
        `UpstreamError`."""
        async with self._posted("messages", {**body, "stream": True}, timeout_s) as response, \
                aclosing(sse_events(response.content)) as events:
            async for event in events:
                if event.get("type") == "error":
                    raise self._scrubbed(event_error(event.get("error")))
                yield event
                if event.get("type") == "message_stop":
                    return
        raise UpstreamError("upstream stream ended before message_stop")

    async def count_tokens(self, body: dict[str, Any], *, timeout_s: float | None = None) -> int:
        """The input tokens the upstream counts for `body` (`model`, `system`, `messages`,
        `tools`, `tool_choice`), from `/v1/messages/count_tokens`."""
        payload = await self._post("messages/count_tokens", body, timeout_s)
        try:
            counted = orjson.loads(payload)["input_tokens"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise UpstreamError("upstream answered count_tokens without input_tokens") from None
        if not isinstance(counted, int) or counted < 0:
            raise UpstreamError("upstream answered count_tokens with an input_tokens that is no count")
        return counted

    def _status_error(self, status: int, body: bytes, retry_after_s: float) -> RoundhouseError:
        error, detail = error_body(body)
        kind = str(error.get("type") or "")
        words = f"upstream returned HTTP {status}{f' ({kind})' if kind else ''}: {detail}"
        if status in (401, 403):
            where = f"the key in {self.key_env}" if self.key_env else "no key (source.api_key_env is unset)"
            return UpstreamError(f"upstream refused {where}: {words}")
        if status == 404:
            return UpstreamError(f"upstream has no model '{self.model}' or no Messages API at "
                                 f"{self.base_url}messages: {words}")
        if status in (429, OVERLOADED_STATUS) or kind in ("rate_limit_error", "overloaded_error"):
            return Overloaded(words, retry_after_s=retry_after_s)
        if status in (400, 413, 422):
            return _refusal(detail, words)
        return UpstreamError(words)


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


async def sse_events(lines: AsyncIterable[bytes]) -> AsyncGenerator[dict[str, Any], None]:
    """The JSON payloads of a server-sent event stream (Anthropic's: `event:` and `data:` lines,
    a blank line after each event). The payload's `type` is the event's name where the payload
    has none; comments and events without data are skipped."""
    async with aclosing(sse_messages(lines)) as messages:
        async for name, data in messages:
            value = json_object(data, "sent an event")
            if name and "type" not in value:
                value["type"] = name
            yield value


def _refusal(detail: str, words: str) -> InvalidArgument:
    """A 400 of the upstream: the prompt is too long, or the request is otherwise refused."""
    if "prompt is too long" in detail or "too many tokens" in detail:
        return ContextLengthExceeded(words)
    return InvalidArgument(words)
