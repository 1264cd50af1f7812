"""A route's plan for one request: the assets to try, in order, and what each attempt came to.

The first candidate is the split's pick among the live targets (see `split.pick_target`); the
others are the fallbacks, a loaded one before one that would have to wake. A target or
fallback that cannot take the request at all is left out up front and the attempt says why:
disabled, failed (its last load), or a context length smaller than the prompt.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from services.common.asset_proto import AssetRecord
from services.common.errors import (
    AssetDisabled,
    ContextLengthExceeded,
    DeadlineExceeded,
    ModelFailed,
    ModelNotReady,
    NotFound,
    Overloaded,
    RoundhouseError,
    ShuttingDown,
    UpstreamError,
)
from services.common.route_proto import RouteRecord
from services.common.routespec import FallbackReason, RouteSpec
from services.router.routes.split import NoLiveTarget, attempts_header, fallback_order, pick_target

TARGET_HEADER = "x-roundhouse-target"
ATTEMPTS_HEADER = "x-roundhouse-attempts"
CACHE_HEADER = "x-roundhouse-cache"

Resolve = Callable[[str], Awaitable[AssetRecord]]
"""The model an asset id or alias names (a route never names another route)."""


def fallback_reason(exc: BaseException) -> FallbackReason | None:
    """The class of failure `exc` is, as `fallback_on` names them; None for one that no
    other asset would answer differently (a bad request, a key over its limits)."""
    if isinstance(exc, Overloaded):
        return "overloaded"
    if isinstance(exc, ContextLengthExceeded):
        return "context_length"
    if isinstance(exc, UpstreamError):
        return "upstream_error"
    if isinstance(exc, DeadlineExceeded):
        return "timeout"
    if isinstance(exc, ModelNotReady | ShuttingDown | AssetDisabled | ModelFailed | NotFound):
        return "unavailable"
    return None


@dataclass
class Routed:
    """What one request to a route came to, for the response's headers; and whether the
    client asked to skip the response cache (`Cache-Control: no-cache`)."""

    no_cache: bool = False
    target: str = ""
    """The asset that answered."""
    attempts: list[tuple[str, str]] = field(default_factory=list)
    """Each asset tried, in order, with its outcome (`ok`, `overloaded`, ...)."""
    cache: str = ""
    """`hit` or `miss` for a route with a cache; empty otherwise."""
    route: bool = False
    """Whether the request named a route (attempts are reported only then)."""

    def headers(self) -> dict[str, str]:
        """`x-roundhouse-target`, and for a route `x-roundhouse-attempts` and (with a cache)
        `x-roundhouse-cache`."""
        headers = {TARGET_HEADER: self.target} if self.target else {}
        if self.route and self.attempts:
            headers[ATTEMPTS_HEADER] = attempts_header(self.attempts)
        if self.cache:
            headers[CACHE_HEADER] = self.cache
        return headers


@dataclass
class Plan:
    """The candidates of one request, in the order to try them."""

    route: RouteSpec | None
    candidates: list[AssetRecord]

    def falls_back(self, reason: FallbackReason | None, tried: int) -> bool:
        """Whether a failure of class `reason` of the `tried`-th candidate (from 1) moves the
        request to the next one."""
        return (self.route is not None and reason is not None and reason in self.route.fallback_on
                and tried < len(self.candidates))


class RoutePlanner:
    """Turns a resolved model or route into the `Plan` of one request."""

    def __init__(self, resolve: Resolve, is_loaded: Callable[[str], bool],
                 rng: random.Random | None = None) -> None:
        """`is_loaded(asset_id)`: whether a worker holds the asset now (no wake needed)."""
        self._resolve = resolve
        self._is_loaded = is_loaded
        self._rng = rng or random.Random()

    async def plan(self, stored: AssetRecord | RouteRecord, *, sticky_key: str | None,
                   prompt_tokens: int, routed: Routed) -> Plan:
        """A model: itself. A route: its pick among the live targets, then its fallbacks.
        Targets and fallbacks left out up front are recorded in `routed.attempts`; when none
        is left, the request fails as the last one left out would have."""
        if isinstance(stored, AssetRecord):
            return Plan(None, [stored])
        route = stored.spec
        routed.route = True
        skipped: list[RoundhouseError] = []
        live: dict[str, tuple[float, AssetRecord]] = {}
        for target in route.targets:
            record = await self._usable(target.asset, prompt_tokens, routed, skipped)
            if record is not None:
                live.setdefault(record.spec.asset_id, (target.weight, record))
        candidates: list[AssetRecord] = []
        try:
            picked = pick_target(route, {a: w for a, (w, _) in live.items()},
                                 sticky_key if route.sticky != "none" else None, self._rng)
            candidates.append(live[picked][1])
        except NoLiveTarget:
            pass
        resolved = {name: record for name in route.fallback
                    if (record := await self._usable(name, prompt_tokens, routed, skipped))}
        loaded = {name for name, record in resolved.items() if self._is_loaded(record.spec.asset_id)}
        for name in fallback_order(route, loaded):
            record = resolved.get(name)
            if record is not None and all(c.spec.asset_id != record.spec.asset_id for c in candidates):
                candidates.append(record)
        if not candidates:
            raise skipped[-1] if skipped else NotFound(f"route '{route.asset_id}' has no target")
        return Plan(route, candidates)

    async def _usable(self, name: str, prompt_tokens: int, routed: Routed,
                      skipped: list[RoundhouseError]) -> AssetRecord | None:
        """The asset `name` names when it can take the request; else None, recorded."""
        try:
            record = await self._resolve(name)
        except (NotFound, AssetDisabled) as exc:  # deleted or disabled since the route was applied
            routed.attempts.append((name, "unavailable"))
            skipped.append(exc)
            return None
        asset_id = record.spec.asset_id
        refusal: RoundhouseError | None = None
        if record.state == "failed" and not self._is_loaded(asset_id):
            refusal = ModelFailed(f"model '{asset_id}' failed to load: "
                                  f"{record.status.get('message', 'no reason recorded')}")
        elif (context := context_length(record)) and prompt_tokens >= context:
            refusal = ContextLengthExceeded(
                f"the prompt (about {prompt_tokens} tokens) does not fit model '{asset_id}' "
                f"({context} tokens of context)")
        if refusal is None:
            return record
        routed.attempts.append((asset_id, fallback_reason(refusal) or "unavailable"))
        skipped.append(refusal)
        return None


def context_length(record: AssetRecord) -> int:
    """The asset's context length (declared wins over detected); 0 when unknown."""
    detected = (record.capabilities or {}).get("context_length") or 0
    return int(record.spec.metadata.context_length or detected)
