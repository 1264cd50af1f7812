"""Admin UI sessions: who may see `/ui` and act through it.

A session is a random id (the `rh_ui_session` cookie: httpOnly, SameSite=Strict, Secure over
https) mapped, in this router's memory only, to the admin key's secret it was opened with and a
CSRF token of its own. Every request re-authenticates that secret through the router's
`KeyAuthenticator` (its short cache and revocation events included), so a session ends as soon
as its key is revoked or expires, and the cookie itself carries nothing worth stealing outside
this process: a router restart, or a second router behind the same address, simply asks for
the key again. Sessions idle for `idle_s` are forgotten; logging out forgets one at once and
ends its live feed (`UiSession.closed`), and the feed re-checks its session as it goes.

The cookie is `Secure` when the request came over https, as the router sees the request's
scheme. Behind a proxy that ends TLS, run the router's uvicorn with forwarded headers
(`--proxy-headers --forwarded-allow-ips=<the proxy>`), or the cookie goes out without `Secure`.

The CSRF token is checked on every POST (the `csrf_token` form field or the `X-CSRF-Token`
header), with a constant-time comparison. The login form itself carries a one-off token bound to
a short-lived cookie (double submit), so another site cannot log a browser in with its own key.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from services.common.errors import PermissionDenied, Unauthenticated
from services.common.keys import KeyRecord
from services.router.keys import KeyAuthenticator, check_admin

SESSION_COOKIE = "rh_ui_session"
LOGIN_COOKIE = "rh_ui_login"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
FORM_TYPE = "application/x-www-form-urlencoded"
DEFAULT_IDLE_S = 8 * 3600.0
MAX_SESSIONS = 10_000


class NotSignedIn(Exception):
    """The request has no live admin session (no cookie, an unknown or idle one, or its key was
    revoked): pages redirect to the login form, actions are refused."""


@dataclass
class UiSession:
    """One signed-in browser."""

    session_id: str = field(repr=False)
    """The cookie's value."""
    secret: str = field(repr=False)
    """The admin key's secret, re-checked on every request; empty when keys are not checked."""
    csrf_token: str = field(repr=False)
    key: KeyRecord | None
    last_seen: float = field(default=0.0)
    closed: asyncio.Event = field(default_factory=asyncio.Event, repr=False, compare=False)
    """Set when the session ends (logout, its key refused, idle): its live feed ends with it."""


class UiSessions:
    """The sessions of this router's admin UI, in memory (see the module docstring)."""

    def __init__(self, authenticator: KeyAuthenticator | None, *, idle_s: float = DEFAULT_IDLE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._authenticator = authenticator
        self._idle_s = idle_s
        self._clock = clock
        self._sessions: dict[str, UiSession] = {}

    async def open(self, secret: str) -> UiSession:
        """A new session for the admin key `secret`; Unauthenticated for an unknown, revoked or
        expired key, PermissionDenied for a key that is not an admin key. With keys not checked
        (`ROUNDHOUSE_AUTH=disabled`) any login opens a session, as the admin API is open too."""
        key = await self._verify(secret)
        self._forget_idle()
        session = UiSession(secrets.token_urlsafe(32), secret if self._authenticator else "",
                            secrets.token_urlsafe(32), key, self._clock())
        self._sessions[session.session_id] = session
        return session

    async def current(self, request: Request) -> UiSession:
        """The request's live session; NotSignedIn otherwise."""
        session = self._sessions.get(request.cookies.get(SESSION_COOKIE, ""))
        if session is None or not await self.still_open(session):
            raise NotSignedIn()
        session.last_seen = self._clock()
        return session

    async def still_open(self, session: UiSession) -> bool:
        """Whether `session` is still signed in: not closed, not idle, its key still a usable
        admin key (checked again now). A session found over is closed."""
        if self._sessions.get(session.session_id) is not session:
            session.closed.set()
            return False
        if self._clock() - session.last_seen > self._idle_s:
            self.close(session)
            return False
        try:
            session.key = await self._verify(session.secret)
        except (Unauthenticated, PermissionDenied):
            self.close(session)
            return False
        return True

    def close(self, session: UiSession) -> None:
        """Forget the session (logout) and end its live feed."""
        if self._sessions.get(session.session_id) is session:
            del self._sessions[session.session_id]
        session.closed.set()

    async def _verify(self, secret: str) -> KeyRecord | None:
        if self._authenticator is None:
            return None
        key = await self._authenticator.authenticate(secret.strip())
        check_admin(key)
        return key

    def _forget_idle(self) -> None:
        now = self._clock()
        for session in list(self._sessions.values()):
            if now - session.last_seen > self._idle_s:
                self.close(session)
        while len(self._sessions) >= MAX_SESSIONS:  # oldest first: dicts keep insertion order
            self.close(next(iter(self._sessions.values())))


async def not_signed_in(request: Request, _: Exception) -> Response:
    """The answer to a request without a session: a page's GET goes to the login form; anything
    else (fragments, the feed, actions) is refused with 403 and `HX-Redirect` for htmx."""
    if request.method == "GET" and "hx-request" not in request.headers and not request.url.path.startswith(
            ("/ui/fragments", "/ui/events/feed")):
        return RedirectResponse("/ui/login", status_code=303)
    return HTMLResponse("<p>Not signed in.</p>", status_code=403, headers={"HX-Redirect": "/ui/login"})


def csrf_matches(expected: str, given: str | None) -> bool:
    """Whether `given` is the token `expected` (constant time; nothing matches an empty one)."""
    return bool(expected) and given is not None and hmac.compare_digest(expected.encode(), given.encode())


async def check_csrf(request: Request, session: UiSession) -> None:
    """PermissionDenied unless the POST carries the session's CSRF token (header or form)."""
    given = request.headers.get(CSRF_HEADER)
    if given is None:
        given = (await form_of(request)).get(CSRF_FIELD)
    if not csrf_matches(session.csrf_token, given):
        raise PermissionDenied("the form has expired or did not come from this page; reload it")


async def form_of(request: Request) -> dict[str, str]:
    """The fields of a urlencoded form body (the first value of each); empty for other bodies.
    The UI's forms and htmx both post urlencoded forms, so no multipart parser is needed."""
    if request.headers.get("content-type", "").split(";")[0].strip() != FORM_TYPE:
        return {}
    fields = parse_qs((await request.body()).decode("utf-8", "replace"), keep_blank_values=True)
    return {name: values[0] for name, values in fields.items()}


def set_cookie(request: Request, response: Response, name: str, value: str, *, max_age: int | None,
               path: str = "/ui") -> None:
    """An httpOnly, SameSite=Strict cookie for the UI's paths, Secure when served over https."""
    response.set_cookie(name, value, max_age=max_age, path=path, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
