"""The HTTP side of authenticate: which paths need a key, which an admin key, and the key
each request carries (`request.state.key`).

A plain ASGI middleware inside `RequestContextMiddleware` (so refusals get a request id and
OpenAI's error shape) and outside the body limit, routing and body parsing: a request without
a valid key learns nothing about the routes or what they would accept, and its body is never
read.

It decides on the path Starlette routes on (the request path less `root_path`), and denies by
default:

- `/healthz`, `/readyz`: open; `/metrics`: open, or any valid key with `metrics_auth`;
- `/`: open (it only says "Ollama is running", as Ollama does: its clients probe it);
- `/admin/v1...`, `/docs...`, `/redoc...`, `/openapi.json`: an admin key (judged on the path
  with repeated slashes and dot segments resolved, so `//admin/v1/keys` and
  `/v1/../admin/v1/keys` count as admin paths too);
- `/ui...`: open here; the admin UI signs its users in with an admin key itself;
- anything else (the `/v1` API, unknown paths, which then answer 404): any valid key (its
  model scope is checked once the model is resolved).

With no authenticator (`ROUNDHOUSE_AUTH=disabled`) nothing is checked and the key is None.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any

from fastapi import Request
from starlette.datastructures import Headers
from starlette.routing import get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from services.common.keys import KeyRecord
from services.router.keys import KeyAuthenticator, check_admin, credential_from

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/"})
"""Open: the probes, and `/`, which only says "Ollama is running" (Ollama's clients probe it)."""
METRICS_PATH = "/metrics"
ADMIN_PATHS = ("/admin/v1/", "/docs", "/redoc", "/openapi.json")
UI_PATH = "/ui"
"""The admin UI: its own login and session cookie (see `services.router.ui.session`)."""
_SLASHES = re.compile(r"/{2,}")
SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer",
               "description": "A Roundhouse API key (`rh-...`): `Authorization: Bearer <key>`."},
    "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key",
               "description": "The same key in `x-api-key`."},
}


def request_key(request: Request) -> KeyRecord | None:
    """The key the request was authenticated with; None when authentication is off."""
    return getattr(request.state, "key", None)


def _needs(path: str, metrics_auth: bool) -> str | None:
    """What a request to the route path `path` needs: None (open), "key" or "admin"."""
    if path in OPEN_PATHS or (path == METRICS_PATH and not metrics_auth):
        return None
    resolved = posixpath.normpath(_SLASHES.sub("/", path) or "/")
    if resolved == "/admin/v1" or resolved.startswith(ADMIN_PATHS):
        return "admin"
    if resolved == UI_PATH or resolved.startswith(UI_PATH + "/"):
        return None
    return "key"


class AuthMiddleware:
    """Authenticates every request on a path that needs a key; refusals raise the domain
    errors (`Unauthenticated` 401, `PermissionDenied` 403) for the outer middleware to render."""

    def __init__(self, app: ASGIApp, *, authenticator: KeyAuthenticator | None,
                 metrics_auth: bool = False) -> None:
        self.app = app
        self.authenticator = authenticator
        self.metrics_auth = metrics_auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            state = scope.setdefault("state", {})
            state["key"] = None
            needs = _needs(get_route_path(scope), self.metrics_auth)
            if self.authenticator is not None and needs is not None:
                headers = Headers(scope=scope)
                secret = credential_from(headers.get("authorization"), headers.get("x-api-key"))
                key = await self.authenticator.authenticate(secret)
                if needs == "admin":
                    check_admin(key)
                state["key"] = key
        await self.app(scope, receive, send)


def document_security(document: dict[str, Any], error_schema_ref: str) -> None:
    """Declare the key schemes in the OpenAPI document, and the 401 (and, for admin routes and
    `/v1` routes that name a model, 403) each protected operation can answer."""
    document.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
    error = {"application/json": {"schema": {"$ref": error_schema_ref}}}
    for path, item in document.get("paths", {}).items():
        needs = _needs(path, metrics_auth=False)
        if needs is None:
            continue
        for operation in item.values():
            operation["security"] = [{"bearer": []}, {"apiKey": []}]
            responses = operation.setdefault("responses", {})
            responses["401"] = {"description": "No API key, or one that is malformed, unknown, "
                                               "revoked or expired.", "content": error}
            responses["403"] = {"description": "The API key may not use this model, or this "
                                               "route needs an admin key.", "content": error}
