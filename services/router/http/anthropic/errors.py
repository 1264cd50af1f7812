"""Anthropic's error shape for the Messages API: `{"type": "error", "error": {"type", "message"},
"request_id"}` with the status codes Anthropic's clients expect.

The failure itself is judged once, by the OpenAI mapping (`services.router.http.errors.describe`):
the same status, message and headers (Retry-After included), only spelled as Anthropic does. An
overloaded model, which OpenAI's clients see as a 429, is Anthropic's 529 `overloaded_error`; a
prompt beyond the model's context is a 400 whose message begins "prompt is too long", as
Anthropic's does.
`AnthropicRoute` renders every failure of a Messages route (validation included) this way;
`anthropic_error_response` does it for the layers around the routes (authentication, the body
limit, the drain), see `RequestContextMiddleware`.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from services.router.http.body_route import JSONBodyRoute
from services.router.http.errors import describe
from services.router.http.rendering import OrjsonResponse

log = logging.getLogger(__name__)

MESSAGES_PATH = "/v1/messages"
"""The Messages API's paths all start so; errors under it take Anthropic's shape."""
REQUEST_ID_HEADER = "request-id"
"""Where Anthropic's clients read the request id (`x-request-id` is sent as well)."""
OVERLOADED_STATUS = 529
TOO_LONG = "prompt is too long"
"""How Anthropic's refusal of a prompt beyond the context begins."""

ErrorType = Literal[
    "invalid_request_error", "authentication_error", "billing_error", "permission_error",
    "not_found_error", "request_too_large", "rate_limit_error", "timeout_error", "api_error",
    "overloaded_error",
]
_TYPE_BY_STATUS: dict[int, ErrorType] = {
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    OVERLOADED_STATUS: "overloaded_error",
}


class AnthropicErrorInfo(BaseModel):
    """What went wrong: Anthropic's error type and a message."""

    type: ErrorType
    message: str


class AnthropicErrorResponse(BaseModel):
    """The body of every error of the Messages API (and of its stream's `error` event)."""

    type: Literal["error"] = "error"
    error: AnthropicErrorInfo
    request_id: str | None = None


def anthropic_error(exc: BaseException, request_id: str | None) -> tuple[int, AnthropicErrorResponse,
                                                                          dict[str, str]]:
    """Status, body and extra headers of `exc` in Anthropic's terms; an unexpected exception
    is logged with its trace."""
    status, info, headers = describe(exc)
    if status == 500:
        log.error("request %s failed", request_id or "-", exc_info=exc)
    if info.code == "model_overloaded":
        status = OVERLOADED_STATUS
    kind = _TYPE_BY_STATUS.get(status) or ("api_error" if status >= 500 or status == 424
                                           else "invalid_request_error")
    message = info.message
    if info.code == "context_length_exceeded":  # how clients (and Roundhouse's upstream) spot it
        message = f"{TOO_LONG}: {message}"
    body = AnthropicErrorResponse(error=AnthropicErrorInfo(type=kind, message=message),
                                  request_id=request_id)
    return status, body, headers


def anthropic_error_response(exc: BaseException, request_id: str | None = None) -> Response:
    """The HTTP response for `exc` in Anthropic's shape, with the request id in `request-id`."""
    status, body, headers = anthropic_error(exc, request_id)
    if request_id:
        headers = {**headers, REQUEST_ID_HEADER: request_id}
    return OrjsonResponse(body.model_dump(), status_code=status, headers=headers)


def anthropic_error_payload(exc: BaseException, request_id: str | None) -> dict[str, Any]:
    """The data of a stream's `error` event for `exc`."""
    return anthropic_error(exc, request_id)[1].model_dump()


class AnthropicRoute(JSONBodyRoute):
    """A Messages API route: every failure inside it (an invalid body, a refused model, a
    domain error) is answered in Anthropic's shape, and every answer carries `request-id`."""

    def get_route_handler(self) -> Any:
        """The body route's handler, its failures rendered as Anthropic's errors."""
        inner = super().get_route_handler()

        async def handler(request: Request) -> Response:
            request_id: str | None = getattr(request.state, "request_id", None)
            try:
                response = await inner(request)
            except Exception as exc:
                response = anthropic_error_response(exc, request_id)
                routed = getattr(request.state, "routed", None)
                if routed is not None:  # a route's refusal says which assets it tried
                    response.headers.update(routed.headers())
                return response
            if request_id:
                response.headers[REQUEST_ID_HEADER] = request_id
            return response

        return handler


def document_anthropic_errors(document: dict[str, Any], error_schema_ref: str) -> None:
    """Point the error responses of the Messages API's operations in the OpenAPI document
    (the 401 and 403 every protected route gets included) at Anthropic's error body."""
    error = {"application/json": {"schema": {"$ref": error_schema_ref}}}
    for path, item in document.get("paths", {}).items():
        if not path.startswith(MESSAGES_PATH):
            continue
        for operation in item.values():
            for status, response in operation.get("responses", {}).items():
                if not status.startswith("2"):
                    response["content"] = error
