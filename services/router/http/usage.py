"""`GET /admin/v1/usage`: the usage ledger summed per API key, asset or day (an admin key is
needed, as for every `/admin/v1` route; see `auth`)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, BeforeValidator, ConfigDict

from services.router.http.protocol import ErrorResponse
from services.router.usage import GroupBy, UsageLedger

DEFAULT_SPAN = timedelta(days=30)
EARLIEST = datetime.min.replace(tzinfo=UTC)
LATEST = datetime.max.replace(tzinfo=UTC)
DATE_TIME_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}")
"""The start every accepted time has: a date and a time (pydantic alone would take `0.5` as
seconds since the epoch, which the schema's `date-time` does not allow)."""

usage_router = APIRouter(prefix="/admin/v1", tags=["admin"])


class UsageRow(BaseModel):
    """One group's totals over the period."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    group: str
    """By key: the key's name, followed by the first 8 characters of its id in parentheses
    when several keys (revoked ones included) have had that name; empty for requests made
    with auth off. By asset: the asset id. By day: the day (UTC, `YYYY-MM-DD`)."""
    key_id: str | None = None
    """By key: the key's id, which never changes nor passes to another key ('' for requests
    made with auth off); null otherwise."""
    requests: int
    errors: int
    """Requests that did not succeed (refused by a limit, failed, cancelled...)."""
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    p50_latency_ms: float
    p95_latency_ms: float
    cache_hits: int = 0
    """Requests to a route answered from its response cache (no tokens used)."""
    cache_misses: int = 0
    """Requests to a route with a response cache that a model answered."""


class UsageReport(BaseModel):
    """`GET /admin/v1/usage`."""

    group_by: GroupBy
    since: datetime
    until: datetime
    rows: list[UsageRow]


def _date_time(value: Any) -> Any:
    if isinstance(value, str) and not DATE_TIME_RE.match(value):
        raise ValueError("expected an RFC 3339 date-time, such as 2025-01-31T00:00:00Z")
    return value


DateTime = Annotated[datetime, BeforeValidator(_date_time)]
"""A time given as RFC 3339 text, with or without an offset."""


def _utc(value: datetime) -> datetime:
    """`value` in UTC (UTC when it has no offset), within years 1 to 9999 (a time whose offset
    takes it past either end is clamped there)."""
    try:
        return (value if value.tzinfo is not None else value.replace(tzinfo=UTC)).astimezone(UTC)
    except OverflowError:
        return EARLIEST if value.year == 1 else LATEST


@usage_router.get("/usage", response_model=UsageReport, responses={
    400: {"model": ErrorResponse, "description": "A parameter is invalid; `error.param` names it."}})
async def usage(
    request: Request,
    group_by: Annotated[GroupBy, Query(description="Sum per `key`, `asset` or `day`.")] = "key",
    since: Annotated[DateTime | None, Query(
        description="Start (RFC 3339; UTC if no offset); default: 30 days before `until`.")] = None,
    until: Annotated[DateTime | None, Query(
        description="End, excluded (RFC 3339; UTC if no offset); default: now.")] = None,
) -> dict[str, Any]:
    """Requests, errors, tokens in and out, cost, p50/p95 latency and route cache hits and
    misses from the usage ledger,
    every router's requests included (this router's are written before it answers). A period
    that ends before it starts is empty."""
    end = _utc(until) if until is not None else datetime.now(UTC)
    if since is not None:
        start = _utc(since)
    else:
        start = end - DEFAULT_SPAN if end - EARLIEST > DEFAULT_SPAN else EARLIEST
    ledger: UsageLedger = request.app.state.gateway.usage
    rows = await ledger.summary(group_by, start, end)
    return {"group_by": group_by, "since": start, "until": end,
            "rows": [UsageRow(group=r.group, key_id=r.key_id, requests=r.requests, errors=r.errors,
                              prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                              cost_usd=float(r.cost_usd), p50_latency_ms=r.p50_latency_ms,
                              p95_latency_ms=r.p95_latency_ms, cache_hits=r.cache_hits,
                              cache_misses=r.cache_misses) for r in rows]}
