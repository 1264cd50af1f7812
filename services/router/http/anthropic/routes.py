"""The Messages API routes: parse, hand to `MessagesServing`, answer (errors in Anthropic's
shape, see `errors.AnthropicRoute`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from services.router.http.anthropic.errors import AnthropicErrorResponse, AnthropicRoute
from services.router.http.anthropic.protocol import CountTokensRequest, Message, MessagesRequest, TokenCount

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": AnthropicErrorResponse,
          "description": "`invalid_request_error`: the request is invalid; the message names the field."},
    404: {"model": AnthropicErrorResponse, "description": "`not_found_error`: no model has that name."},
    409: {"model": AnthropicErrorResponse, "description": "`invalid_request_error`: the model is disabled."},
    413: {"model": AnthropicErrorResponse, "description": "`request_too_large`: the body is too large."},
    424: {"model": AnthropicErrorResponse,
          "description": "`api_error`: the model failed (its load, or its engine)."},
    429: {"model": AnthropicErrorResponse,
          "description": "`rate_limit_error`: the API key is over a rate limit or its budget; see "
                         "Retry-After."},
    500: {"model": AnthropicErrorResponse, "description": "`api_error`: an unexpected failure."},
    502: {"model": AnthropicErrorResponse, "description": "`api_error`: the model's remote upstream failed."},
    503: {"model": AnthropicErrorResponse,
          "description": "`overloaded_error`: the model is not ready, the key's limits cannot be "
                         "checked now, or the router is shutting down; see Retry-After."},
    504: {"model": AnthropicErrorResponse, "description": "`timeout_error`: the request's deadline passed."},
    529: {"model": AnthropicErrorResponse,
          "description": "`overloaded_error`: the model's queue is full; see Retry-After."},
}
STREAM: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}},
          "description": "The message, or with `stream: true` Anthropic's server-sent events."},
}
HEADERS: dict[str, Any] = {"parameters": [
    {"name": "anthropic-version", "in": "header", "required": False, "schema": {"type": "string"},
     "description": "Accepted (e.g. `2023-06-01`), not required; the API answers one way."},
]}

# Bodies are validated once and the endpoint called directly (see `body_route`).
messages_router = APIRouter(prefix="/v1", responses=ERRORS, route_class=AnthropicRoute,
                            tags=["anthropic"])


@messages_router.post("/messages", response_model=Message, responses=STREAM, openapi_extra=HEADERS)
async def create_message(body: MessagesRequest, request: Request) -> Response:
    """Anthropic's Messages API on an `llm-runtime` model: text, system prompt, tools."""
    return await request.app.state.messages.create(body, request)


@messages_router.post("/messages/count_tokens", response_model=TokenCount, openapi_extra=HEADERS)
async def count_message_tokens(body: CountTokensRequest, request: Request) -> Response:
    """The input tokens a message request would use on the model (woken to count)."""
    return await request.app.state.messages.count_tokens(body, request)
