"""What each admin UI page shows, gathered from the admin statistics, the jobs service, the key
store, the catalog and the shadow traffic, as plain values for the templates."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape

from roundhouse.v1 import jobs_pb2, jobs_pb2_grpc
from services.common.keys import KeyStore
from services.common.route_proto import RouteRecord, Stored
from services.router.http.admin import operation_json
from services.router.stats import AdminStats, ModelStats, Resources, SeriesBy, series_bucket
from services.router.ui.actions import actions_for
from services.router.ui.charts import UsageChart, bar_chart, charts_from
from services.router.usage import UsageLedger

TEMPLATES = Path(__file__).parent / "templates"
GROUPS = (("llm-runtime", "Language models"), ("embedding-runtime", "Embedding models"))
OTHER_MODELS = "Other models"
RECENT_OPERATIONS = 100
WINDOWS = {"1h": (3600, 60), "6h": (6 * 3600, 600), "24h": (86400, 3600), "7d": (7 * 86400, 6 * 3600)}
"""Usage windows the page offers: seconds shown and the bucket of each bar."""
WINDOW_LABELS = [("1h", "hour"), ("6h", "6 hours"), ("24h", "24 hours"), ("7d", "7 days")]
BUCKET_LABELS = {60: "minute", 600: "10 minutes", 3600: "hour", 6 * 3600: "6 hours"}
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_bytes(value: int | float | None) -> str:
    """`1.5 GiB`: a byte count for people."""
    size = float(value or 0)
    for unit in _UNITS:
        if size < 1024 or unit == _UNITS[-1]:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float | None) -> str:
    """`42 s`, `5 min`, `3 h`, `2 d`."""
    if seconds is None:
        return "–"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def human_time(value: datetime | str | None) -> str:
    """`2025-01-31 12:00:05` (UTC) from a datetime or RFC 3339 text; `–` for none."""
    if not value:
        return "–"
    moment = datetime.fromisoformat(value.replace("Z", "+00:00")) if isinstance(value, str) else value
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def human_ms(value: float | None) -> str:
    """`12.3 ms`; `–` for none."""
    return "–" if value is None else f"{value:.1f} ms"


def template_environment() -> Environment:
    """The UI's jinja2 templates (package data beside this module), HTML escaped, with the
    filters they use."""
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(bytes=human_bytes, duration=human_duration, when=human_time, ms=human_ms)
    return env


@dataclass
class ModelRow:
    """A model's row: its statistics and the buttons its state offers."""

    stats: ModelStats
    actions: list[str]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stats, name)


async def latest_operations(jobs: jobs_pb2_grpc.JobsStub) -> dict[str, dict[str, Any]]:
    """The newest of the recent operations of each model, by asset id."""
    reply = await jobs.ListOperations(jobs_pb2.ListOperationsRequest(page_size=RECENT_OPERATIONS), timeout=10)
    latest: dict[str, dict[str, Any]] = {}
    for operation in reply.operations:  # newest first
        latest.setdefault(operation.asset_id, operation_json(operation))
    return latest


async def recent_operations(jobs: jobs_pb2_grpc.JobsStub) -> list[dict[str, Any]]:
    """The most recent operations, newest first."""
    reply = await jobs.ListOperations(jobs_pb2.ListOperationsRequest(page_size=RECENT_OPERATIONS), timeout=10)
    return [operation_json(o) for o in reply.operations]


async def models_view(stats: AdminStats, jobs: jobs_pb2_grpc.JobsStub) -> dict[str, Any]:
    """The models page: language and embedding models in two groups (others after), and each
    model's latest operation with its progress."""
    models = await stats.models(figures=False)  # the page shows states, not request figures
    groups = []
    placed: set[str] = set()
    for interface, title in GROUPS:
        rows = [ModelRow(m, actions_for(m)) for m in models if interface in m.interfaces]
        placed |= {m.asset_id for m in rows}
        groups.append({"interface": interface, "title": title, "models": rows})
    others = [ModelRow(m, actions_for(m)) for m in models if m.asset_id not in placed]
    if others:
        groups.append({"interface": "other", "title": OTHER_MODELS, "models": others})
    return {"groups": groups, "operations": await latest_operations(jobs)}


def workers_view(resources: Resources) -> dict[str, Any]:
    """The workers page: the store's disk, each worker's memory bar and models."""
    workers = []
    for worker in resources.workers:
        budget = worker.memory_budget_bytes
        percent = min(100.0, 100.0 * worker.memory_used_bytes / budget) if budget else 0.0
        workers.append({**worker.__dict__, "memory_percent": f"{percent:.1f}"})
    return {"store": resources.store, "workers": workers}


def routes_view(records: list[Stored], shadow: Callable[[str], list[dict[str, Any]]]) -> dict[str, Any]:
    """The routes page: each route's split (percent per target), fallbacks, and its shadow
    copies' figures (`shadow(route_id)` gives `ShadowTraffic.summary`)."""
    routes = []
    for record in records:
        if not isinstance(record, RouteRecord):
            continue
        spec = record.spec
        total = sum(float(t.weight) for t in spec.targets) or 1.0
        summaries = {s["asset"]: s for s in shadow(spec.asset_id)}
        shadows = []
        for copy in spec.shadow:
            seen = summaries.get(copy.asset, {})
            agreement = seen.get("agreement", {})
            shadows.append({
                "asset": copy.asset, "sample": float(copy.sample), "copies": seen.get("copies", 0),
                "running": seen.get("running", 0), "errors": seen.get("errors", 0),
                "agreement_value": agreement.get("value"), "agreement_kind": agreement.get("kind") or "",
                "compared": agreement.get("compared", 0),
                "primary_p50": seen.get("primary", {}).get("latency_ms", {}).get("p50"),
                "shadow_p50": seen.get("shadow", {}).get("latency_ms", {}).get("p50")})
        routes.append({"route_id": spec.asset_id, "interface": spec.interface,
                       "targets": [{"asset": t.asset, "percent": 100.0 * float(t.weight) / total}
                                   for t in spec.targets],
                       "fallback": list(spec.fallback), "shadow": shadows})
    return {"routes": sorted(routes, key=lambda r: r["route_id"])}


async def usage_view(stats: AdminStats, by: SeriesBy, window: str) -> dict[str, Any]:
    """The usage page: one bar chart of requests per bucket for each model (or key), as of now
    (requests publish no event, so the page shows when it was drawn)."""
    window_s, wanted_bucket = WINDOWS[window]
    bucket_s = series_bucket(window_s, wanted_bucket)
    now = datetime.now(UTC)
    since = now - timedelta(seconds=window_s)
    points = await stats.usage_series(window_s, bucket_s, by)
    charts: list[UsageChart] = charts_from(
        [(p.group, p.start, p.requests, p.prompt_tokens + p.completion_tokens) for p in points],
        since, bucket_s, math.ceil(window_s / bucket_s))
    return {"by": by, "window": window, "windows": WINDOW_LABELS, "as_of": human_time(now),
            "window_label": dict(WINDOW_LABELS)[window],
            "bucket_label": BUCKET_LABELS.get(bucket_s, f"{bucket_s} s"),
            "charts": [{"group": c.group, "requests": c.requests, "tokens": c.tokens,
                        "svg": bar_chart(c, bucket_s)} for c in charts]}


async def keys_view(store: KeyStore, ledger: UsageLedger) -> dict[str, Any]:
    """The keys page: every unrevoked key with what it has used; never a secret."""
    records = await store.list(include_revoked=False)
    totals = await ledger.key_totals([r.key_id for r in records])
    keys = []
    for record in records:
        used = totals.get(record.key_id)
        keys.append({"name": record.name, "prefix": record.prefix, "admin": record.admin,
                     "models": list(record.models), "created_at": record.created_at,
                     "expires_at": record.expires_at, "requests": used.requests if used else 0,
                     "tokens": (used.prompt_tokens + used.completion_tokens) if used else 0})
    return {"keys": keys}
