"""`roundhouse keys create|ls|revoke`: API keys over the router's admin HTTP API, with the
admin key (see `admin_api`)."""

from __future__ import annotations

import sys
from typing import Any
from urllib.parse import quote

from services.cli.admin_api import call_admin
from services.common.secrets import ELLIPSIS


def create_key(name: str, *, models: list[str], admin: bool = False, **limits: Any) -> int:
    """Create a key and print its secret (the only time it is shown)."""
    body = {"name": name, "models": models, "admin": admin,
            **{k: v for k, v in limits.items() if v is not None}}
    reply = call_admin("POST", "/keys", json=body)
    if isinstance(reply, int):
        return reply
    created = reply.json()
    print(created["key"])
    print(f"key '{created['name']}' created; the secret above is shown only this once",
          file=sys.stderr)
    return 0


def list_keys() -> int:
    """Print every unrevoked key as a table (never a secret)."""
    reply = call_admin("GET", "/keys")
    if isinstance(reply, int):
        return reply
    print(render_keys(reply.json()["keys"]), end="")
    return 0


def revoke_key(name: str) -> int:
    """Revoke a key by name; every router refuses it from now on."""
    reply = call_admin("DELETE", f"/keys/{quote(name, safe='')}")
    if isinstance(reply, int):
        return reply
    print(f"key '{name}' revoked")
    return 0


def render_keys(keys: list[dict[str, Any]]) -> str:
    """The keys as a table: name, masked key (`rh-abcd…`), models, limits, usage, expiry."""
    table = [["NAME", "KEY", "ADMIN", "MODELS", "LIMITS", "USAGE", "EXPIRES"]]
    for key in keys:
        table.append([key["name"], key["prefix"] + ELLIPSIS, "yes" if key["admin"] else "no",
                      ",".join(key["models"]) or "*", _limits(key), _usage(key.get("usage")),
                      (key.get("expires_at") or "never")[:19].replace("T", " ")])
    if len(table) == 1:
        return "(no keys)\n"
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n"
                   for r in table)


def _usage(usage: dict[str, Any] | None) -> str:
    if not usage or not usage.get("requests"):
        return "-"
    tokens = usage["prompt_tokens"] + usage["completion_tokens"]
    text = f"{usage['requests']} req, {tokens} tok"
    return f"{text}, ${usage['cost_usd']:.4f}" if usage.get("cost_usd") else text


def _limits(key: dict[str, Any]) -> str:
    parts = [f"{name}={key[field]}" for name, field in
             (("rpm", "rpm"), ("tpm", "tpm"), ("parallel", "max_parallel"), ("tokens", "budget_tokens"))
             if key.get(field) is not None]
    if key.get("budget_usd") is not None:
        parts.append(f"usd={key['budget_usd']:g}")
    if key.get("budget_period_s") and (key.get("budget_tokens") or key.get("budget_usd")):
        parts.append(f"per={_duration(key['budget_period_s'])}")
    return " ".join(parts) or "-"


def _duration(seconds: int) -> str:
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
