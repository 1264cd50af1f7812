"""Serving `/api/chat`, `/api/generate`, `/api/embed` and `/api/embeddings` through the gateway.

Every request goes through the gateway as the OpenAI API's do, so keys, limits, routes and
the usage ledger apply alike. A stream is NDJSON, one object per line, as Ollama writes it:
the text as it comes (`message.content` or `response`), tool calls once complete, then a last
line with `done: true`, `done_reason` and the counts and durations (nanoseconds). The first
chunk is awaited before the response starts, so a refusal is a plain HTTP error; a failure
after that is a last `{"error": ...}` line.

Durations: `total_duration` from the request's arrival to its last chunk; up to the first
chunk is `load_duration` when no worker held the model at arrival (it was woken), else
`prompt_eval_duration`; from the first chunk to the last is `eval_duration`.

A chat without messages, or a generate without a prompt, only loads the model (or unloads
it with `keep_alive: 0`), answering `done_reason` `load` (`unload`), as Ollama does; so does
an embed without input. Such a request is one request of the key's limits (it uses no
tokens; over the key's rpm it is refused with a 429) and a ledger row with zero tokens.

`keep_alive` that the key may not apply is refused before anything runs (see `lifecycle`).
It is applied once the answer is complete; if that fails, the answer is that error (its
message says the answer was generated), or a stream ends with it as its last line instead
of the `done` one.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import Request
from fastapi.responses import Response

from roundhouse.v1 import inference_pb2
from services.common.asset_proto import AssetRecord, check_serves
from services.common.errors import FieldProblem, InvalidArgument, RoundhouseError, UpstreamError
from services.common.keys import KeyRecord
from services.router.gateway import EMBEDDING, LLM, embedding_dim
from services.router.http.auth import request_key
from services.router.http.ollama.errors import error_line
from services.router.http.ollama.lifecycle import ModelLifecycle, shown
from services.router.http.ollama.options import check_num_ctx
from services.router.http.ollama.protocol import ChatBody, EmbedBody, GenerateBody
from services.router.http.ollama.views import context_length, now
from services.router.http.streaming import (
    EventStreamResponse,
    client_timeout,
    close,
    first_chunk,
    routed_for,
    until_disconnected,
)

if TYPE_CHECKING:
    from services.common.route_proto import Stored
    from services.router.gateway import Gateway


NDJSON = "application/x-ndjson"


def line(payload: dict[str, Any]) -> bytes:
    """One NDJSON line."""
    return orjson.dumps(payload) + b"\n"


class NDJSONResponse(EventStreamResponse):
    """NDJSON lines, watching for the client's disconnect as the SSE responses do."""

    media_type = NDJSON


class Turn:
    """What one answer has produced so far: text, tool calls (by index), timings, the end."""

    def __init__(self, started: float, woken: bool) -> None:
        self.started, self.woken = started, woken
        self.first_at = self.ended = started
        self.calls: dict[int, dict[str, str]] = {}
        self.last = inference_pb2.ChatChunk()

    def take(self, chunk: inference_pb2.ChatChunk) -> None:
        """Note a chunk's tool-call pieces and, for the last one, the end."""
        for piece in chunk.tool_calls:
            call = self.calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
            call["id"] = call["id"] or piece.id
            call["name"] = call["name"] or piece.name
            call["arguments"] += piece.arguments
        if chunk.finish_reason or chunk.HasField("usage"):
            self.last = chunk
        self.ended = time.perf_counter()

    def tool_calls(self) -> list[dict[str, Any]]:
        """The calls made, in Ollama's shape (arguments as an object)."""
        calls = []
        for index, call in sorted(self.calls.items()):
            try:
                arguments = json.loads(call["arguments"] or "{}")
            except ValueError:
                raise UpstreamError(f"the model's call of {call['name']} has arguments that are not "
                                    "JSON") from None
            calls.append({"id": call["id"], "function": {"index": index, "name": call["name"],
                                                         "arguments": arguments}})
        return calls

    def stats(self) -> dict[str, Any]:
        """`done_reason`, counts and durations, for the last line."""
        ns = 1_000_000_000
        waited = int((self.first_at - self.started) * ns)
        usage = self.last.usage
        return {
            "done": True,
            "done_reason": "length" if self.last.finish_reason == inference_pb2.FINISH_REASON_LENGTH else "stop",
            "total_duration": int((self.ended - self.started) * ns),
            "load_duration": waited if self.woken else 0,
            "prompt_eval_count": usage.prompt_tokens,
            "prompt_eval_duration": 0 if self.woken else waited,
            "eval_count": usage.completion_tokens,
            "eval_duration": int((self.ended - self.first_at) * ns),
        }


def logprobs(chunk: inference_pb2.ChatChunk) -> list[dict[str, Any]]:
    """A chunk's log probabilities in Ollama's shape."""
    return [{"token": p.token, "logprob": p.logprob, "bytes": list(p.bytes),
             "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)}
                              for t in p.top_logprobs]} for p in chunk.logprobs]


class OllamaServing:
    """Chat, generate and embeddings in Ollama's shapes, over the gateway."""

    def __init__(self, gateway: Gateway, lifecycle: ModelLifecycle) -> None:
        self.gateway = gateway
        self.lifecycle = lifecycle

    async def chat(self, body: ChatBody, request: Request) -> Response:
        """`POST /api/chat`."""
        record = await self._model(body.model, body.keep_alive, request, LLM)
        if not body.messages:
            return await self._load_only(body.model, record, body.keep_alive, LLM, request,
                                         {"message": {"role": "assistant", "content": ""}})
        return await self._generate(body, record, request, body.to_proto(
            request.state.request_id, await self._context_length(record, body)), chat=True)

    async def generate(self, body: GenerateBody, request: Request) -> Response:
        """`POST /api/generate`."""
        record = await self._model(body.model, body.keep_alive, request, LLM)
        if body.load_only:
            return await self._load_only(body.model, record, body.keep_alive, LLM, request, {"response": ""})
        return await self._generate(body, record, request, body.to_proto(
            request.state.request_id, await self._context_length(record, body)), chat=False)

    async def embed(self, body: EmbedBody, request: Request, *, legacy: bool = False) -> Response:
        """`POST /api/embed` (`legacy`: `/api/embeddings`, one vector as `embedding`)."""
        key = request_key(request)
        record = await self._model(body.model, body.keep_alive, request, EMBEDDING)
        if body.inputs in ([], [""]):
            await self._load_only(body.model, record, body.keep_alive, EMBEDDING, request, {})
            return _json({"embedding": []} if legacy else {"model": body.model, "embeddings": []})
        check_num_ctx(body.options.num_ctx if body.options else None, await self._context_length(record, body))
        dim = embedding_dim(record) if isinstance(record, AssetRecord) else 0
        if body.dimensions is not None and dim:
            _check_dimensions(body.dimensions, dim)
        started = time.perf_counter()
        woken = self._woken(record)
        result = await until_disconnected(request, self.gateway.embed(
            body.to_proto(request.state.request_id), timeout=client_timeout(request), key=key,
            routed=routed_for(request)))
        if body.dimensions is not None:
            _check_dimensions(body.dimensions, result.dimensions or len(result.embeddings[0].values))
        vectors = [list(e.values) for e in result.embeddings]
        await self._keep(result.asset_id, record, body.keep_alive, key)
        if legacy:
            return _json({"embedding": vectors[0]})
        elapsed = int((time.perf_counter() - started) * 1e9)
        return _json({"model": body.model, "embeddings": vectors, "total_duration": elapsed,
                      "load_duration": elapsed if woken else 0,
                      "prompt_eval_count": result.usage.prompt_tokens})

    async def _generate(self, body: ChatBody | GenerateBody, record: Stored, request: Request,
                        proto: inference_pb2.ChatRequest, *, chat: bool) -> Response:
        turn = Turn(time.perf_counter(), self._woken(record))
        routed = routed_for(request)
        chunks = self.gateway.chat(proto, timeout=client_timeout(request), key=request_key(request),
                                   stream=body.stream, routed=routed)
        first = await first_chunk(request, chunks)
        turn.first_at = time.perf_counter()
        head = {"model": body.model}

        def piece(text: str, chunk: inference_pb2.ChatChunk | None = None, **more: Any) -> dict[str, Any]:
            content = {"message": {"role": "assistant", "content": text, **more}} if chat else {"response": text}
            payload = {**head, "created_at": now(), **content, "done": False}
            if chunk is not None and chunk.logprobs:
                payload["logprobs"] = logprobs(chunk)
            return payload

        if not body.stream:
            async def whole() -> dict[str, Any]:
                parts, probs = [first.delta], logprobs(first)
                turn.take(first)
                async for chunk in chunks:
                    turn.take(chunk)
                    parts.append(chunk.delta)
                    probs += logprobs(chunk)
                calls = turn.tool_calls()
                answer = piece("".join(parts), **({"tool_calls": calls} if calls else {}))
                if probs:
                    answer["logprobs"] = probs
                return answer

            try:
                answer = await until_disconnected(request, whole())
            finally:
                await close(chunks)
            await self._keep(turn.last.asset_id or first.asset_id, record, body.keep_alive,
                             request_key(request))
            return _json({**answer, **turn.stats()}, routed.headers())

        async def lines() -> AsyncIterator[bytes]:
            try:
                chunk: inference_pb2.ChatChunk | None = first
                while chunk is not None:
                    turn.take(chunk)
                    if chunk.delta or chunk.logprobs:
                        yield line(piece(chunk.delta, chunk))
                    chunk = await anext(chunks, None)
                if calls := turn.tool_calls():
                    yield line(piece("", tool_calls=calls))
                await self._keep(turn.last.asset_id or first.asset_id, record, body.keep_alive,
                                 request_key(request))
                yield line({**piece(""), **turn.stats()})
            except Exception as exc:
                yield error_line(exc, request.state.request_id)
            finally:
                await close(chunks)

        return NDJSONResponse(lines(), headers=routed.headers())

    async def _model(self, name: str, keep_alive: float | None, request: Request, interface: str) -> Stored:
        """The model or route `name` names, if the request's key may use it and apply its
        `keep_alive` to it. A refusal here is recorded in the usage ledger, as the gateway
        records the refusals of the requests it serves."""
        key = request_key(request)
        try:
            record = await self.gateway.get_model(name, key=key)
            await self.lifecycle.check(key, record, keep_alive)
        except RoundhouseError:
            async with self.gateway.tokenless(key, name, interface, request.state.request_id):
                raise
        return record

    async def _context_length(self, record: Stored, body: ChatBody | GenerateBody | EmbedBody) -> int:
        """The context length `options.num_ctx` is checked against (0: not known): the model's,
        or the shortest of a route's models. Only looked up when the request sets it."""
        if body.options is None or body.options.num_ctx is None:
            return 0
        lengths = [context_length(r) for r in await self.lifecycle.answering(record)]
        return 0 if not lengths or 0 in lengths else min(lengths)

    async def _load_only(self, name: str, record: Stored, keep_alive: float | None, interface: str,
                         request: Request, empty: dict[str, Any]) -> Response:
        """Load the model (or unload it, with `keep_alive` 0); Ollama's answer to a request
        with nothing to generate. One request of the key's limits, with no tokens."""
        if not isinstance(record, AssetRecord):
            raise InvalidArgument.from_problems([FieldProblem(
                "model", f"'{name}' is a route: only a model can be loaded or unloaded")])
        check_serves(record, name, interface)
        key = request_key(request)
        async with self.gateway.tokenless(key, name, interface, request.state.request_id) as ticket:
            await self.gateway.admit_tokenless(ticket, key, record)
            if keep_alive == 0:
                await self.lifecycle.keep(record, 0, key)
                reason = "unload"
            else:
                if self._woken(record):
                    ticket.mark_woke()
                await self.lifecycle.load(record)
                if keep_alive is not None:
                    await self.lifecycle.keep(record, keep_alive, key)
                reason = "load"
        return _json({"model": name, "created_at": now(), **empty, "done": True, "done_reason": reason})

    async def _keep(self, asset_id: str, record: Stored, keep_alive: float | None,
                    key: KeyRecord | None) -> None:
        """Apply `keep_alive` to the asset that answered (a route's target, for a route); a
        failure is raised, its message saying that the answer was generated."""
        if keep_alive is None:
            return
        try:
            if not isinstance(record, AssetRecord) or record.spec.asset_id != asset_id:
                record = await self.gateway.get_model(asset_id)
            if isinstance(record, AssetRecord):
                await self.lifecycle.keep(record, keep_alive, key)
        except RoundhouseError as exc:
            exc.message = (f"the answer was generated, but keep_alive {shown(keep_alive)} was not "
                           f"applied to '{asset_id}': {exc.message}")
            exc.args = (exc.message,)
            raise

    def _woken(self, record: Stored) -> bool:
        """Whether a request to the model has to wake it now (no worker holds it)."""
        return isinstance(record, AssetRecord) and self.gateway.workers.pick(record.spec.asset_id) is None


def _check_dimensions(wanted: int, actual: int) -> None:
    if wanted != actual:
        raise InvalidArgument.from_problems([FieldProblem(
            "dimensions", f"the model produces {actual}-dimensional vectors and cannot shorten "
                          f"them; leave dimensions out or send {actual}")])


def _json(payload: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), media_type="application/json", headers=headers)
