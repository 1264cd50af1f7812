"""The OpenAI-compatible routes under `/v1`: parse, hand to the serving object, answer."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from services.router.http.auth import request_key
from services.router.http.body_route import JSONBodyRoute
from services.router.http.chat.protocol import ChatCompletionRequest
from services.router.http.chat.responses import ChatCompletionResponse
from services.router.http.completion.protocol import CompletionRequest, CompletionResponse
from services.router.http.embedding.protocol import EmbeddingRequest, EmbeddingResponse
from services.router.http.protocol import ErrorResponse, ModelCard, ModelList

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "The request is invalid; `error.param` names the field."},
    404: {"model": ErrorResponse, "description": "No model has that name."},
    409: {"model": ErrorResponse, "description": "The model is disabled."},
    413: {"model": ErrorResponse, "description": "The body is too large."},
    424: {"model": ErrorResponse, "description": "The model failed (its load, or its engine); "
                                                 "the message says why. Not worth retrying at once."},
    429: {"model": ErrorResponse, "description": "The model is overloaded or the API key is over a rate "
                                                 "limit (`rate_limit_exceeded`); see Retry-After. Or the "
                                                 "key's budget is spent (`insufficient_quota`)."},
    502: {"model": ErrorResponse, "description": "The model's remote upstream failed."},
    503: {"model": ErrorResponse, "description": "The model is not ready, the API key's limits cannot be "
                                                 "checked now, or the router is shutting down "
                                                 "(`shutting_down`: retry, on another replica); see "
                                                 "Retry-After."},
}
STREAM: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE if streamed."},
}

# Bodies are validated once and the endpoint called directly (see `body_route`).
openai_router = APIRouter(prefix="/v1", responses=ERRORS, route_class=JSONBodyRoute)


@openai_router.get("/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    """Every asset the API key may use, as OpenAI model objects; nothing is loaded to answer."""
    records = await request.app.state.gateway.list_models(key=request_key(request))
    return ModelList(data=[ModelCard.from_record(r) for r in records])


@openai_router.get("/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, request: Request) -> ModelCard:
    """One asset by id or alias."""
    return ModelCard.from_record(await request.app.state.gateway.get_model(model_id, key=request_key(request)))


@openai_router.post("/chat/completions", response_model=ChatCompletionResponse,
                    responses=STREAM)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    """Chat with an `llm-runtime` model."""
    return await request.app.state.chat.create(body, request)


@openai_router.post("/completions", response_model=CompletionResponse, responses=STREAM)
async def completions(body: CompletionRequest, request: Request) -> Response:
    """Complete a raw prompt with an `llm-runtime` model."""
    return await request.app.state.completion.create(body, request)


@openai_router.post("/embeddings", response_model=EmbeddingResponse)
async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
    """Embed with an `embedding-runtime` model."""
    return await request.app.state.embedding.create(body, request)
