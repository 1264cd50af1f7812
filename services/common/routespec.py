"""The route spec: an asset of `class: route` that answers with other assets.

A route splits requests over weighted `targets`, copies a sample of them to `shadow`
assets, tries `fallback` assets in order when every target fails before the first byte,
and may cache exact-match responses. `parse_route` checks the document alone;
`check_route_targets` checks what it names against the stored assets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from services.common.assetspec import AssetSpec, Interface, parse_spec, problems_from
from services.common.assetspec_fields import (
    AssetRef,
    Count,
    Name,
    Number,
    SpecModel,
    check_label_keys,
)
from services.common.errors import Conflict, FieldProblem, InvalidSpec

Sticky = Literal["user", "key", "none"]
FallbackReason = Literal["overloaded", "unavailable", "context_length", "upstream_error", "timeout"]
CacheScope = Literal["key", "shared"]

DEFAULT_FALLBACK_ON: tuple[FallbackReason, ...] = (
    "overloaded", "unavailable", "context_length", "upstream_error")
"""The failures that move a request to the fallback chain unless the route says otherwise."""

AssetLookup = Callable[[str], tuple[str, str, Sequence[str]] | None]
"""`lookup(name) -> (asset_id, asset_class, interfaces)` of the asset an id or alias names, or
None for an unknown name."""


class Target(SpecModel):
    """One asset of the split; its weight is relative to the others'."""

    asset: AssetRef
    weight: Annotated[Number, Field(ge=0, le=1_000_000)] = 1.0


class Shadow(SpecModel):
    """An asset that gets a copy of a sample of the requests; nobody sees its answer."""

    asset: AssetRef
    sample: Annotated[Number, Field(ge=0, le=1)] = 1.0
    """The share of requests copied, from 0 (none) to 1 (all)."""
    wake: bool = False
    """Whether a copy may wake the asset; if not, copies to an asleep asset are dropped."""


MAX_CACHE_TTL_S = 24 * 3600
"""The longest a route's cache may keep an answer."""


class Cache(SpecModel):
    """The exact-match response cache."""

    ttl_s: Annotated[Count, Field(le=MAX_CACHE_TTL_S)]
    """Seconds a cached response is served, at most a day."""
    max_bytes: Count | None = None
    """The largest response kept; None for the router's own bound."""
    scope: CacheScope = "key"
    """`key`: each API key sees only its own cached responses; `shared`: every key sees all."""
    nondeterministic: bool = False
    """Whether responses to sampled (temperature > 0) requests are cached too."""


class RouteSpec(SpecModel):
    """A declared route. Build with `parse_route` to get every problem at once."""

    asset_id: AssetRef
    display_name: Name = ""
    asset_class: Literal["route"] = Field(alias="class")
    interface: Interface
    targets: Annotated[list[Target], Field(min_length=1, max_length=64)]
    sticky: Sticky = "none"
    shadow: Annotated[list[Shadow], Field(max_length=16)] = []
    fallback: Annotated[list[AssetRef], Field(max_length=16)] = []
    fallback_on: list[FallbackReason] = list(DEFAULT_FALLBACK_ON)
    cache: Cache | None = None
    aliases: Annotated[list[AssetRef], Field(max_length=64)] = []
    labels: Annotated[dict[Name, Name], Field(max_length=64)] = {}

    @field_validator("aliases", "fallback_on")
    @classmethod
    def _no_repeats(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("entries must not repeat")
        return value

    _labels = field_validator("labels")(check_label_keys)

    @field_validator("targets")
    @classmethod
    def _some_weight(cls, value: list[Target]) -> list[Target]:
        if not any(t.weight > 0 for t in value):
            raise ValueError("weights must not all be zero")
        return value

    @field_validator("aliases")
    @classmethod
    def _aliases(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if info.data.get("asset_id") in value:
            raise ValueError("an alias must differ from the asset id")
        return value

    @property
    def interfaces(self) -> list[str]:
        """The route's one interface, as a list (a model may have several)."""
        return [self.interface]

    def to_document(self) -> dict[str, Any]:
        """The route as a YAML-shaped document (defaults filled in), as stored."""
        return self.model_dump(mode="json", by_alias=True)

    @property
    def names(self) -> frozenset[str]:
        """The route's id and aliases: what a request may call it by."""
        return frozenset([self.asset_id, *self.aliases])

    def uses(self) -> list[tuple[str, str]]:
        """Every asset the route names, with the field path that names it, in order."""
        return ([(f"targets[{i}].asset", t.asset) for i, t in enumerate(self.targets)]
                + [(f"shadow[{i}].asset", s.asset) for i, s in enumerate(self.shadow)]
                + [(f"fallback[{i}]", a) for i, a in enumerate(self.fallback)])


def parse_route(document: Any) -> RouteSpec:
    """Validate one document (a dict) into a `RouteSpec`.

    Raises `InvalidSpec` listing every problem with its field path (`targets[1].weight`).
    """
    if not isinstance(document, dict):
        raise InvalidSpec.from_problems(
            [FieldProblem("", f"expected a mapping, got {type(document).__name__}")])
    try:
        return RouteSpec.model_validate(document)
    except ValidationError as exc:
        raise InvalidSpec.from_problems(problems_from(exc)) from None


def parse_document(document: Any, **model_options: Any) -> AssetSpec | RouteSpec:
    """One asset document: a route when its `class` is `route`, else a model (`parse_spec`
    with `model_options`). Raises `InvalidSpec` with every problem."""
    if isinstance(document, dict) and document.get("class") == "route":
        return parse_route(document)
    return parse_spec(document, **model_options)


def check_route_targets(route: RouteSpec, lookup: AssetLookup) -> None:
    """Check the assets `route` names against the stored ones (`lookup`).

    Each must exist, differ from the route, be no route itself (routes do not nest) and
    offer the route's interface; a target or shadow must not repeat, nor a fallback entry
    repeat a target or an earlier fallback entry, whether by the same name or by another name
    (an alias) of the same asset. Raises `InvalidSpec` with every problem.
    """
    problems: list[FieldProblem] = []
    resolved: list[tuple[str, str]] = []
    for path, asset in route.uses():
        if asset in route.names:
            problems.append(FieldProblem(path, f"{asset!r} is the route itself"))
            continue
        found = lookup(asset)
        if found is None:
            problems.append(FieldProblem(path, f"no asset {asset!r}"))
            continue
        asset_id, asset_class, interfaces = found
        if asset_class == "route":
            problems.append(FieldProblem(path, f"{asset!r} is a route; routes do not nest"))
        elif route.interface not in interfaces:
            problems.append(FieldProblem(
                path, f"{asset!r} does not offer {route.interface} (it offers "
                      f"{', '.join(interfaces) or 'nothing'})"))
        resolved.append((path, asset_id))
    problems += _repeats(resolved)
    if problems:
        raise InvalidSpec.from_problems(problems)


def _repeats(resolved: list[tuple[str, str]]) -> list[FieldProblem]:
    """Problems for the uses (field path, asset id) that name an asset again."""
    first: dict[str, str] = {}
    problems = _repeated([u for u in resolved if u[0].startswith("targets")], first)
    # A fallback entry is tried after the targets: naming one of them again is a mistake.
    problems += _repeated([u for u in resolved if u[0].startswith("fallback")], first)
    # A shadow may copy a target's requests, but copying twice is a mistake.
    problems += _repeated([u for u in resolved if u[0].startswith("shadow")], {})
    return problems


def _repeated(named: list[tuple[str, str]], first: dict[str, str]) -> list[FieldProblem]:
    """Problems for the entries of `named` already in `first` (asset -> path), which learns
    the others."""
    problems = []
    for path, asset in named:
        if asset in first:
            problems.append(FieldProblem(path, f"{asset!r} repeats {first[asset]}"))
        else:
            first[asset] = path
    return problems


def routes_using(names: Iterable[str], routes: Iterable[RouteSpec]) -> list[str]:
    """The ids of the routes that name an asset by any of `names` (its id and aliases) as
    target, shadow or fallback, sorted: deleting that asset would break them."""
    wanted = set(names)
    return sorted({r.asset_id for r in routes if any(a in wanted for _, a in r.uses())})


def check_unrouted(asset_id: str, aliases: Iterable[str], routes: Iterable[RouteSpec]) -> None:
    """`Conflict` naming the routes that use the asset (by id or alias): deleting it would
    break them."""
    users = routes_using([asset_id, *aliases], (r for r in routes if r.asset_id != asset_id))
    if users:
        many = len(users) > 1
        raise Conflict(f"asset '{asset_id}' is used by route{'s' if many else ''} "
                       f"{', '.join(repr(u) for u in users)}; change or delete "
                       f"{'them' if many else 'it'} first")
