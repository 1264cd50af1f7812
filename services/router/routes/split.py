"""The split: which of a route's targets answers a request, and the order of its fallbacks.

Without a sticky key the choice is weighted at random. With one it is weighted rendezvous
hashing (highest random weight): every (key, target) pair draws a score and the highest
wins, so the same key always gets the same target, a weight change moves only the keys it
must, and a target that leaves moves only its own keys.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping

from services.common.routespec import RouteSpec

_HASH_BITS = 52
"""Bits of the hash a score uses: with the half step added they fit a float exactly, so the
uniform draw stays strictly between 0 and 1."""


class NoLiveTarget(Exception):
    """No live target of the route has a positive weight: the request goes to the fallbacks."""


def pick_target(route: RouteSpec, candidates_weights: Mapping[str, float],
                sticky_key: str | None, rng: random.Random) -> str:
    """The target that answers one request to `route`.

    `candidates_weights` holds only the live targets (a disabled or failed one is left out,
    and its share goes to the others in proportion to their weights). With `sticky_key`
    (the request's user or API key) the choice is a function of the key; without it, `rng`
    draws it. Raises `NoLiveTarget` when no candidate has a positive weight.
    """
    live = [(target, weight) for target, weight in candidates_weights.items() if weight > 0]
    if not live:
        raise NoLiveTarget(f"route {route.asset_id!r} has no live target")
    if sticky_key is not None:
        return max(live, key=lambda tw: _score(route.asset_id, sticky_key, *tw))[0]
    point = rng.random() * sum(weight for _, weight in live)
    for target, weight in live:
        point -= weight
        if point < 0:
            return target
    return live[-1][0]  # rounding left the point at the very end of the range


def rank_targets(route: RouteSpec, candidates_weights: Mapping[str, float],
                 sticky_key: str | None, rng: random.Random) -> list[str]:
    """The live targets in the order to try them: the split's pick (`pick_target`) first,
    then the others, by their rendezvous score for `sticky_key` (so a caller's second choice is
    stable too), else by weight. Raises `NoLiveTarget` as `pick_target` does."""
    first = pick_target(route, candidates_weights, sticky_key, rng)
    rest = [t for t, w in candidates_weights.items() if w > 0 and t != first]
    if sticky_key is not None:
        rest.sort(key=lambda t: _score(route.asset_id, sticky_key, t, candidates_weights[t]),
                  reverse=True)
    else:
        rest.sort(key=lambda t: candidates_weights[t], reverse=True)
    return [first, *rest]


def _score(route_id: str, key: str, target: str, weight: float) -> float:
    """The rendezvous score of `target` for `key`: -weight / ln(u), u uniform in (0, 1)."""
    digest = hashlib.blake2b(f"{route_id}\0{key}\0{target}".encode(), digest_size=8).digest()
    uniform = ((int.from_bytes(digest, "big") >> (64 - _HASH_BITS)) + 0.5) / 2**_HASH_BITS
    return -weight / math.log(uniform)


def attempts_header(attempts: list[tuple[str, str]]) -> str:
    """The `x-roundhouse-attempts` value: each (asset, outcome) tried, in order, as
    `asset:outcome` joined by commas (`a:overloaded,b:ok`)."""
    return ",".join(f"{asset}:{outcome}" for asset, outcome in attempts)


def fallback_order(route: RouteSpec, loaded: set[str]) -> list[str]:
    """The route's fallback assets in the order to try them: the route's order, except that
    an asset in `loaded` (one that can answer without waking) comes before one that would
    need waking."""
    return sorted(route.fallback, key=lambda asset: asset not in loaded)
