"""`roundhouse usage [--by key|asset|day]`: the usage ledger as a table, from the router's
`GET /admin/v1/usage` (with the admin key when there is one, see `admin_api`)."""

from __future__ import annotations

from typing import Any

from services.cli.admin_api import call_admin

COLUMNS = ("requests", "errors", "tokens in", "tokens out", "cost usd", "p50 ms", "p95 ms",
           "cache hits")


def show_usage(group_by: str, since: str | None = None, until: str | None = None) -> int:
    """Print the ledger summed per `group_by`; exit code 1 (error printed) when the router
    cannot answer."""
    params = {"group_by": group_by, **{k: v for k, v in (("since", since), ("until", until)) if v}}
    reply = call_admin("GET", "/usage", key_required=False, params=params)
    if isinstance(reply, int):
        return reply
    print(render_usage(group_by, reply.json()["rows"]), end="")
    return 0


def render_usage(group_by: str, rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table, one line per group."""
    table = [(group_by, *COLUMNS)]
    for r in rows:
        table.append((r["group"] or "(no key)", str(r["requests"]), str(r["errors"]),
                      str(r["prompt_tokens"]), str(r["completion_tokens"]), f"{r['cost_usd']:.6f}",
                      f"{r['p50_latency_ms']:.1f}", f"{r['p95_latency_ms']:.1f}",
                      str(r.get("cache_hits", 0))))
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(line, widths, strict=True))).rstrip()
             for line in table]
    return "\n".join(lines) + "\n"
