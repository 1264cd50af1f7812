"""`roundhouse stats [--window 1h] [--runtime ...] [--state ...]`: every model's state and request
figures as a table, from the router's `GET /admin/v1/stats/models` (with the admin key when there
is one, see `admin_api`)."""

from __future__ import annotations

import argparse
from typing import Any

COLUMNS = ("state", "runtime", "requests", "errors", "error %", "p50 ms", "p95 ms", "p99 ms",
           "ttft p50 ms", "tokens/s", "in flight", "queued")
FILTERS = ("runtime", "capability", "state", "interface")


def show_stats(window: str = "1h", **filters: str | None) -> int:
    """Print the per-model table; exit code 1 (error printed) when the router cannot answer."""
    from services.cli.admin_api import call_admin  # settings and httpx only when it runs

    params = {"window": window, **{k: v for k, v in filters.items() if v}}
    reply = call_admin("GET", "/stats/models", key_required=False, params=params)
    if isinstance(reply, int):
        return reply
    print(render_stats(reply.json()["models"]), end="")
    return 0


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_stats(models: list[dict[str, Any]]) -> str:
    """The models as an aligned text table, one line per model ('-' where a figure is unknown)."""
    table = [("model", *COLUMNS)]
    for m in models:
        table.append((m["asset_id"], m["state"], m["runtime"], str(m["requests"]), str(m["errors"]),
                      _number(100 * m["error_rate"]), _number(m["p50_latency_ms"]),
                      _number(m["p95_latency_ms"]), _number(m["p99_latency_ms"]),
                      _number(m["p50_ttft_ms"]), _number(m["tokens_per_s"]), str(m["in_flight"]),
                      str(m["queued"])))
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) if i < 3 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(line, widths, strict=True))).rstrip()
             for line in table]
    return "\n".join(lines) + "\n"


def _stats(args: argparse.Namespace) -> int:
    return show_stats(args.window, **{name: getattr(args, name) for name in FILTERS})


def add_stats_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:  # noqa: SLF001
    """`stats`, over the router's admin API."""
    stats = commands.add_parser("stats", help="every model's state, requests, errors, latency and "
                                "TTFT percentiles and tokens/s over a window")
    stats.add_argument("--window", default="1h", help="how far back: 30s, 5m, 1h, 7d (default 1h)")
    stats.add_argument("--runtime", choices=("transformers", "openai", "anthropic"), help="only this runtime")
    stats.add_argument("--capability", help="only models with this capability (chat, embeddings...)")
    stats.add_argument("--state", choices=("loaded", "loading", "sleeping", "failed", "disabled",
                                           "not_installed"), help="only models in this state")
    stats.add_argument("--interface", choices=("llm-runtime", "embedding-runtime"),
                       help="only this interface")
    stats.set_defaults(func=_stats)
