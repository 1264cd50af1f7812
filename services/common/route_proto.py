"""Route conversions: `RouteSpec` and stored routes ⇄ `roundhouse.v1` messages, and the
functions that take either kind of asset (a model or a route) and pick the right shape.

A route travels as an `AssetSpec` message whose `asset_class` is `route` and whose `route`
field holds the split; `asset_proto` keeps the model shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from roundhouse.v1 import asset_pb2
from services.common import asset_proto
from services.common.asset_proto import (
    INTERFACE_NAMES,
    INTERFACES,
    AssetRecord,
    record_from_proto,
    record_to_proto,
    spec_document_from_proto,
    spec_to_proto,
    timestamp,
)
from services.common.assetspec import AssetSpec
from services.common.errors import WrongInterface
from services.common.routespec import RouteSpec, parse_document

Declared = AssetSpec | RouteSpec
"""What an operator declares: a model or a route."""


@dataclass
class RouteRecord:
    """A stored route: the spec and its revision (a route has no observed state of its own)."""

    spec: RouteSpec
    revision: int
    created_at: datetime
    updated_at: datetime
    status: dict[str, Any] = field(default_factory=dict)


Stored = AssetRecord | RouteRecord
"""A stored asset of either class."""


def check_serves(record: Stored, name: str, interface: str) -> None:
    """Raise unless the model or route can take requests for `interface` ('' accepts any)."""
    if isinstance(record, AssetRecord):
        asset_proto.check_serves(record, name, interface)
    elif interface and interface != record.spec.interface:
        raise WrongInterface(f"model '{name}' implements {record.spec.interface}, not {interface}")


def route_to_proto(spec: RouteSpec) -> asset_pb2.AssetSpec:
    """Domain route → `AssetSpec` message (defaults filled in)."""
    cache = spec.cache
    return asset_pb2.AssetSpec(
        asset_id=spec.asset_id,
        display_name=spec.display_name,
        asset_class="route",
        interfaces=[INTERFACES[spec.interface]],
        aliases=spec.aliases,
        labels=spec.labels,
        route=asset_pb2.Route(
            targets=[asset_pb2.RouteTarget(asset=t.asset, weight=t.weight) for t in spec.targets],
            sticky=spec.sticky,
            shadow=[asset_pb2.RouteShadow(asset=s.asset, sample=s.sample, wake=s.wake)
                    for s in spec.shadow],
            fallback=spec.fallback,
            fallback_on=spec.fallback_on,
            cache=None if cache is None else asset_pb2.RouteCache(
                ttl_s=cache.ttl_s, max_bytes=cache.max_bytes, scope=cache.scope,
                nondeterministic=cache.nondeterministic),
        ),
    )


def route_document_from_proto(msg: asset_pb2.AssetSpec) -> dict[str, Any]:
    """A route's `AssetSpec` message → a YAML-shaped document, for validation by
    `parse_route`. Unset optional numbers are left out so defaults apply; a count of
    interfaces other than one is passed on as a list, which validation refuses by name."""
    names = [INTERFACE_NAMES.get(i, f"unspecified({i})") for i in msg.interfaces]
    route = msg.route
    doc: dict[str, Any] = {
        "asset_id": msg.asset_id,
        "display_name": msg.display_name,
        "class": "route",
        "interface": names[0] if len(names) == 1 else names,
        "targets": [{"asset": t.asset, **({"weight": t.weight} if t.HasField("weight") else {})}
                    for t in route.targets],
        "sticky": route.sticky or "none",
        "shadow": [{"asset": s.asset, "wake": s.wake,
                    **({"sample": s.sample} if s.HasField("sample") else {})}
                   for s in route.shadow],
        "fallback": list(route.fallback),
        "aliases": list(msg.aliases),
        "labels": dict(msg.labels),
    }
    if route.fallback_on:
        doc["fallback_on"] = list(route.fallback_on)
    if route.HasField("cache"):
        cache = route.cache
        doc["cache"] = {"ttl_s": cache.ttl_s, "scope": cache.scope or "key",
                        "nondeterministic": cache.nondeterministic,
                        **({"max_bytes": cache.max_bytes} if cache.HasField("max_bytes") else {})}
    return doc


def declared_to_proto(spec: Declared) -> asset_pb2.AssetSpec:
    """A model's or a route's `AssetSpec` message."""
    return route_to_proto(spec) if isinstance(spec, RouteSpec) else spec_to_proto(spec)


def declared_from_proto(msg: asset_pb2.AssetSpec, **model_options: Any) -> Declared:
    """An `AssetSpec` message → validated model or route (raises `InvalidSpec`); a model is
    checked with `model_options` (see `parse_spec`)."""
    if msg.asset_class == "route":
        return parse_document(route_document_from_proto(msg))
    return parse_document(spec_document_from_proto(msg), **model_options)


def stored_to_proto(record: Stored) -> asset_pb2.Asset:
    """A stored model or route → `Asset` message."""
    if isinstance(record, AssetRecord):
        return record_to_proto(record)
    return asset_pb2.Asset(
        spec=route_to_proto(record.spec), revision=record.revision,
        created_at=timestamp(record.created_at), updated_at=timestamp(record.updated_at))


def stored_from_proto(msg: asset_pb2.Asset) -> Stored:
    """An `Asset` message → domain record of its class (for clients: the router, the CLI)."""
    if msg.spec.asset_class != "route":
        return record_from_proto(msg)
    spec = parse_document(route_document_from_proto(msg.spec))
    assert isinstance(spec, RouteSpec)
    return RouteRecord(spec=spec, revision=msg.revision, created_at=msg.created_at.ToDatetime(),
                       updated_at=msg.updated_at.ToDatetime())
