"""What every `/ui` response tells the browser beyond its body: never to show the UI inside a
frame (`X-Frame-Options`, and CSP `frame-ancestors`, against clickjacking an admin's buttons),
and to run only the UI's own script files (no inline script, no `eval`: htmx is served from
`/ui/static` and the pages use no `hx-on`, `hx-vars` or `js:` values, which would need it).
Inline styles stay allowed: the memory bars and route splits are sized with `style`, and htmx
adds its indicator style itself.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                           "img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; "
                           "frame-ancestors 'none'")
UI_HEADERS = ((b"x-frame-options", b"DENY"),
              (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
              (b"x-content-type-options", b"nosniff"),
              (b"referrer-policy", b"same-origin"))


def is_ui_path(path: str) -> bool:
    """Whether `path` is the UI's (`/ui` and below)."""
    return path == "/ui" or path.startswith("/ui/")


class UiHeadersMiddleware:
    """Adds `UI_HEADERS` to every response under `/ui` (pages, fragments, the feed, static
    files, refusals), replacing any the route set itself."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on; add the headers to the response's start."""
        if scope["type"] != "http" or not is_ui_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        names = {name for name, _ in UI_HEADERS}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(n, v) for n, v in message.get("headers", []) if n.lower() not in names]
                message = {**message, "headers": [*kept, *UI_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
