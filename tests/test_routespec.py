"""Route spec validation: what an operator sees when a route document is wrong."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from services.common.errors import InvalidSpec
from services.common.routespec import (
    RouteSpec,
    check_route_targets,
    parse_route,
    routes_using,
)

ASSETS: dict[str, tuple[str, Sequence[str]]] = {
    "smollm2-135m-instruct": ("model", ["llm-runtime"]),
    "smollm2-135m-instruct-q8": ("model", ["llm-runtime"]),
    "candidate-model": ("model", ["llm-runtime"]),
    "remote-gpt-4o-mini": ("model", ["llm-runtime"]),
    "remote-gpt-4o": ("model", ["llm-runtime"]),
    "all-minilm-l6-v2": ("model", ["embedding-runtime"]),
    "summaries": ("route", ["llm-runtime"]),
}


ALIASES = {"gpt-4o-mini": "remote-gpt-4o-mini"}


def lookup(name: str) -> tuple[str, str, Sequence[str]] | None:
    asset_id = ALIASES.get(name, name)
    found = ASSETS.get(asset_id)
    return None if found is None else (asset_id, *found)


def document(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "asset_id": "chat",
        "class": "route",
        "interface": "llm-runtime",
        "targets": [{"asset": "smollm2-135m-instruct", "weight": 90},
                    {"asset": "smollm2-135m-instruct-q8", "weight": 10}],
        "sticky": "user",
        "shadow": [{"asset": "candidate-model", "sample": 0.2, "wake": False}],
        "fallback": ["remote-gpt-4o-mini"],
        "fallback_on": ["overloaded", "unavailable", "context_length", "upstream_error"],
        "cache": {"ttl_s": 600},
    }
    doc.update(changes)
    return doc


def parse_problems(doc: object) -> dict[str, str]:
    with pytest.raises(InvalidSpec) as info:
        parse_route(doc)
    return {p.path: p.reason for p in info.value.problems}


def target_problems(doc: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(InvalidSpec) as info:
        check_route_targets(parse_route(doc), lookup)
    return {p.path: p.reason for p in info.value.problems}


def test_contract_example_is_valid_and_round_trips() -> None:
    route = parse_route(document(labels={"team": "chat"}, aliases=["assistant"]))
    check_route_targets(route, lookup)
    assert [(t.asset, t.weight) for t in route.targets] == [
        ("smollm2-135m-instruct", 90), ("smollm2-135m-instruct-q8", 10)]
    assert route.shadow[0].sample == 0.2 and route.cache is not None
    assert route.cache.scope == "key" and not route.cache.nondeterministic
    again = parse_route(route.model_dump(mode="json", by_alias=True))
    assert again == route


def test_defaults_of_a_minimal_route() -> None:
    route = parse_route({"asset_id": "embed", "class": "route", "interface": "embedding-runtime",
                         "targets": [{"asset": "all-minilm-l6-v2"}]})
    check_route_targets(route, lookup)
    assert route.sticky == "none" and route.shadow == [] and route.fallback == []
    assert route.cache is None and route.targets[0].weight == 1
    assert route.fallback_on == ["overloaded", "unavailable", "context_length", "upstream_error"]


@pytest.mark.parametrize(("change", "path"), [
    ({"targets": [{"asset": "smollm2-135m-instruct", "weight": 0},
                  {"asset": "smollm2-135m-instruct-q8", "weight": 0}]}, "targets"),
    ({"targets": []}, "targets"),
    ({"targets": [{"asset": "smollm2-135m-instruct", "weight": 90},
                  {"asset": "smollm2-135m-instruct-q8", "weight": -1}]}, "targets[1].weight"),
    ({"targets": [{"asset": "Not An Id", "weight": 1}]}, "targets[0].asset"),
    ({"shadow": [{"asset": "candidate-model", "sample": 1.5}]}, "shadow[0].sample"),
    ({"shadow": [{"asset": "candidate-model", "sample": -0.1}]}, "shadow[0].sample"),
    ({"fallback_on": ["overloaded", "teapot"]}, "fallback_on[1]"),
    ({"fallback_on": ["timeout", "timeout"]}, "fallback_on"),
    ({"sticky": "session"}, "sticky"),
    ({"interface": "image-runtime"}, "interface"),
    ({"class": "model"}, "class"),
    ({"cache": {"ttl_s": 0}}, "cache.ttl_s"),
    ({"cache": {"ttl_s": 60, "scope": "global"}}, "cache.scope"),
    ({"aliases": ["chat"]}, "aliases"),
    ({"labels": {"bad key!": "x"}}, "labels"),
    ({"weights": [1]}, "weights"),
])
def test_bad_field_is_named(change: dict[str, Any], path: str) -> None:
    assert path in parse_problems(document(**change))


def test_every_problem_is_reported_at_once() -> None:
    problems = parse_problems(document(
        sticky="session", shadow=[{"asset": "candidate-model", "sample": 2}], aliases=["chat"],
        targets=[{"asset": "smollm2-135m-instruct", "weight": "heavy"}]))
    assert set(problems) == {"sticky", "shadow[0].sample", "aliases", "targets[0].weight"}
    problems = parse_problems(document(
        cache={"ttl_s": -1}, aliases=["chat"],
        targets=[{"asset": "smollm2-135m-instruct", "weight": 0}]))
    assert problems == {"cache.ttl_s": "Input should be greater than 0",
                        "aliases": "an alias must differ from the asset id",
                        "targets": "weights must not all be zero"}


def test_not_a_mapping_is_refused() -> None:
    assert parse_problems(["chat"]) == {"": "expected a mapping, got list"}


@pytest.mark.parametrize(("change", "path", "says"), [
    ({"targets": [{"asset": "smollm2-135m-instruct", "weight": 1},
                  {"asset": "no-such-model", "weight": 1}]}, "targets[1].asset", "no asset"),
    ({"targets": [{"asset": "chat", "weight": 1}]}, "targets[0].asset", "the route itself"),
    ({"aliases": ["assistant"], "fallback": ["assistant"]}, "fallback[0]", "the route itself"),
    ({"fallback": ["summaries"]}, "fallback[0]", "routes do not nest"),
    ({"shadow": [{"asset": "all-minilm-l6-v2"}]}, "shadow[0].asset", "does not offer llm-runtime"),
    ({"fallback": ["smollm2-135m-instruct-q8"]}, "fallback[0]", "repeats targets[1].asset"),
    ({"fallback": ["remote-gpt-4o", "remote-gpt-4o"]}, "fallback[1]", "repeats fallback[0]"),
    ({"targets": [{"asset": "smollm2-135m-instruct", "weight": 1},
                  {"asset": "smollm2-135m-instruct", "weight": 2}]},
     "targets[1].asset", "repeats targets[0].asset"),
    ({"shadow": [{"asset": "candidate-model"}, {"asset": "candidate-model"}]},
     "shadow[1].asset", "repeats shadow[0].asset"),
    # Another name of the same asset (an alias) is the same asset.
    ({"fallback": ["remote-gpt-4o-mini", "gpt-4o-mini"]}, "fallback[1]", "repeats fallback[0]"),
    ({"targets": [{"asset": "remote-gpt-4o-mini"}], "fallback": ["gpt-4o-mini"]},
     "fallback[0]", "repeats targets[0].asset"),
])
def test_bad_reference_is_named(change: dict[str, Any], path: str, says: str) -> None:
    problems = target_problems(document(**change))
    assert list(problems) == [path]
    assert says in problems[path]


def test_a_shadow_may_copy_a_target() -> None:
    check_route_targets(parse_route(document(shadow=[{"asset": "smollm2-135m-instruct"}])), lookup)


def test_every_bad_reference_is_reported_at_once() -> None:
    problems = target_problems(document(
        targets=[{"asset": "no-such-model", "weight": 1}, {"asset": "all-minilm-l6-v2", "weight": 1}],
        fallback=["summaries", "chat"]))
    assert set(problems) == {"targets[0].asset", "targets[1].asset", "fallback[0]", "fallback[1]"}


def test_routes_using_names_every_route_that_would_break() -> None:
    chat = parse_route(document())
    embed = parse_route({"asset_id": "embed", "class": "route", "interface": "embedding-runtime",
                         "targets": [{"asset": "all-minilm-l6-v2"}]})
    other = RouteSpec.model_validate(document(asset_id="chat-b", shadow=[], fallback=[]))
    routes = [chat, embed, other]
    assert routes_using(["smollm2-135m-instruct"], routes) == ["chat", "chat-b"]
    assert routes_using(["candidate-model"], routes) == ["chat"]
    assert routes_using(["remote-gpt-4o-mini"], routes) == ["chat"]
    assert routes_using(["remote-gpt-4o", "gpt-4o"], routes) == []
