"""A FastAPI route that validates a JSON body once and calls its endpoint directly.

FastAPI's request handler is general: it resolves dependencies, looks up query, header and
cookie parameters, parses the content type with the `email` package, and wraps the call in
telemetry and serialisation steps, for every request. The inference routes take only their
body and the request, so for the common request (a JSON object body that validates) all of
that is skipped: the body is parsed with the same `json.loads` FastAPI uses, validated by its
model, and the endpoint awaited with both.

Anything else (another content type, no body, JSON that does not parse, a body the model
refuses) goes through FastAPI's own handler, which answers exactly as it always has, errors
included. The route is still an `APIRoute`: the OpenAPI document is the same.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class JSONBodyRoute(APIRoute):
    """An `APIRoute` with a fast path for endpoints `(body: SomeModel, request: Request)`."""

    def get_route_handler(self) -> Handler:
        """FastAPI's handler, behind the fast path when the endpoint's shape allows it."""
        standard: Handler = super().get_route_handler()
        dependant = self.dependant
        if (len(dependant.body_params) != 1 or dependant.request_param_name is None
                or dependant.path_params or dependant.query_params or dependant.header_params
                or dependant.cookie_params or dependant.dependencies
                or not inspect.iscoroutinefunction(dependant.call)):
            return standard
        field = dependant.body_params[0]
        model = getattr(field.field_info, "annotation", None)
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return standard
        endpoint: Callable[..., Awaitable[Response]] = dependant.call  # type: ignore[assignment]
        body_name, request_name = field.name, dependant.request_param_name

        async def handler(request: Request) -> Response:
            content_type = request.headers.get("content-type", "")
            if content_type.partition(";")[0].strip().lower() == "application/json":
                raw = await request.body()
                if raw:
                    try:
                        body = model.model_validate(json.loads(raw))
                    except (ValueError, RecursionError):  # not JSON (or nested past any parser), or refused
                        return await standard(request)  # answers with FastAPI's own errors
                    return await endpoint(**{body_name: body, request_name: request})
            return await standard(request)

        return handler

