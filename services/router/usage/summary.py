"""Reading the usage ledger back: totals and latency percentiles per key, asset or day, and a
key's totals for the key listing.

Keys are grouped by their id: a name freed by a revoke and given to a new key does not carry
the old key's usage over. A key's row is labelled with its name, followed by the first eight
characters of its id when several keys (revoked ones included) have had that name.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Literal

import asyncpg

GroupBy = Literal["key", "asset", "day"]
KEY_ID_SHOWN = 8
"""Characters of a key's id that tell apart the keys that have had the same name."""
_KEY_LABEL = (f"CASE WHEN k.name IS NULL THEN u.key_id WHEN k.holders = 1 THEN k.name "
              f"ELSE k.name || ' (' || left(u.key_id, {KEY_ID_SHOWN}) || ')' END")
_GROUPS: dict[str, tuple[str, str, str]] = {
    # (the key id column, the label, the grouping); requests served without a key as ''.
    "key": ("u.key_id", _KEY_LABEL, "u.key_id, k.name, k.holders"),
    "asset": ("NULL::text", "u.asset_id", "grp"),
    "day": ("NULL::text", "to_char(u.at AT TIME ZONE 'UTC', 'YYYY-MM-DD')", "grp"),
}
_NAMED = """LEFT JOIN (SELECT key_id, name, count(*) OVER (PARTITION BY name) AS holders
                      FROM api_keys) k ON k.key_id = u.key_id"""


@dataclass(frozen=True)
class UsageSummary:
    """One group's totals."""

    group: str
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: Decimal
    p50_latency_ms: float
    p95_latency_ms: float
    cache_hits: int = 0
    """Requests to a route answered from its response cache."""
    cache_misses: int = 0
    """Requests to a route with a cache that a model answered."""
    key_id: str | None = None
    """The key's id when grouped by key ('' for requests made with auth off), else None."""


@dataclass(frozen=True)
class KeyTotals:
    """What one key has used so far."""

    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: Decimal


async def summarize(pool: asyncpg.Pool, group_by: GroupBy, since: datetime,
                    until: datetime) -> list[UsageSummary]:
    """Requests in [since, until) grouped by `group_by`, in label order."""
    key_id, label, grouping = _GROUPS[group_by]  # fixed expressions, never client text
    rows = await pool.fetch(
        f"""SELECT {key_id} AS key_id, {label} AS grp, count(*) AS requests,
                   count(*) FILTER (WHERE u.status <> 'ok') AS errors,
                   count(*) FILTER (WHERE u.cache = 'hit') AS cache_hits,
                   count(*) FILTER (WHERE u.cache = 'miss') AS cache_misses,
                   coalesce(sum(u.prompt_tokens), 0) AS prompt_tokens,
                   coalesce(sum(u.completion_tokens), 0) AS completion_tokens,
                   coalesce(sum(u.cost_usd), 0) AS cost_usd,
                   percentile_cont(0.5) WITHIN GROUP (ORDER BY u.latency_ms) AS p50,
                   percentile_cont(0.95) WITHIN GROUP (ORDER BY u.latency_ms) AS p95
            FROM usage_records u {_NAMED if group_by == "key" else ""}
            WHERE u.at >= $1 AND u.at < $2
            GROUP BY {grouping} ORDER BY grp, key_id""",  # noqa: S608
        since, until, timeout=30)
    return [UsageSummary(group=r["grp"], requests=r["requests"], errors=r["errors"],
                         prompt_tokens=r["prompt_tokens"], completion_tokens=r["completion_tokens"],
                         cost_usd=r["cost_usd"], p50_latency_ms=r["p50"], p95_latency_ms=r["p95"],
                         cache_hits=r["cache_hits"], cache_misses=r["cache_misses"], key_id=r["key_id"])
            for r in rows]


async def key_totals(pool: asyncpg.Pool, key_ids: Iterable[str]) -> dict[str, KeyTotals]:
    """All-time totals of each of `key_ids` that has used anything, by key id (sums only: no
    percentiles to sort for)."""
    rows = await pool.fetch(
        """SELECT key_id, count(*) AS requests, sum(prompt_tokens) AS prompt_tokens,
                  sum(completion_tokens) AS completion_tokens, sum(cost_usd) AS cost_usd
           FROM usage_records WHERE key_id = ANY($1::text[]) GROUP BY key_id""",
        list(key_ids), timeout=30)
    return {r["key_id"]: KeyTotals(requests=r["requests"], prompt_tokens=r["prompt_tokens"],
                                   completion_tokens=r["completion_tokens"], cost_usd=r["cost_usd"])
            for r in rows}
