"""Shadow traffic: copies of a sample of a route's requests, sent to its shadow assets and
compared with the answers the callers got.

The gateway decides whether a request is copied (`sampled`), whether the shadow asset may
take it (one asleep that may not be woken is `skipped`), and does the sending; this module
bounds the copies in flight per (route, shadow asset), runs each in the background, pairs
it with the primary's outcome, and keeps the bookkeeping: latency and tokens per side and
agreement (exact match of greedy chat answers, mean cosine similarity of embeddings), in
Prometheus metrics and in per-route summaries (`GET /admin/v1/routes/{id}/shadow`).
Nothing here can delay, change or fail a primary request: `submit` returns at once and
never raises.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client import Counter as CounterMetric

from services.common import routespec
from services.common.errors import Overloaded
from services.common.telemetry import LATENCY_BUCKETS

log = logging.getLogger(__name__)

LATENCY_WINDOW = 1000
"""Latencies kept per side for the percentiles: the most recent ones."""
COMPARE_STEP_VALUES = 16_384
"""Vector components compared per side before the comparison hands the event loop back: a
large embedding batch (2048 inputs of 1536 floats) takes ~0.15 s to compare, which the
requests on the loop must not wait for."""
AgreementKind = Literal["exact_match", "cosine"]
Vectors = Sequence[Sequence[float]] | np.ndarray[Any, Any]


@dataclass
class SideOutcome:
    """What one side (the primary, or the shadow copy) of a request answered."""

    latency_s: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    text: str | None = None
    """Chat: the answer's text."""
    vectors: Vectors | None = None
    """Embeddings: one vector per input, in input order."""
    error: str = ""
    """Non-empty when the side failed: the error's class name."""
    greedy: bool = True
    """Chat: the answer was decoded greedily, so an exact match of two answers means something."""

    @property
    def ok(self) -> bool:
        """Whether the side answered."""
        return not self.error


async def compare(primary: SideOutcome, shadow: SideOutcome
                  ) -> tuple[AgreementKind, float | None] | None:
    """How far two answers agree: the kind of agreement and its value (1.0 or 0.0 for an exact
    match, the mean cosine similarity over the inputs for embeddings). The value is None when
    the answers cannot be compared (a sampled chat answer, vectors of other shapes, a zero
    vector); the result is None when the answers carry neither text nor vectors. Large
    batches of vectors are compared in steps, handing the event loop back between them."""
    if primary.vectors is not None and shadow.vectors is not None:
        return "cosine", await _mean_cosine(primary.vectors, shadow.vectors)
    if primary.text is not None and shadow.text is not None:
        if not (primary.greedy and shadow.greedy):
            return "exact_match", None
        return "exact_match", float(primary.text == shadow.text)
    return None


async def _mean_cosine(first: Vectors, second: Vectors) -> float | None:
    if len(first) != len(second) or len(first) == 0:
        return None
    rows = max(1, COMPARE_STEP_VALUES // max(1, len(first[0])))
    width, total = None, 0.0
    for start in range(0, len(first), rows):
        if start:
            await asyncio.sleep(0)  # let requests run between two steps
        try:
            a = np.asarray(first[start:start + rows], dtype=np.float64)
            b = np.asarray(second[start:start + rows], dtype=np.float64)
        except ValueError:  # ragged lists
            return None
        if a.ndim != 2 or a.shape != b.shape or a.shape[1] == 0 or width not in (None, a.shape[1]):
            return None
        width = a.shape[1]
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        if not np.all(norms > 0):
            return None
        total += float(np.clip(np.einsum("ij,ij->i", a, b) / norms, -1.0, 1.0).sum())
    return total / len(first)


def _percentile(ordered: Sequence[float], q: float) -> float | None:
    """The `q` percentile of sorted values, interpolated as Postgres' `percentile_cont` does."""
    if not ordered:
        return None
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class _Side:
    """One side's totals over the copies of one (route, shadow asset)."""

    latencies_s: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, outcome: SideOutcome) -> None:
        self.latencies_s.append(outcome.latency_s)
        self.prompt_tokens += outcome.prompt_tokens
        self.completion_tokens += outcome.completion_tokens

    def view(self) -> dict[str, Any]:
        ordered = sorted(self.latencies_s)
        p50, p95 = _percentile(ordered, 0.5), _percentile(ordered, 0.95)
        return {"latency_ms": {"p50": None if p50 is None else round(p50 * 1000, 3),
                               "p95": None if p95 is None else round(p95 * 1000, 3)},
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}


@dataclass
class _Target:
    """The bookkeeping of one shadow asset of one route."""

    running: int = 0
    copies: int = 0
    errors: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    primary: _Side = field(default_factory=_Side)
    shadow: _Side = field(default_factory=_Side)
    kind: AgreementKind | None = None
    compared: int = 0
    not_compared: int = 0
    agreement_sum: float = 0.0

    @property
    def agreement(self) -> float | None:
        return self.agreement_sum / self.compared if self.compared else None

    def view(self, asset: str) -> dict[str, Any]:
        return {"asset": asset, "copies": self.copies, "running": self.running,
                "dropped": dict(sorted(self.dropped.items())), "errors": self.errors,
                "primary": self.primary.view(), "shadow": self.shadow.view(),
                "agreement": {"kind": self.kind, "compared": self.compared,
                              "not_compared": self.not_compared, "value": self.agreement}}


class ShadowTraffic:
    """Copies of route requests to shadow assets: the bound on those in flight, the
    background tasks that run them, and what they showed.

    One per router process; every method runs on the router's event loop."""

    def __init__(self, *, max_in_flight: int = 4, rng: random.Random | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.max_in_flight = max_in_flight
        self._rng = rng or random.Random()
        self._routes: dict[str, dict[str, _Target]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._requests = CounterMetric(
            "roundhouse_shadow_requests", "Shadow copies by route, shadow asset and result (ok, "
            "error, or dropped_<reason>: dropped_saturated, dropped_asleep...).",
            ["route", "shadow", "result"], registry=registry)
        self._latency = Histogram(
            "roundhouse_shadow_latency_seconds", "Latency of the answers of shadowed requests, "
            "by side (primary or shadow).", ["route", "shadow", "side"],
            buckets=LATENCY_BUCKETS, registry=registry)
        self._tokens = CounterMetric(
            "roundhouse_shadow_tokens", "Tokens of the answers of shadowed requests, by side and "
            "type (prompt or completion).", ["route", "shadow", "side", "type"], registry=registry)
        self._agreement = Gauge(
            "roundhouse_shadow_agreement", "Agreement of shadow and primary answers so far: the "
            "exact-match rate (chat) or the mean cosine similarity (embeddings).",
            ["route", "shadow"], registry=registry)

    def sampled(self, shadow: routespec.Shadow) -> bool:
        """Whether this request is copied to `shadow` (a draw against its `sample` share)."""
        return self._rng.random() < shadow.sample

    def submit(self, route_id: str, shadow_asset: str, primary: asyncio.Future[SideOutcome],
               run: Callable[[], Awaitable[SideOutcome]]) -> bool:
        """Start the copy `run` to `shadow_asset` in the background; False (and a drop counted,
        `saturated`) when `max_in_flight` copies to it are running already.

        `primary` is resolved when the primary request ends, however it ends (the caller's
        `finally`): with its outcome, or cancelled when it failed or was abandoned (the copy
        then counts for the shadow side alone). The pair is recorded once both sides are done.
        An exception of `run` is recorded as the copy's error; nothing is raised here."""
        try:
            target = self._target(route_id, shadow_asset)
            if self._closed:
                self.skipped(route_id, shadow_asset, "shutting_down")
                return False
            if target.running >= self.max_in_flight:
                self.skipped(route_id, shadow_asset, "saturated")
                return False
            task = asyncio.get_running_loop().create_task(
                self._copy(route_id, shadow_asset, target, primary, run),
                name=f"shadow copy {route_id} -> {shadow_asset}")
        except Exception:
            log.exception("shadow copy of route %s to %s not started", route_id, shadow_asset)
            return False
        target.running += 1
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    def skipped(self, route_id: str, shadow_asset: str, reason: str) -> None:
        """Count a copy not made, and why: `asleep` (the shadow asset is asleep and may not be
        woken), `saturated`..."""
        self._target(route_id, shadow_asset).dropped[reason] += 1
        self._requests.labels(route_id, shadow_asset, f"dropped_{reason}").inc()

    def summary(self, route_id: str) -> list[dict[str, Any]]:
        """What the copies of `route_id` showed, one dict per shadow asset (by asset id); empty
        when the route has had none."""
        targets = self._routes.get(route_id, {})
        return [targets[asset].view(asset) for asset in sorted(targets)]

    async def close(self) -> None:
        """Cancel the copies still running (router shutdown); later ones are not started."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # A copy cancelled before its first step never ran the code that counts it out.
        for targets in self._routes.values():
            for target in targets.values():
                target.running = 0

    def _target(self, route_id: str, shadow_asset: str) -> _Target:
        return self._routes.setdefault(route_id, {}).setdefault(shadow_asset, _Target())

    async def _copy(self, route_id: str, asset: str, target: _Target,
                    primary: asyncio.Future[SideOutcome],
                    run: Callable[[], Awaitable[SideOutcome]]) -> None:
        started, saturated = time.perf_counter(), False
        try:
            shadow = await run()
            if not isinstance(shadow, SideOutcome):
                raise TypeError(f"a shadow copy answered {type(shadow).__name__}")
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            shadow = SideOutcome(time.perf_counter() - started, error="CancelledError")
        except Overloaded:  # no free slot for a copy there: dropped, not failed
            saturated = True
        except Exception as exc:
            log.debug("shadow copy of route %s to %s failed", route_id, asset, exc_info=True)
            shadow = SideOutcome(time.perf_counter() - started, error=type(exc).__name__)
        finally:
            target.running -= 1
        if saturated:
            self.skipped(route_id, asset, "saturated")
            return
        if not primary.done():  # the primary is still answering (a long stream)
            await asyncio.wait([primary])
        try:
            answered = _primary_outcome(primary)
            compared = await compare(answered, shadow) if answered and shadow.ok else None
            self._record(route_id, asset, target, answered, shadow, compared)
        except Exception:
            log.exception("shadow copy of route %s to %s not recorded", route_id, asset)

    def _record(self, route_id: str, asset: str, target: _Target, primary: SideOutcome | None,
                shadow: SideOutcome, compared: tuple[AgreementKind, float | None] | None) -> None:
        target.copies += 1
        if primary is not None:
            self._add_side(route_id, asset, "primary", target.primary, primary)
        if not shadow.ok:
            target.errors += 1
            self._requests.labels(route_id, asset, "error").inc()
            return
        self._requests.labels(route_id, asset, "ok").inc()
        self._add_side(route_id, asset, "shadow", target.shadow, shadow)
        if compared is None:
            return
        target.kind, value = compared
        if value is None:
            target.not_compared += 1
            return
        target.compared += 1
        target.agreement_sum += value
        self._agreement.labels(route_id, asset).set(target.agreement_sum / target.compared)

    def _add_side(self, route_id: str, asset: str, side: str, totals: _Side,
                  outcome: SideOutcome) -> None:
        totals.add(outcome)
        self._latency.labels(route_id, asset, side).observe(outcome.latency_s)
        if outcome.prompt_tokens:
            self._tokens.labels(route_id, asset, side, "prompt").inc(outcome.prompt_tokens)
        if outcome.completion_tokens:
            self._tokens.labels(route_id, asset, side, "completion").inc(outcome.completion_tokens)


def _primary_outcome(future: asyncio.Future[SideOutcome]) -> SideOutcome | None:
    """The primary's outcome when it answered; None when it failed or was abandoned."""
    if future.cancelled() or future.exception() is not None:
        return None
    outcome = future.result()
    return outcome if isinstance(outcome, SideOutcome) and outcome.ok else None
