"""The usage ledger (`usage_records`) read back for the admin statistics: per-model figures with
latency and time-to-first-token percentiles, totals, and bucketed series for charts.

Every query reads one window, `at >= since`; the percentiles are Postgres's `percentile_cont`,
which skips the NULL `ttft_ms` of requests that never streamed a token.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from services.router.stats.model import RequestFigures, SeriesBy, SeriesPoint

FAILED = "u.status NOT IN ('ok', 'cancelled')"
"""A request counted as an error: neither served nor given up by its client."""
PRODUCED = "u.status = 'ok' AND u.completion_tokens > 0"
_FIGURES = f"""count(*) AS requests,
    count(*) FILTER (WHERE {FAILED}) AS errors,
    coalesce(sum(u.prompt_tokens), 0) AS prompt_tokens,
    coalesce(sum(u.completion_tokens), 0) AS completion_tokens,
    percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY u.latency_ms) AS latency,
    percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY u.ttft_ms) AS ttft,
    sum(u.completion_tokens) FILTER (WHERE {PRODUCED}) AS produced_tokens,
    sum(u.latency_ms) FILTER (WHERE {PRODUCED}) AS produced_ms"""
_SERIES_GROUP = {
    "model": ("u.asset_id", ""),
    # A key by its name (requests made with auth off: ''); a revoked key keeps its name here.
    "key": ("coalesce(k.name, u.key_id)", "LEFT JOIN api_keys k ON k.key_id = u.key_id"),
}


def _percentiles(values: list[float | None] | None) -> tuple[float | None, float | None, float | None]:
    if not values:
        return None, None, None
    p50, p95, p99 = values
    return p50, p95, p99


def _figures(row: asyncpg.Record | dict[str, Any]) -> RequestFigures:
    latency = _percentiles(row["latency"])
    ttft = _percentiles(row["ttft"])
    produced_ms = row["produced_ms"]
    rate = (row["produced_tokens"] / (produced_ms / 1000.0)) if produced_ms else None
    return RequestFigures(
        requests=row["requests"], errors=row["errors"], prompt_tokens=row["prompt_tokens"],
        completion_tokens=row["completion_tokens"],
        p50_latency_ms=latency[0], p95_latency_ms=latency[1], p99_latency_ms=latency[2],
        p50_ttft_ms=ttft[0], p95_ttft_ms=ttft[1], p99_ttft_ms=ttft[2], tokens_per_s=rate)


async def figures_by_model(pool: asyncpg.Pool, since: datetime) -> dict[str, RequestFigures]:
    """Each answering model's figures since `since` (requests that reached no model left out)."""
    rows = await pool.fetch(
        f"""SELECT u.asset_id, {_FIGURES} FROM usage_records u
            WHERE u.at >= $1 AND u.asset_id <> '' GROUP BY u.asset_id""",  # noqa: S608 - fixed text
        since, timeout=30)
    return {r["asset_id"]: _figures(r) for r in rows}


async def total_figures(pool: asyncpg.Pool, since: datetime) -> RequestFigures:
    """Every request since `since`, those that reached no model included."""
    row = await pool.fetchrow(f"SELECT {_FIGURES} FROM usage_records u WHERE u.at >= $1",  # noqa: S608
                              since, timeout=30)
    return _figures(row) if row is not None else RequestFigures()


async def series(pool: asyncpg.Pool, since: datetime, bucket_s: int, by: SeriesBy) -> list[SeriesPoint]:
    """Requests, errors and tokens per `bucket_s` bucket (aligned on `since`) and per model or
    key, oldest bucket first; buckets without requests are left out."""
    group, join = _SERIES_GROUP[by]  # fixed expressions, never client text
    rows = await pool.fetch(
        f"""SELECT date_bin(make_interval(secs => $2), u.at, $1) AS start, {group} AS grp,
                   count(*) AS requests, count(*) FILTER (WHERE {FAILED}) AS errors,
                   coalesce(sum(u.prompt_tokens), 0) AS prompt_tokens,
                   coalesce(sum(u.completion_tokens), 0) AS completion_tokens
            FROM usage_records u {join}
            WHERE u.at >= $1 GROUP BY start, grp ORDER BY start, grp""",  # noqa: S608
        since, float(bucket_s), timeout=30)
    return [SeriesPoint(start=r["start"], group=r["grp"], requests=r["requests"], errors=r["errors"],
                        prompt_tokens=r["prompt_tokens"], completion_tokens=r["completion_tokens"])
            for r in rows]
