"""The router's admin HTTP API (`/admin/v1/...`) as CLI commands call it: the admin key (see
`bootstrap.read_admin_key`), one request, and every refusal printed as `error: ...` lines with
the router's URL masked."""

from __future__ import annotations

import sys
from typing import Any

import httpx
from pydantic import ValidationError

from services.cli.bootstrap import admin_key_path, read_admin_key
from services.common.secrets import mask_url
from services.router.settings import RouterSettings

TIMEOUT_S = 30.0


def fail(lines: str) -> int:
    """Print `lines` as `error: ...` on stderr; the exit code 1."""
    for line in lines.splitlines() or [""]:
        print(f"error: {line}", file=sys.stderr)
    return 1


def call_admin(method: str, path: str, *, key_required: bool = True, **kwargs: Any) -> httpx.Response | int:
    """One call to `/admin/v1{path}` with the admin key (httpx's `kwargs`: `json`, `params`);
    the successful reply, or an exit code once the reason is printed (no admin key when
    `key_required`, a malformed one, the router unreachable, the router's refusal)."""
    try:
        settings = RouterSettings()
        secret = read_admin_key(settings)
    except ValidationError as exc:
        return fail("\n".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors()))
    except ValueError as exc:
        return fail(str(exc))
    if secret is None and key_required:
        return fail(f"no admin key: set ROUNDHOUSE_ADMIN_KEY or start `roundhouse up`, which "
                    f"writes {admin_key_path(settings.home)}")
    url = settings.resolved_router_url()
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    try:
        reply = httpx.request(method, f"{url}/admin/v1{path}", timeout=TIMEOUT_S, headers=headers, **kwargs)
    except httpx.HTTPError:
        return fail(f"cannot reach the router at {mask_url(url)}; is `roundhouse up` running "
                    "(or ROUNDHOUSE_ROUTER_URL set)?")
    if reply.is_success:
        return reply
    try:
        message = reply.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = f"HTTP {reply.status_code}"
    return fail(message)
