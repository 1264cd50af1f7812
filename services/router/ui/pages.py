"""The admin UI's routes under `/ui`: login and logout, the pages, the fragments a page re-fetches
when the live feed says something changed, the buttons' actions and the feed itself.

Every page and fragment needs a session (`session`); without one a page redirects to the login
form and anything else is refused with 403 (and `HX-Redirect` to the login form for htmx).
Every POST but the login needs the session's CSRF token as well. The API key middleware leaves
`/ui` alone: the session is the UI's credential.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from html import escape
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from services.common.assetspec_fields import ASSET_ID_RE
from services.common.errors import ModelNotReady, PermissionDenied, RoundhouseError
from services.common.keys import KeyStore, NewKey
from services.common.keys.validation import KEY_NAME_RE
from services.router.http.stats import stats_of
from services.router.stats import SeriesBy
from services.router.ui import views
from services.router.ui.actions import OPERATIONS, ModelActions
from services.router.ui.feed import EventFeed
from services.router.ui.freshness import PictureRefresh
from services.router.ui.security import UiHeadersMiddleware
from services.router.ui.session import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    NotSignedIn,
    UiSession,
    UiSessions,
    check_csrf,
    csrf_matches,
    form_of,
    not_signed_in,
    set_cookie,
)

STATIC = views.TEMPLATES.parent / "static"
LOGIN_TOKEN_S = 3600
PAGES = {"models": "Models", "routes": "Routes", "workers": "Workers", "operations": "Operations",
         "usage": "Usage", "keys": "API keys", "events": "Live events"}
AssetId = Annotated[str, Path(pattern=ASSET_ID_RE.pattern)]
Action = Annotated[str, Path(pattern="^(install|load|unload|profile|disable|enable)$")]
KeyName = Annotated[str, Path(pattern=KEY_NAME_RE.pattern)]
Window = Annotated[str, Query(pattern="^(" + "|".join(views.WINDOWS) + ")$")]


@dataclass
class AdminUi:
    """What the UI's routes use beyond the app's state (gateway, jobs, key store)."""

    sessions: UiSessions
    actions: ModelActions
    feed: EventFeed
    pictures: PictureRefresh
    """The workers' pictures and the catalog's snapshot, refreshed after the feed's events."""
    shadow: Any
    """`shadow(route_id)`: the route's shadow summaries (`ShadowTraffic.summary`)."""
    templates: Any


def _ui(request: Request) -> AdminUi:
    ui: AdminUi = request.app.state.admin_ui
    return ui


async def session(request: Request) -> UiSession:
    """The request's live session (NotSignedIn otherwise)."""
    return await _ui(request).sessions.current(request)


async def csrf_session(request: Request) -> UiSession:
    """The live session of a POST carrying its CSRF token (PermissionDenied for a wrong one)."""
    signed_in = await session(request)
    await check_csrf(request, signed_in)
    return signed_in


SignedIn = Annotated[UiSession, Depends(session)]
Acting = Annotated[UiSession, Depends(csrf_session)]
router = APIRouter(prefix="/ui", include_in_schema=False)


def _html(request: Request, template: str, status_code: int = 200, **values: Any) -> HTMLResponse:
    body = _ui(request).templates.get_template(template).render(**values)
    return HTMLResponse(body, status_code=status_code, headers={"Cache-Control": "no-store"})


def _page(request: Request, signed_in: UiSession, page: str, values: dict[str, Any]) -> HTMLResponse:
    return _html(request, f"{page}.html", page=page, title=PAGES[page], csrf_token=signed_in.csrf_token,
                 **values)


@router.get("")
async def home() -> RedirectResponse:
    """The models page."""
    return RedirectResponse("/ui/models", status_code=303)


@router.get("/login")
async def login_page(request: Request) -> HTMLResponse:
    """The login form."""
    return _login_form(request)


def _login_form(request: Request, error: str = "", status_code: int = 200) -> HTMLResponse:
    """The login form, with a fresh one-off token bound to a cookie (double submit)."""
    token = secrets.token_urlsafe(24)
    response = _html(request, "login.html", status_code=status_code, login_token=token, error=error)
    set_cookie(request, response, LOGIN_COOKIE, token, max_age=LOGIN_TOKEN_S)
    return response


@router.post("/login")
async def login(request: Request) -> Response:
    """Open a session for an admin key; the form again (403) for any other."""
    form = await form_of(request)
    if not csrf_matches(request.cookies.get(LOGIN_COOKIE, ""), form.get("csrf_token")):
        return _login_form(request, "The form expired; log in again.", 403)
    try:
        opened = await _ui(request).sessions.open(form.get("key", ""))
    except PermissionDenied:
        return _login_form(request, "That key is not an admin key.", 403)
    except RoundhouseError:
        return _login_form(request, "That key is not valid.", 403)
    response = RedirectResponse("/ui/models", status_code=303)
    set_cookie(request, response, SESSION_COOKIE, opened.session_id, max_age=None)
    response.delete_cookie(LOGIN_COOKIE, path="/ui")
    return response


@router.post("/logout")
async def logout(request: Request, signed_in: Acting) -> RedirectResponse:
    """End the session."""
    _ui(request).sessions.close(signed_in)
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/ui")
    return response


@router.get("/models")
async def models_page(request: Request, signed_in: SignedIn) -> HTMLResponse:
    """Language and embedding models, their state and buttons."""
    _ui(request).pictures.changed()  # a page loaded in full is current; its fragments follow the feed
    return _page(request, signed_in, "models", await _models(request))


@router.get("/workers")
async def workers_page(request: Request, signed_in: SignedIn) -> HTMLResponse:
    """Workers with their memory bars, and the model store."""
    _ui(request).pictures.changed()
    return _page(request, signed_in, "workers", await _workers(request))


@router.get("/routes")
async def routes_page(request: Request, signed_in: SignedIn) -> HTMLResponse:
    """Routes with their split and shadow agreement."""
    return _page(request, signed_in, "routes", await _routes(request))


@router.get("/operations")
async def operations_page(request: Request, signed_in: SignedIn) -> HTMLResponse:
    """Recent operations, newest first."""
    return _page(request, signed_in, "operations", await _operations(request))


@router.get("/usage")
async def usage_page(request: Request, signed_in: SignedIn, by: SeriesBy = "model",
                     window: Window = "1h") -> HTMLResponse:
    """Requests over time per model or per key."""
    return _page(request, signed_in, "usage", await views.usage_view(stats_of(request), by, window))


@router.get("/keys")
async def keys_page(request: Request, signed_in: SignedIn) -> HTMLResponse:
    """API keys: list, create, revoke."""
    return _page(request, signed_in, "keys", await _keys(request))


@router.get("/events")
async def events_page(request: Request, signed_in: SignedIn) -> HTMLResponse:
    """The live event log."""
    return _page(request, signed_in, "events", {})


@router.get("/fragments/{name}")
async def fragment(request: Request, name: str, _: SignedIn, by: SeriesBy = "model",
                   window: Window = "1h") -> HTMLResponse:
    """One page's live part, re-fetched when the feed reports a change."""
    if name == "usage":
        values = await views.usage_view(stats_of(request), by, window)
    elif name in FRAGMENTS:
        values = await FRAGMENTS[name](request)
    else:
        return HTMLResponse("", status_code=404)
    return _html(request, f"_{name}.html", **values)


@router.post("/models/{asset_id}/{action}")
async def model_action(request: Request, asset_id: AssetId, action: Action, _: Acting) -> HTMLResponse:
    """A model button: queue an operation, or disable / enable the model."""
    ui = _ui(request)
    if action in OPERATIONS:
        operation = await ui.actions.submit(action, asset_id)  # type: ignore[arg-type]
        text = f"{action} of {asset_id} queued (operation {operation.operation_id[:8]})."
    else:
        await ui.actions.toggle(action, asset_id)  # type: ignore[arg-type]
        text = f"{asset_id} {action}d."
    return HTMLResponse(f"<p>{escape(text)}</p>", headers={"HX-Trigger": "models-changed"})


@router.post("/keys")
async def create_key(request: Request, _: Acting) -> HTMLResponse:
    """Create a key; the reply shows its secret, this once."""
    form = await form_of(request)
    models = tuple(m for m in form.get("models", "").replace(",", " ").split() if m)
    rpm = form.get("rpm", "").strip()
    record, secret = await _store(request).create(NewKey(
        name=form.get("name", "").strip(), models=models, admin=form.get("admin") == "true",
        rpm=int(rpm) if rpm.isdigit() else None))
    response = _html(request, "_created_key.html", name=record.name, secret=secret)
    response.headers["HX-Trigger"] = "keys-changed"
    return response


@router.post("/keys/{name}/revoke")
async def revoke_key(request: Request, name: KeyName, _: Acting) -> HTMLResponse:
    """Revoke a key; every router refuses it from now on."""
    await _store(request).revoke(name)
    revoked = request.app.state.on_key_revoked
    if revoked is not None:
        revoked(name)
    return HTMLResponse(f"<p>Key {escape(name)} revoked.</p>", headers={"HX-Trigger": "keys-changed"})


@router.get("/events/feed")
async def event_feed(request: Request, signed_in: SignedIn) -> StreamingResponse:
    """The live feed (server-sent events) the pages listen to while the session lasts; see `feed`."""
    ui = _ui(request)
    return StreamingResponse(ui.feed.stream(request.app.state.bus, signed_in, ui.sessions),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


async def _fresh_pictures(request: Request) -> None:
    # What the statistics read may be a refresh behind the feed's latest event (`PictureRefresh`).
    gateway = request.app.state.gateway
    await _ui(request).pictures.current(lambda: asyncio.gather(gateway.workers.refresh(), gateway.catalog.list()))


async def _models(request: Request) -> dict[str, Any]:
    await _fresh_pictures(request)
    return await views.models_view(stats_of(request), request.app.state.jobs)


async def _workers(request: Request) -> dict[str, Any]:
    await _fresh_pictures(request)
    return views.workers_view(await stats_of(request).resources())


async def _operations(request: Request) -> dict[str, Any]:
    return {"operations": await views.recent_operations(request.app.state.jobs)}


async def _routes(request: Request) -> dict[str, Any]:
    return views.routes_view(await request.app.state.gateway.catalog.list(), _ui(request).shadow)


async def _keys(request: Request) -> dict[str, Any]:
    return await views.keys_view(_store(request), request.app.state.gateway.usage)


FRAGMENTS: dict[str, Callable[[Request], Awaitable[dict[str, Any]]]] = {  # all but usage (see `fragment`)
    "models": _models, "workers": _workers, "routes": _routes, "operations": _operations, "keys": _keys}


def _store(request: Request) -> KeyStore:
    store: KeyStore | None = request.app.state.key_store
    if store is None:
        raise ModelNotReady("API keys are not available: this router has no database", retry_after_s=30)
    return store


def install_ui(app: FastAPI, ui: AdminUi) -> None:
    """Serve the admin UI on `app` under `/ui` (pages, fragments, actions, feed, static files),
    every response with the headers of `security`."""
    app.state.admin_ui = ui
    app.include_router(router)
    app.add_middleware(UiHeadersMiddleware)
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")
    app.add_exception_handler(NotSignedIn, not_signed_in)
