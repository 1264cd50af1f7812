"""Reading the usage ledger back: totals and latency percentiles per key, asset or day."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Literal

import asyncpg

GroupBy = Literal["key", "asset", "day"]
_GROUPS: dict[str, str] = {
    # A key by its name (what operators know it by); requests served without a key as ''.
    "key": "coalesce(k.name, u.key_id)",
    "asset": "u.asset_id",
    "day": "to_char(u.at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
}


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


async def summarize(pool: asyncpg.Pool, group_by: GroupBy, since: datetime,
                    until: datetime) -> list[UsageSummary]:
    """Requests in [since, until) grouped by `group_by`, in group order."""
    group = _GROUPS[group_by]  # one of three fixed expressions, never client text
    rows = await pool.fetch(
        f"""SELECT {group} AS grp, count(*) AS requests,
                   count(*) FILTER (WHERE u.status <> 'ok') AS errors,
                   coalesce(sum(u.prompt_tokens), 0) AS prompt_tokens,
                   coalesce(sum(u.completion_tokens), 0) AS completion_tokens,
                   coalesce(sum(u.cost_usd), 0) AS cost_usd,
                   percentile_cont(0.5) WITHIN GROUP (ORDER BY u.latency_ms) AS p50,
                   percentile_cont(0.95) WITHIN GROUP (ORDER BY u.latency_ms) AS p95
            FROM usage_records u LEFT JOIN api_keys k ON k.key_id = u.key_id
            WHERE u.at >= $1 AND u.at < $2
            GROUP BY grp ORDER BY grp""",  # noqa: S608
        since, until, timeout=30)
    return [UsageSummary(group=r["grp"], requests=r["requests"], errors=r["errors"],
                         prompt_tokens=r["prompt_tokens"], completion_tokens=r["completion_tokens"],
                         cost_usd=r["cost_usd"], p50_latency_ms=r["p50"], p95_latency_ms=r["p95"])
            for r in rows]
