"""Errors as the Ollama API answers them: `{"error": "..."}` with the status the same failure
has in the OpenAI API (400 invalid, 401/403 keys, 404 unknown model, 429 limits, 503 not
ready...), so Ollama's clients show the message itself."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.responses import Response

from services.router.http.errors import describe, error_payload, validation_error_info


def error_body(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, Ollama error body and headers for `exc`."""
    if isinstance(exc, ValidationError | RequestValidationError):
        return 400, {"error": validation_error_info(exc.errors()).message}, {}
    status, info, headers = describe(exc)
    return status, {"error": info.message}, headers


def error_response(exc: BaseException, request_id: str | None = None) -> Response:
    """The HTTP response for `exc`; an unexpected one is logged with its trace."""
    status, body, headers = error_body(exc)
    if status == 500:
        error_payload(exc, request_id)  # logs the trace
    return Response(orjson.dumps(body), status_code=status, headers=headers,
                    media_type="application/json")


def error_line(exc: BaseException, request_id: str | None = None) -> bytes:
    """The last NDJSON line of a stream that failed after it started."""
    status, body, _ = error_body(exc)
    if status == 500:
        error_payload(exc, request_id)
    return orjson.dumps(body) + b"\n"
