"""The Ollama-compatible API: `/api/...` routes, and `/` answering "Ollama is running".

Each route parses its own body (Ollama clients send JSON with any content type) and answers
every failure in Ollama's shape, `{"error": "..."}` (see `errors`). Keys are checked as for
the OpenAI API (`Authorization: Bearer`, or `x-api-key`), with each model's scope;
`/api/pull` and `/api/delete` need an admin key, as the admin API's install and delete do
(so does a `keep_alive` that changes a model's lifecycle, see `lifecycle`). The routes are
left out of the OpenAPI document, which describes the OpenAI API; Ollama's own documentation
describes these.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel

from services.common.asset_proto import AssetRecord
from services.common.errors import FieldProblem, InvalidArgument, NotFound, PermissionDenied
from services.router.http.auth import request_key
from services.router.http.ollama.errors import error_line, error_response
from services.router.http.ollama.lifecycle import ModelLifecycle
from services.router.http.ollama.protocol import (
    ChatBody,
    EmbedBody,
    EmbeddingsBody,
    GenerateBody,
    NamedModel,
    PullBody,
)
from services.router.http.ollama.serving import NDJSONResponse, OllamaServing, line
from services.router.http.ollama.views import running, show, tag
from services.router.keys import check_admin
from services.router.keys.scope import allowed_models

B = TypeVar("B", bound=BaseModel)
RUNNING = "Ollama is running"
VERSION = importlib.metadata.version("roundhouse")

ollama_router = APIRouter(include_in_schema=False)


def ollama_errors(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Answer any failure of `endpoint` in Ollama's shape."""

    @functools.wraps(endpoint)
    async def answered(request: Request) -> Response:
        try:
            return await endpoint(request)
        except Exception as exc:
            return error_response(exc, getattr(request.state, "request_id", None))

    return answered


async def parsed(request: Request, model: type[B]) -> B:
    """The request's JSON body as `model`; a 400 naming what is wrong otherwise."""
    raw = await request.body()
    try:
        document = json.loads(raw) if raw.strip() else None
    except ValueError as exc:
        raise InvalidArgument(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidArgument("the request body must be a JSON object")
    return model.model_validate(document)


def _serving(request: Request) -> OllamaServing:
    serving: OllamaServing = request.app.state.ollama
    return serving


def _lifecycle(request: Request) -> ModelLifecycle:
    return _serving(request).lifecycle


@ollama_router.api_route("/", methods=["GET", "HEAD"])
async def root() -> PlainTextResponse:
    """What Ollama answers at its root; clients probe it."""
    return PlainTextResponse(RUNNING)


@ollama_router.get("/api/version")
@ollama_errors
async def version(request: Request) -> Response:
    """Roundhouse's version."""
    return Response(orjson.dumps({"version": VERSION}), media_type="application/json")


@ollama_router.get("/api/tags")
@ollama_errors
async def tags(request: Request) -> Response:
    """Every model (and route) the key may use; nothing is loaded to answer."""
    records = await _serving(request).gateway.list_models(key=request_key(request))
    sizes = await _lifecycle(request).stored_bytes()
    models = [tag(r, sizes.get(r.spec.asset_id, 0)) for r in records]
    return Response(orjson.dumps({"models": models}), media_type="application/json")


@ollama_router.get("/api/ps")
@ollama_errors
async def ps(request: Request) -> Response:
    """The models the workers hold now that the key may use, one entry per worker holding one."""
    gateway = _serving(request).gateway
    records = {r.spec.asset_id: r for r in allowed_models(request_key(request), await gateway.catalog.snapshot())
               if isinstance(r, AssetRecord)}
    models = []
    for worker in gateway.workers.healthy():
        assert worker.info is not None  # healthy
        for held in worker.info.models:
            if (record := records.get(held.asset_id)) is not None:
                models.append(running(record, held.memory_bytes, worker.info.has_gpu,
                                      held.last_used_at.ToDatetime(), held.in_flight))
    return Response(orjson.dumps({"models": models}), media_type="application/json")


@ollama_router.post("/api/show")
@ollama_errors
async def show_model(request: Request) -> Response:
    """A model's Modelfile-like summary, details, model info and capabilities."""
    body = await parsed(request, NamedModel)
    record = await _serving(request).gateway.get_model(body.model, key=request_key(request))
    return Response(orjson.dumps(show(record)), media_type="application/json")


@ollama_router.post("/api/chat")
@ollama_errors
async def chat(request: Request) -> Response:
    """Chat with a language model."""
    return await _serving(request).chat(await parsed(request, ChatBody), request)


@ollama_router.post("/api/generate")
@ollama_errors
async def generate(request: Request) -> Response:
    """Complete a prompt with a language model."""
    return await _serving(request).generate(await parsed(request, GenerateBody), request)


@ollama_router.post("/api/embed")
@ollama_errors
async def embed(request: Request) -> Response:
    """Embed one input or several."""
    return await _serving(request).embed(await parsed(request, EmbedBody), request)


@ollama_router.post("/api/embeddings")
@ollama_errors
async def embeddings(request: Request) -> Response:
    """Embed one prompt (Ollama's older endpoint)."""
    body = await parsed(request, EmbeddingsBody)
    return await _serving(request).embed(body.embed(), request, legacy=True)


@ollama_router.post("/api/pull")
@ollama_errors
async def pull(request: Request) -> Response:
    """Install a declared model, streaming Ollama's progress lines (one line at the end
    with `stream: false`); an admin key is needed."""
    key = request_key(request)
    if key is not None and not key.admin:
        raise PermissionDenied("pulling installs a model for every client, which needs an admin "
                               "key; ask an operator to install it, or use an admin key")
    body = await parsed(request, PullBody)
    record = await _serving(request).gateway.get_model(body.model, key=key)
    if not isinstance(record, AssetRecord):
        raise InvalidArgument.from_problems([FieldProblem(
            "model", f"'{body.model}' is a route: pull the models it names")])
    progress = _lifecycle(request).pull(record)
    if not body.stream:
        updates = [update async for update in progress]
        return Response(orjson.dumps(updates[-1]), media_type="application/json")
    first = await anext(progress)

    async def lines() -> AsyncIterator[bytes]:
        try:
            yield line(first)
            async for update in progress:
                yield line(update)
        except Exception as exc:
            yield error_line(exc, request.state.request_id)
        finally:
            await progress.aclose()

    return NDJSONResponse(lines())


@ollama_router.delete("/api/delete")
@ollama_errors
async def delete(request: Request) -> Response:
    """Delete a model: its files and its registry entry (an admin key is needed)."""
    key = request_key(request)
    check_admin(key)
    body = await parsed(request, NamedModel)
    record = await _serving(request).gateway.get_model(body.model, key=key)
    await _lifecycle(request).delete(record.spec.asset_id)
    return Response(status_code=200)


@ollama_router.api_route("/api/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"])
@ollama_errors
async def unknown(request: Request) -> Response:
    """Any other `/api` path: Ollama's endpoints Roundhouse does not serve (`create`, `copy`,
    `push`, blobs...) and mistakes alike."""
    raise NotFound(f"{request.method} {request.url.path} is not served by Roundhouse's Ollama API")
