"""A remote OpenAI-compatible upstream (Ollama, vLLM, LM Studio, a cloud API) as a hosted model.

The API key is read from the environment variable the spec names and is only ever put in
the Authorization header: every error message is scrubbed of it before it leaves here. The
variable and the URL are checked against the worker's `UpstreamRules` before either is used,
whatever the registry accepted.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx

from services.common.assetspec import AssetSpec
from services.common.errors import FieldProblem, InvalidSpec, UpstreamError
from services.common.upstreams import DEFAULT_UPSTREAM_RULES, UpstreamRules
from services.worker.models.types import (
    Capabilities,
    ChatDelta,
    ChatParams,
    EmbedInput,
    EmbedResult,
    FinishReason,
    HostedModel,
    Usage,
)

log = logging.getLogger(__name__)


class UpstreamHTTPError(UpstreamError):
    """The upstream answered with an error status; `status` is its HTTP status (0: unreachable)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class OpenAIRemoteModel(HostedModel):
    """Proxies chat (streamed) and embeddings to `source.url`, under `source.upstream_model`."""

    def __init__(
        self, spec: AssetSpec, transport: httpx.AsyncBaseTransport | None = None, *,
        upstreams: UpstreamRules = DEFAULT_UPSTREAM_RULES,
    ) -> None:
        """Check the upstream against `upstreams` (`InvalidSpec` naming the field), then
        prepare the client; `resolve` the host so a name for a metadata address is refused."""
        problems = [FieldProblem(f"source.{name}", problem) for name, problem in (
            ("api_key_env", upstreams.key_env_problem(spec.source.api_key_env)),
            ("url", upstreams.url_problem(spec.source.url, resolve=True)),
        ) if problem]
        if problems:
            raise InvalidSpec.from_problems(problems)
        self.asset_id = spec.asset_id
        self.interfaces = tuple(spec.interface)
        self.upstream_model = spec.source.upstream_model or spec.asset_id
        self.capabilities = Capabilities(
            context_length=spec.metadata.context_length or 0,
            embedding_dim=spec.metadata.embedding_dim or 0,
            supports_system_role=True,
            supports_tools=True,
            streaming=True,
        )
        env = spec.source.api_key_env
        self._key = os.environ.get(env, "") if env else ""
        if env and not self._key:
            log.warning("%s: environment variable %s is empty; calling without auth", self.asset_id, env)
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        self._client = httpx.AsyncClient(
            base_url=spec.source.url.rstrip("/") + "/",
            headers=headers,
            timeout=httpx.Timeout(30.0, read=300.0),
            transport=transport,
        )

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _chat_body(self, params: ChatParams) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {"model": self.upstream_model, "stream": True}
        body["stream_options"] = {"include_usage": True}
        if params.prompt is not None:
            path, body["prompt"] = "completions", params.prompt
        else:
            path = "chat/completions"
            body["messages"] = [
                {"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})} for m in params.messages
            ]
            if params.tools:
                body["tools"] = [t.to_openai() for t in params.tools]
        optional = {
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
            "seed": params.seed,
            "stop": params.stop or None,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        return path, body

    async def _chat(self, params: ChatParams) -> AsyncIterator[ChatDelta]:
        path, body = self._chat_body(params)
        finish: FinishReason | None = None
        usage: Usage | None = None
        try:
            async with self._client.stream("POST", path, json=body) as response:
                await self._raise_for_status(response)
                async for event in _sse_events(response):
                    if event.get("error"):
                        raise UpstreamHTTPError(self._scrub(f"upstream error: {event['error']}"), 502)
                    if event.get("usage"):
                        usage = Usage(
                            prompt_tokens=int(event["usage"].get("prompt_tokens") or 0),
                            completion_tokens=int(event["usage"].get("completion_tokens") or 0),
                        )
                    for choice in event.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
                        if choice.get("finish_reason"):
                            finish = "length" if choice["finish_reason"] == "length" else "stop"
                        if text:
                            yield ChatDelta(text)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        yield ChatDelta("", finish_reason=finish or "stop", usage=usage)

    async def _embed(self, inputs: list[EmbedInput]) -> EmbedResult:
        # OpenAI takes either strings or token arrays in one request, not a mix.
        groups: dict[bool, list[int]] = {}
        for i, item in enumerate(inputs):
            groups.setdefault(isinstance(item, str), []).append(i)
        vectors: list[list[float]] = [[] for _ in inputs]
        tokens = 0
        for indices in groups.values():
            batch = [item if isinstance(item, str) else [int(t) for t in item] for item in (inputs[i] for i in indices)]
            data = await self._post_json("embeddings", {"model": self.upstream_model, "input": batch})
            rows = sorted(data.get("data") or [], key=lambda row: row.get("index", 0))
            if len(rows) != len(indices):
                raise UpstreamHTTPError(f"upstream returned {len(rows)} embeddings for {len(indices)} inputs")
            for i, row in zip(indices, rows, strict=True):
                vectors[i] = [float(v) for v in row["embedding"]]
            tokens += int((data.get("usage") or {}).get("prompt_tokens") or 0)
        return EmbedResult(vectors=vectors, prompt_tokens=tokens, dimensions=len(vectors[0]))

    async def _post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = await self._client.post(path, json=body)
            await self._raise_for_status(response)
            return response.json()
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        except ValueError:
            raise UpstreamHTTPError("upstream returned a body that is not JSON", 502) from None

    async def _raise_for_status(self, response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        await response.aread()
        detail = response.text[:500]
        try:
            error = response.json().get("error")
            detail = error.get("message", detail) if isinstance(error, dict) else str(error or detail)
        except (ValueError, AttributeError):
            pass
        message = self._scrub(f"upstream returned HTTP {response.status_code}: {detail}")
        log.warning("%s: %s", self.asset_id, message)
        raise UpstreamHTTPError(message, response.status_code)

    def _unreachable(self, exc: httpx.HTTPError) -> UpstreamHTTPError:
        message = self._scrub(f"upstream request failed: {type(exc).__name__}: {exc}")
        log.warning("%s: %s", self.asset_id, message)
        return UpstreamHTTPError(message)

    async def close(self) -> None:
        """Close the HTTP connection pool."""
        await self._client.aclose()


async def _sse_events(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON payloads of a server-sent event stream, until `[DONE]`."""
    data: list[str] = []
    async for line in response.aiter_lines():
        if line.startswith("data:"):
            data.append(line[5:].strip())
            continue
        if line or not data:
            continue
        payload, data = "\n".join(data), []
        if payload == "[DONE]":
            return
        try:
            yield json.loads(payload)
        except ValueError:
            raise UpstreamHTTPError("upstream sent an event that is not JSON", 502) from None
    if data and data[0] != "[DONE]":
        yield json.loads("\n".join(data))
