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
from services.router.routes.split import NoLiveTarget, attempts_header, fallback_order, rank_targets

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
    """What one request to a route came to, for the response's headers; and what the client
    asked of the response cache (`Cache-Control: no-cache`: no lookup; `no-store`: nothing
    kept either)."""

    no_cache: bool = False
    no_store: bool = False
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


@dataclass(frozen=True)
class Candidate:
    """One asset a request may go to: its record, or why it cannot take the request."""

    name: str
    """The asset id (the name the route gives, when it named nothing)."""
    record: AssetRecord | None = None
    refusal: RoundhouseError | None = None
    """Why it was left out up front (disabled, deleted, failed, context too small)."""

    @property
    def outcome(self) -> str:
        """How the attempts header spells its refusal."""
        return "ok" if self.refusal is None else fallback_reason(self.refusal) or "unavailable"


@dataclass
class Plan:
    """The candidates of one request, in the order to try them: the route's live targets (the
    split's pick first), then its fallbacks. Targets left out up front are in `left_out`; a
    fallback left out stays in its place, to be reported only if the request gets that far."""

    route: RouteSpec | None
    candidates: list[Candidate]
    left_out: list[Candidate] = field(default_factory=list)

    @property
    def usable(self) -> list[AssetRecord]:
        """The candidates' records that may take the request, in order."""
        return [c.record for c in self.candidates if c.record is not None]

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
                   prompt_tokens: int) -> Plan:
        """A model: itself. A route: its live targets (the split's pick first, see
        `split.rank_targets`), then its fallbacks, a loaded one before one that would have to
        wake. When no candidate can take the request, it fails as the last one left out."""
        if isinstance(stored, AssetRecord):
            return Plan(None, [Candidate(stored.spec.asset_id, stored)])
        route = stored.spec
        left_out: list[Candidate] = []
        live: dict[str, tuple[float, AssetRecord]] = {}
        for target in route.targets:
            candidate = await self._candidate(target.asset, prompt_tokens)
            if candidate.record is None:
                left_out.append(candidate)
            else:
                live.setdefault(candidate.name, (target.weight, candidate.record))
        try:
            ranked = rank_targets(route, {a: w for a, (w, _) in live.items()},
                                  sticky_key if route.sticky != "none" else None, self._rng)
        except NoLiveTarget:
            ranked = []
        candidates = [Candidate(name, live[name][1]) for name in ranked]
        fallbacks = {name: await self._candidate(name, prompt_tokens) for name in route.fallback}
        loaded = {name for name, c in fallbacks.items() if c.record is not None
                  and self._is_loaded(c.name)}
        for name in fallback_order(route, loaded):
            if all(c.name != fallbacks[name].name for c in candidates):
                candidates.append(fallbacks[name])
        plan = Plan(route, candidates, left_out)
        if not plan.usable:
            refusals = [c.refusal for c in [*left_out, *candidates] if c.refusal is not None]
            raise refusals[-1] if refusals else NotFound(f"route '{route.asset_id}' has no target")
        return plan

    async def _candidate(self, name: str, prompt_tokens: int) -> Candidate:
        """The asset `name` names, or why it cannot take the request."""
        try:
            record = await self._resolve(name)
        except (NotFound, AssetDisabled) as exc:  # deleted or disabled since the route was applied
            return Candidate(name, refusal=exc)
        asset_id = record.spec.asset_id
        if record.state == "failed" and not self._is_loaded(asset_id):
            return Candidate(asset_id, refusal=ModelFailed(
                f"model '{asset_id}' failed to load: "
                f"{record.status.get('message', 'no reason recorded')}"))
        if (context := context_length(record)) and prompt_tokens >= context:
            return Candidate(asset_id, refusal=ContextLengthExceeded(
                f"the prompt (about {prompt_tokens} tokens) does not fit model '{asset_id}' "
                f"({context} tokens of context)"))
        return Candidate(asset_id, record)


def context_length(record: AssetRecord) -> int:
    """The asset's context length (declared wins over detected); 0 when unknown."""
    detected = (record.capabilities or {}).get("context_length") or 0
    return int(record.spec.metadata.context_length or detected)
