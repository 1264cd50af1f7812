"""The HTTP side every remote model API client shares (`openai_upstream`, `anthropic_upstream`):
one pooled session per asset, the API key in its header, errors scrubbed of that key,
`Retry-After` read, server-sent events split, an upstream that cannot be reached reported as
such.

The asset's key variable and URL are checked against the caller's `UpstreamRules` before
either is used, whatever the registry accepted; the key is read from the environment variable
the asset names (`source.api_key_env`) and only ever put in its header. Every failure leaves
as a domain error whose message no longer holds the key. Connections are kept alive and
reused (aiohttp); the session is opened on the first request, on the caller's event loop.
What an upstream's refusal means is each API's own (`UpstreamHTTP._status_error`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson

from services.common.assetspec import AssetSpec
from services.common.errors import FieldProblem, InvalidSpec, RoundhouseError, UpstreamError
from services.common.upstreams import UpstreamRules

CONNECT_TIMEOUT_S = 30.0
READ_TIMEOUT_S = 300.0
"""Longest silence between two reads of an answer (a slow upstream's first token included)."""
MAX_CONNECTIONS = 256
"""Connections kept to one upstream at most; more concurrent requests wait for one."""
MAX_ERROR_DETAIL = 500
"""Characters of an upstream's error words kept in a message."""


class UpstreamHTTP:
    """The HTTP client of one asset's upstream at `base_url`: model `source.upstream_model`
    (the asset id when unset), key from `source.api_key_env`, sent in `key_header`."""

    def __init__(self, spec: AssetSpec, *, upstreams: UpstreamRules, resolve: bool, base_url: str,
                 key_header: str, key_prefix: str = "", headers: Mapping[str, str] | None = None) -> None:
        """Check the upstream against `upstreams` (`InvalidSpec` naming the field) before the
        key is read. With `resolve` the URL's host is looked up (blocking: call from a thread),
        so a name for a metadata address is refused too. `headers` go with every request."""
        problems = [FieldProblem(f"source.{name}", problem) for name, problem in (
            ("api_key_env", upstreams.key_env_problem(spec.source.api_key_env)),
            ("url", upstreams.url_problem(spec.source.url, resolve=resolve)),
        ) if problem]
        if problems:
            raise InvalidSpec.from_problems(problems)
        self._log = logging.getLogger(type(self).__module__)
        self.asset_id = spec.asset_id
        self.model = spec.source.upstream_model or spec.asset_id
        self.base_url = base_url
        self.key_env = spec.source.api_key_env
        self._key = os.environ.get(self.key_env, "") if self.key_env else ""
        if self.key_env and not self._key:
            self._log.warning("%s: environment variable %s is empty; calling without a key",
                              self.asset_id, self.key_env)
        self._headers = {"Content-Type": "application/json", **(headers or {}),
                         **({key_header: key_prefix + self._key} if self._key else {})}
        self._session: aiohttp.ClientSession | None = None

    def _status_error(self, status: int, body: bytes, retry_after_s: float) -> RoundhouseError:
        """The domain error of an answer with HTTP `status` >= 400 and `body` (the key is
        scrubbed from it afterwards); each API maps its refusals its own way."""
        return UpstreamError(f"upstream returned HTTP {status}: {error_body(body)[1]}")

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

    @asynccontextmanager
    async def _posted(self, path: str, body: dict[str, Any],
                      timeout_s: float | None) -> AsyncIterator[aiohttp.ClientResponse]:
        """The answer to `body` POSTed as JSON to `path` (relative to `base_url`), once its
        status says it succeeded; the mapped error otherwise, or when the upstream cannot be
        reached or stops answering (within the block too)."""
        timeout = None if timeout_s is None else aiohttp.ClientTimeout(
            total=timeout_s, connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S)
        try:
            async with self._client().post(self.base_url + path, data=orjson.dumps(body),
                                           timeout=timeout) as response:
                if response.status >= 400:
                    raw = await response.read()
                    error = self._scrubbed(self._status_error(
                        response.status, raw, retry_after_s(response.headers.get("Retry-After"))))
                    self._log.warning("%s: %s", self.asset_id, error.message)
                    raise error
                yield response
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._unreachable(exc) from None

    async def _post(self, path: str, body: dict[str, Any], timeout_s: float | None) -> bytes:
        """The body of the answer to `body` POSTed as JSON to `path` (see `_posted`)."""
        async with self._posted(path, body, timeout_s) as response:
            return await response.read()

    def _unreachable(self, exc: BaseException) -> UpstreamError:
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        message = self._scrub(f"upstream request failed: {reason}")
        self._log.warning("%s: %s", self.asset_id, message)
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


async def sse_messages(lines: AsyncIterable[bytes]) -> AsyncGenerator[tuple[str, bytes], None]:
    """The events of a server-sent event stream as (name, data) pairs, the name "" where no
    `event:` line gave one and the `data:` lines joined by newlines; comments and events
    without data are skipped."""
    name, data = "", []
    async for raw in lines:
        line = raw.rstrip(b"\r\n")
        if line.startswith(b"data:"):
            data.append(line[5:].removeprefix(b" "))
        elif line.startswith(b"event:"):
            name = line[6:].strip().decode(errors="replace")
        elif not line and data:
            yield name, b"\n".join(data)
            name, data = "", []
        elif not line:
            name = ""
    if data:
        yield name, b"\n".join(data)


def json_object(payload: bytes, what: str) -> dict[str, Any]:
    """`payload` parsed as a JSON object; `UpstreamError` saying what the upstream `what`
    ("returned a body", "sent an event") was otherwise."""
    try:
        value = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise UpstreamError(f"upstream {what} that is not JSON") from None
    if not isinstance(value, dict):
        raise UpstreamError(f"upstream {what} that is not a JSON object")
    return value


def error_body(raw: bytes) -> tuple[dict[str, Any], str]:
    """An error answer's `error` object (`{}` when it has none, as an object) and its words: the
    object's `message`, else the error itself, else the body's first bytes; at most
    `MAX_ERROR_DETAIL` characters."""
    detail = raw[:MAX_ERROR_DETAIL].decode(errors="replace")
    try:
        error = orjson.loads(raw).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return {}, detail
    if isinstance(error, dict):
        return error, str(error.get("message") or detail)[:MAX_ERROR_DETAIL]
    return {}, str(error or detail)[:MAX_ERROR_DETAIL]


def retry_after_s(retry_after: str | None) -> float:
    """An upstream's `Retry-After` in seconds, 1 to 3600 (1 when absent or not a number of
    seconds)."""
    try:
        seconds = float(retry_after or 1)
    except ValueError:
        return 1.0
    return min(max(1.0, seconds), 3600.0) if math.isfinite(seconds) else 1.0
