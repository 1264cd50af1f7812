"""The split of a route's requests over its targets, and the order of its fallbacks."""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any

import pytest

from services.common.routespec import RouteSpec, parse_route
from services.router.routes import NoLiveTarget, attempts_header, fallback_order, pick_target

KEYS = [f"user-{i}" for i in range(10_000)]


def route(**changes: Any) -> RouteSpec:
    doc: dict[str, Any] = {
        "asset_id": "chat", "class": "route", "interface": "llm-runtime",
        "targets": [{"asset": "big", "weight": 90}, {"asset": "small", "weight": 10}],
    }
    doc.update(changes)
    return parse_route(doc)


def within(count: int, n: int, share: float) -> bool:
    """Whether `count` of `n` draws is within four binomial standard deviations of `share`."""
    return abs(count - n * share) <= 4 * math.sqrt(n * share * (1 - share))


def sticky_picks(chat: RouteSpec, weights: dict[str, float]) -> dict[str, str]:
    rng = random.Random(0)
    return {key: pick_target(chat, weights, key, rng) for key in KEYS}


def test_shares_follow_the_weights() -> None:
    chat, rng = route(), random.Random(20261130)
    picks = Counter(pick_target(chat, {"big": 90, "small": 10}, None, rng) for _ in range(400))
    assert set(picks) == {"big", "small"}
    assert within(picks["big"], 400, 0.9)


def test_a_missing_target_share_goes_to_the_others_in_proportion() -> None:
    chat, rng = route(), random.Random(7)
    picks = Counter(pick_target(chat, {"b": 30, "c": 10}, None, rng) for _ in range(400))
    assert set(picks) == {"b", "c"}
    assert within(picks["b"], 400, 0.75)


def test_zero_weight_is_never_picked_and_none_left_is_refused() -> None:
    chat, rng = route(), random.Random(1)
    assert {pick_target(chat, {"big": 1, "small": 0}, None, rng) for _ in range(50)} == {"big"}
    assert {pick_target(chat, {"big": 1, "small": 0}, k, rng) for k in KEYS[:50]} == {"big"}
    with pytest.raises(NoLiveTarget):
        pick_target(chat, {"small": 0}, None, rng)
    with pytest.raises(NoLiveTarget):
        pick_target(chat, {}, "user-1", rng)


def test_sticky_key_always_gets_the_same_target() -> None:
    chat = route(sticky="user")
    first = sticky_picks(chat, {"big": 90, "small": 10})
    for seed in (1, 2):
        rng = random.Random(seed)
        assert all(pick_target(chat, {"big": 90, "small": 10}, k, rng) == first[k]
                   for k in KEYS[:500])
    assert within(Counter(first.values())["big"], len(KEYS), 0.9)


def test_weight_change_moves_only_the_share_it_must() -> None:
    chat = route(sticky="user")
    before = sticky_picks(chat, {"big": 90, "small": 10})
    after = sticky_picks(chat, {"big": 80, "small": 20})
    moved = Counter((before[k], after[k]) for k in KEYS if before[k] != after[k])
    assert ("small", "big") not in moved
    assert within(moved[("big", "small")], len(KEYS), 0.1)


def test_removing_a_target_moves_only_its_keys() -> None:
    chat = route(sticky="key")
    before = sticky_picks(chat, {"a": 50, "b": 30, "c": 20})
    after = sticky_picks(chat, {"a": 50, "b": 30})
    assert all(after[k] == before[k] for k in KEYS if before[k] != "c")
    on_c = [k for k in KEYS if before[k] == "c"]
    assert within(len(on_c), len(KEYS), 0.2)
    assert within(sum(after[k] == "a" for k in on_c), len(on_c), 50 / 80)


def test_attempts_header_lists_each_try_in_order() -> None:
    attempts = [("smollm2-135m-instruct", "overloaded"), ("remote-gpt-4o-mini", "ok")]
    assert attempts_header(attempts) == "smollm2-135m-instruct:overloaded,remote-gpt-4o-mini:ok"
    assert attempts_header([("big", "ok")]) == "big:ok"


def test_fallback_order_prefers_loaded_assets_and_keeps_route_order_otherwise() -> None:
    chat = route(fallback=["asleep-1", "loaded-1", "asleep-2", "loaded-2"])
    assert fallback_order(chat, {"loaded-1", "loaded-2"}) == [
        "loaded-1", "loaded-2", "asleep-1", "asleep-2"]
    assert fallback_order(chat, set()) == ["asleep-1", "loaded-1", "asleep-2", "loaded-2"]
    assert fallback_order(route(), {"big"}) == []
