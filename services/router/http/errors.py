"""One place that turns any failure into OpenAI's error shape.

`{"error": {"message", "type", "param", "code"}}` with the status an OpenAI client expects:
domain errors (`services.common.errors`), request validation, HTTP-level problems (body
too large, unknown route) and, last, anything unexpected (500, generic message, trace
logged). The same mapping feeds the `data: {"error": ...}` event of a failed stream.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import get_route_path

from services.common import errors as domain
from services.common.db.unavailable import as_domain_error
from services.router.http.protocol import ErrorInfo, ErrorResponse
from services.router.http.rendering import OrjsonResponse

log = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
GENERIC_MESSAGE = "The server had an error while processing your request."
UNSUPPORTED = "unsupported_parameter"
"""Validation error type (and error code) of an OpenAI parameter Roundhouse does not implement."""


class HTTPProblem(Exception):
    """A failure of the HTTP exchange itself, not of the domain (e.g. a body too large)."""

    def __init__(self, status: int, message: str, code: str, error_type: str = INVALID_REQUEST,
                 headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.error_type = status, message, code, error_type
        self.headers = dict(headers or {})


class ClientClosedRequest(HTTPProblem):
    """The client went away before the response started."""

    def __init__(self) -> None:
        super().__init__(499, "The client closed the request.", "client_closed_request")


# (domain error, status, type, code, param); the first match wins, so subclasses come first.
_DOMAIN_ERRORS: list[tuple[type[domain.RoundhouseError], int, str, str, str | None]] = [
    (domain.Unauthenticated, 401, INVALID_REQUEST, "invalid_api_key", None),
    (domain.ModelNotAllowed, 403, "permission_error", "model_not_allowed", "model"),
    (domain.PermissionDenied, 403, "permission_error", "permission_denied", None),
    (domain.AlreadyExists, 409, INVALID_REQUEST, "already_exists", None),
    (domain.AssetNotFound, 404, INVALID_REQUEST, "model_not_found", "model"),
    (domain.WrongInterface, 400, INVALID_REQUEST, "model_not_supported", "model"),
    (domain.AssetDisabled, 409, INVALID_REQUEST, "model_disabled", "model"),
    # 424 (not 409): clients such as the OpenAI SDK retry 409s, and this one will not pass.
    (domain.ModelFailed, 424, "model_error", "model_failed", "model"),
    (domain.ContextLengthExceeded, 400, INVALID_REQUEST, "context_length_exceeded", None),
    (domain.InvalidArgument, 400, INVALID_REQUEST, "invalid_value", None),
    (domain.Overloaded, 429, "rate_limit_error", "model_overloaded", None),
    (domain.RateLimited, 429, "rate_limit_error", "rate_limit_exceeded", None),
    (domain.BudgetExhausted, 429, "insufficient_quota", "insufficient_quota", None),
    (domain.LimitsUnavailable, 503, "service_unavailable_error", "limits_unavailable", None),
    (domain.ModelNotReady, 503, "service_unavailable_error", "model_not_ready", None),
    (domain.ShuttingDown, 503, "service_unavailable_error", "shutting_down", None),
    (domain.DatabaseUnavailable, 503, "service_unavailable_error", "database_unavailable", None),
    (domain.DeadlineExceeded, 504, "timeout_error", "timeout", None),
    (domain.UpstreamError, 502, "upstream_error", "upstream_error", None),
    (domain.QuotaExceeded, 503, "service_unavailable_error", "insufficient_capacity", None),
    (domain.NotFound, 404, INVALID_REQUEST, "not_found", None),
    (domain.Conflict, 409, INVALID_REQUEST, "conflict", None),
    (domain.FailedPrecondition, 409, INVALID_REQUEST, "failed_precondition", None),
    (domain.Cancelled, 499, INVALID_REQUEST, "cancelled", None),
]


def describe(exc: BaseException) -> tuple[int, ErrorInfo, dict[str, str]]:
    """Status, error body and extra headers for any exception."""
    exc = as_domain_error(exc)
    if isinstance(exc, domain.RoundhouseError):
        for kind, status, error_type, code, param in _DOMAIN_ERRORS:
            if isinstance(exc, kind):
                if param is None and isinstance(exc, domain.InvalidArgument):
                    param = exc.field
                retry = getattr(exc, "retry_after_s", None)
                headers = {"Retry-After": str(max(1, math.ceil(retry)))} if retry else {}
                info = ErrorInfo(message=exc.message, type=error_type, param=param, code=code)
                return status, info, headers
    if isinstance(exc, HTTPProblem):
        info = ErrorInfo(message=exc.message, type=exc.error_type, code=exc.code)
        return exc.status, info, exc.headers
    if isinstance(exc, RequestValidationError | ValidationError):
        return 400, validation_error_info(exc.errors()), {}
    if isinstance(exc, StarletteHTTPException):
        info = ErrorInfo(message=str(exc.detail), type=INVALID_REQUEST)
        return exc.status_code, info, dict(exc.headers or {})
    return 500, ErrorInfo(message=GENERIC_MESSAGE, type="server_error", code="internal_error"), {}


def error_response(exc: BaseException, request_id: str | None = None) -> JSONResponse:
    """The HTTP response for `exc`; an unexpected exception is logged with its trace."""
    status, info, headers = describe(exc)
    if status == 500:
        log.error("request %s failed", request_id or "-", exc_info=exc)
    return OrjsonResponse(ErrorResponse(error=info).model_dump(), status_code=status,
                          headers=headers)


def error_payload(exc: BaseException, request_id: str | None = None) -> dict[str, Any]:
    """`{"error": {...}}` for `exc`, as sent in the last event of a failed stream."""
    status, info, _ = describe(exc)
    if status == 500:
        log.error("stream of request %s failed", request_id or "-", exc_info=exc)
    return ErrorResponse(error=info).model_dump()


def validation_error_info(errors: Sequence[Mapping[str, Any]]) -> ErrorInfo:
    """Pydantic/FastAPI validation errors → one OpenAI error naming the first bad field."""
    first: Mapping[str, Any] = (
        errors[0] if errors else {"type": "value_error", "loc": (), "msg": "invalid request"}
    )
    if first["type"] == "json_invalid":
        ctx: Mapping[str, Any] = first.get("ctx") or {}
        reason = ctx.get("error", "invalid JSON")
        return ErrorInfo(message=f"The request body is not valid JSON: {reason}.",
                         type=INVALID_REQUEST, code="invalid_json")
    located = [_locate(e) for e in errors]
    param, reason, kind = located[0]
    if not param:
        if kind == "missing":
            reason = "A JSON request body is required."
        elif kind in ("model_attributes_type", "dict_type", "model_type"):
            reason = "The request body must be a JSON object."
        return ErrorInfo(message=reason, type=INVALID_REQUEST, code="invalid_request_body")
    parts = [_sentence(p, r, k) for p, r, k in located[:5] if p]
    code = "missing_required_parameter" if kind == "missing" else "invalid_value"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        code = "invalid_type"
    elif kind == UNSUPPORTED:
        code = UNSUPPORTED
    return ErrorInfo(message=" ".join(dict.fromkeys(parts)), type=INVALID_REQUEST,
                     param=param, code=code)


def _locate(error: Mapping[str, Any]) -> tuple[str, str, str]:
    """(param, reason, error type) of one validation error; param is an OpenAI path such as
    `messages[0].content`, extended by a `field: reason` message from a validator."""
    loc = list(error["loc"])
    # FastAPI prefixes where the value came from; the parameter's own name is what counts.
    if loc and loc[0] in ("body", "path", "query", "header", "cookie"):
        loc = loc[1:]
    segments: list[str] = []
    for part in loc:
        if isinstance(part, int):
            if segments:
                segments[-1] += f"[{part}]"
        # Union members and validator functions appear in locations; they are not fields.
        elif "[" not in part and not part.startswith("function-"):
            segments.append(part)
    reason = str(error["msg"]).removeprefix("Value error, ")
    named = domain.NAMED_FIELD.match(reason)
    if named:
        field, reason = named["field"], named["reason"]
        # A field validator names its own field again, with an index: `input[3]`.
        if segments and _root(field) == _root(segments[-1]):
            segments.pop()
        segments.append(field)
    return ".".join(segments), reason, str(error["type"])


def _root(path: str) -> str:
    return path.split(".", 1)[0].split("[", 1)[0]


def _sentence(param: str, reason: str, kind: str) -> str:
    if kind == "missing":
        return f"Missing required parameter: '{param}'."
    if kind == UNSUPPORTED:
        return f"Unsupported parameter: '{param}' is {reason.rstrip('.')}."
    return f"Invalid value for '{param}': {reason.rstrip('.')}."


ErrorRenderer = Callable[[BaseException, str | None], Response]
"""Renders a failure as one protocol's error response (`error_response` is OpenAI's)."""


def _handler(dialects: Sequence[tuple[str, ErrorRenderer]]) -> Callable[[Request, Exception], Awaitable[Response]]:
    async def handle(request: Request, exc: Exception) -> Response:
        if isinstance(exc, StarletteHTTPException) and exc.status_code in (404, 405):
            what = "Unknown URL" if exc.status_code == 404 else "Method not allowed"
            code = "not_found" if exc.status_code == 404 else "method_not_allowed"
            # A 405 keeps Starlette's `Allow` header: the methods the route does take.
            exc = HTTPProblem(exc.status_code, f"{what}: {request.method} {request.url.path}.", code,
                              headers=exc.headers)
        path = get_route_path(request.scope)
        render = next((r for prefix, r in dialects if path.startswith(prefix)), error_response)
        response = render(exc, getattr(request.state, "request_id", None))
        routed = getattr(request.state, "routed", None)
        if routed is not None:  # a route's refusal says which assets it tried
            response.headers.update(routed.headers())
        return response

    return handle


def install_error_handlers(app: FastAPI, dialects: Sequence[tuple[str, ErrorRenderer]] = ()) -> None:
    """Route every error FastAPI sees through `error_response`, or under a path prefix of
    `dialects` through that protocol's renderer."""
    handle = _handler(tuple(dialects))
    for kind in (domain.RoundhouseError, HTTPProblem, RequestValidationError, ValidationError,
                 StarletteHTTPException):
        app.add_exception_handler(kind, handle)
