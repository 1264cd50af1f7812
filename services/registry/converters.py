"""Registry requests and responses ⇄ domain values."""

from __future__ import annotations

from pathlib import Path

from roundhouse.v1 import registry_pb2
from services.common.asset_proto import (
    INTERFACE_NAMES,
    RUNTIME_NAMES,
    STATE_NAMES,
)
from services.common.errors import FieldProblem, InvalidArgument, InvalidSpec
from services.common.request_text import shown
from services.common.route_proto import declared_from_proto
from services.common.upstreams import DEFAULT_UPSTREAM_RULES, UpstreamRules
from services.registry.changes import ApplyItem, Outcome
from services.registry.listing import AssetFilter
from services.registry.validation import label_filter, listed

OUTCOMES: dict[Outcome, int] = {
    "created": registry_pb2.APPLY_OUTCOME_CREATED,
    "updated": registry_pb2.APPLY_OUTCOME_UPDATED,
    "unchanged": registry_pb2.APPLY_OUTCOME_UNCHANGED,
}


def apply_items(
    request: registry_pb2.ApplyAssetsRequest, source_roots: list[Path],
    upstreams: UpstreamRules = DEFAULT_UPSTREAM_RULES,
) -> list[ApplyItem]:
    """Validate every spec of an apply; one `InvalidSpec` lists the problems of all of them."""
    items, problems = [], []
    for n, entry in enumerate(request.assets):
        try:
            spec = declared_from_proto(entry.spec, source_roots=source_roots, upstreams=upstreams)
        except InvalidSpec as exc:
            problems += [FieldProblem(f"assets[{n}].spec.{p.path}".rstrip("."), p.reason)
                         for p in exc.problems]
            continue
        expected = entry.expected_revision if entry.HasField("expected_revision") else None
        items.append(ApplyItem(spec, expected))
    if problems:
        raise InvalidSpec.from_problems(listed(problems))
    return items


def asset_filter(request: registry_pb2.ListAssetsRequest) -> AssetFilter:
    """List filters; unknown enum numbers match nothing rather than everything."""
    return AssetFilter(
        interface=INTERFACE_NAMES.get(request.interface, "?") if request.interface else "",
        runtime=RUNTIME_NAMES.get(request.runtime, "?") if request.runtime else "",
        state=STATE_NAMES.get(request.state, "?") if request.state else "",
        capability=request.capability,
        labels=label_filter(request.labels),
        asset_class=_asset_class(request.asset_class),
    )


def _asset_class(name: str) -> str:
    if name not in ("", "model", "route"):
        raise InvalidArgument(f"asset_class: {shown(name)} is not a class (`model` or `route`)")
    return name
