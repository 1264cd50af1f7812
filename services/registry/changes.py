"""Writing asset changes: the checks an apply must pass, the row it writes, and the events
that announce an applied or deleted asset (through the outbox, in the same transaction)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from roundhouse.v1 import events_pb2
from services.common.db.models import Asset, AssetAlias
from services.common.errors import Conflict, FieldProblem, InvalidSpec
from services.common.events import new_event
from services.common.route_proto import Declared, declared_to_proto
from services.common.routespec import RouteSpec, check_route_targets, check_unrouted, parse_document
from services.registry.validation import listed

Outcome = Literal["created", "updated", "unchanged"]


@dataclass(frozen=True)
class ApplyItem:
    """One spec to apply, with the revision the caller expects (None: no check, 0: new)."""

    spec: Declared
    expected_revision: int | None = None


def asset_class(spec: Declared) -> str:
    """`route` or `model`."""
    return "route" if isinstance(spec, RouteSpec) else "model"


async def check_routes(session: AsyncSession, items: list[ApplyItem]) -> None:
    """Every asset a route of the apply names must exist (stored, or in the same apply), differ
    from the route, be no route and offer the route's interface (see `check_route_targets`):
    `InvalidSpec` with each problem's field path. A stored route that the apply would break (a
    model it uses dropping or giving away the alias it is named by, or no longer offering its
    interface) is a `Conflict` naming it. The assets named stay locked FOR SHARE until the apply
    commits, so a concurrent delete waits for it and then sees the route."""
    ids = {item.spec.asset_id for item in items}
    held = set(await session.scalars(select(AssetAlias.alias).where(AssetAlias.asset_id.in_(ids))))
    touched = held | {a for item in items for a in (item.spec.asset_id, *item.spec.aliases)}
    affected = [r for r in (parse_document(row.spec) for row in await session.scalars(
        select(Asset).where(Asset.asset_class == "route", Asset.asset_id.not_in(ids))))
        if isinstance(r, RouteSpec) and any(a in touched for _, a in r.uses())]
    routes = [(n, item.spec) for n, item in enumerate(items) if isinstance(item.spec, RouteSpec)]
    if not routes and not affected:
        return
    # What this apply's routes name is locked; what stored routes name is only read: locking
    # it too would take locks in an order no other apply or delete agrees on.
    named = {a for _, r in routes for _, a in r.uses()}
    known = await _named_assets(session, {a for r in affected for _, a in r.uses()} - named, lock=False)
    known.update(await _named_assets(session, named, lock=True))
    for alias in held:  # an applied asset keeps only the aliases it declares
        known.pop(alias, None)
    for item in items:  # what this apply declares wins over what is stored
        declared = item.spec
        offered = (declared.asset_id, asset_class(declared), _columns(declared)["interfaces"])
        known.update(dict.fromkeys((declared.asset_id, *declared.aliases), offered))
    problems = []
    for n, route in routes:
        try:
            check_route_targets(route, known.get)
        except InvalidSpec as exc:
            problems += [FieldProblem(f"assets[{n}].spec.{p.path}", p.reason) for p in exc.problems]
    if problems:
        raise InvalidSpec.from_problems(listed(problems))
    for route in affected:
        try:
            check_route_targets(route, known.get)
        except InvalidSpec as exc:
            why = "; ".join(f"{p.path}: {p.reason}" for p in exc.problems)
            raise Conflict(f"route '{route.asset_id}' uses it and would break ({why}); "
                           "change or delete the route first") from None


async def _named_assets(session: AsyncSession, named: set[str],
                        *, lock: bool) -> dict[str, tuple[str, str, list[str]]]:
    """The class and interfaces of each stored asset in `named` (by id or alias). With `lock`,
    the assets and then their aliases (the order a delete takes them in) stay locked FOR
    SHARE until the transaction ends, so a concurrent delete waits for it and then sees the
    route."""
    if not named:
        return {}
    aliases = {a.alias: a.asset_id for a in await session.scalars(
        select(AssetAlias).where(AssetAlias.alias.in_(named)))}
    rows = select(Asset).where(Asset.asset_id.in_(named | set(aliases.values()))).order_by(Asset.asset_id)
    known: dict[str, tuple[str, str, list[str]]] = {
        row.asset_id: (row.asset_id, row.asset_class, list(row.interfaces))
        for row in await session.scalars(rows.with_for_update(read=True) if lock else rows)}
    if lock and aliases:
        aliases = {a.alias: a.asset_id for a in await session.scalars(
            select(AssetAlias).where(AssetAlias.alias.in_(list(aliases))).with_for_update(read=True))}
    known.update({alias: known[owner] for alias, owner in aliases.items() if owner in known})
    return known


async def check_not_routed(session: AsyncSession, asset_id: str, aliases: list[str]) -> None:
    """`Conflict` naming the routes that use the asset (by id or alias): deleting it would
    break them."""
    stored = [parse_document(row.spec) for row in await session.scalars(
        select(Asset).where(Asset.asset_class == "route"))]
    check_unrouted(asset_id, aliases, [r for r in stored if isinstance(r, RouteSpec)])


def check_unique_ids(items: list[ApplyItem]) -> None:
    """`InvalidSpec` when two items of one apply have the same asset id."""
    seen: dict[str, int] = {}
    problems = []
    for n, item in enumerate(items):
        first = seen.setdefault(item.spec.asset_id, n)
        if first != n:
            problems.append(FieldProblem(
                f"assets[{n}].spec.asset_id",
                f"duplicate id '{item.spec.asset_id}' (also assets[{first}])",
            ))
    if problems:
        raise InvalidSpec.from_problems(listed(problems))


async def check_aliases(session: AsyncSession, items: list[ApplyItem]) -> None:
    """Aliases must be unique across all assets and never equal another asset's id."""
    batch_ids = {item.spec.asset_id for item in items}
    wanted = {a: (n, item.spec.asset_id) for n, item in enumerate(items)
              for a in item.spec.aliases}
    problems = []
    owners = {
        a.alias: a.asset_id
        for a in await session.scalars(
            select(AssetAlias).where(AssetAlias.alias.in_([*wanted, *batch_ids]))
        )
    }
    taken_ids = set(await session.scalars(select(Asset.asset_id).where(
        Asset.asset_id.in_(list(wanted)))))
    claimed: dict[str, str] = {}
    for alias, (n, asset_id) in wanted.items():
        other = claimed.setdefault(alias, asset_id)
        owner = owners.get(alias)
        where = f"assets[{n}].spec.aliases"
        if alias in batch_ids or alias in taken_ids:
            problems.append(FieldProblem(where, f"'{alias}' is the id of an asset"))
        elif other != asset_id:
            problems.append(FieldProblem(where, f"'{alias}' is also claimed by '{other}'"))
        elif owner and owner != asset_id and owner not in batch_ids:
            problems.append(FieldProblem(where, f"'{alias}' already names asset '{owner}'"))
    for n, item in enumerate(items):
        owner = owners.get(item.spec.asset_id)
        if owner and owner != item.spec.asset_id:
            problems.append(FieldProblem(
                f"assets[{n}].spec.asset_id", f"'{owner}' already uses it as an alias"
            ))
    if problems:
        raise InvalidSpec.from_problems(listed(problems))


def check_class(where: str, item: ApplyItem, row: Asset | None) -> None:
    """`Conflict` when the item would turn a stored model into a route or back: the asset's
    loaded copies and the routes using it would no longer make sense."""
    if row is not None and row.asset_class != asset_class(item.spec):
        raise Conflict(f"{where}: asset '{row.asset_id}' is a {row.asset_class}, not a "
                       f"{asset_class(item.spec)}; delete it first to reuse its id")


def check_revision(where: str, item: ApplyItem, row: Asset | None) -> None:
    """`Conflict` when the item expects a revision other than the stored one."""
    if item.expected_revision is None:
        return
    current = row.revision if row else 0
    if current != item.expected_revision:
        state = f"is at revision {current}" if row else "does not exist"
        raise Conflict(
            f"{where}: asset '{item.spec.asset_id}' {state}, not revision "
            f"{item.expected_revision}; read it again and retry"
        )


def write(
    session: AsyncSession, spec: Declared, row: Asset | None, now: datetime
) -> tuple[Asset, Outcome]:
    """Create or update the asset's row from `spec`; a new revision only when it changed.
    A route has no runtime and is never loaded: its row says runtime '' and desired `running`
    (it answers whenever its targets do)."""
    document = spec.to_document()
    if row is not None and row.spec == document:
        return row, "unchanged"
    values = {"spec": document, **_columns(spec), "labels": dict(spec.labels), "updated_at": now}
    if row is None:
        row = Asset(asset_id=spec.asset_id, asset_class=asset_class(spec), revision=1,
                    created_at=now, state="registered", status={}, **values)
        session.add(row)
        return row, "created"
    for key, value in values.items():
        setattr(row, key, value)
    row.revision += 1
    if row.state == "failed":
        # A new revision may well load: it is tried at once, not after the failure's cooldown.
        row.state = "registered"
        row.status = {**row.status, "message": f"revision {row.revision} applied after a failure: "
                      f"{row.status.get('message', '')}", "updated_at": now.isoformat()}
    return row, "updated"


def _columns(spec: Declared) -> dict[str, Any]:
    """The row's `interfaces`, `runtime` and `desired` columns for `spec`."""
    if isinstance(spec, RouteSpec):
        return {"interfaces": spec.interfaces, "runtime": "", "desired": "running"}
    return {"interfaces": list(spec.interface), "runtime": spec.runtime, "desired": spec.desired}


async def replace_aliases(session: AsyncSession, spec: Declared) -> None:
    """Make the asset's stored aliases those of `spec`."""
    await session.execute(delete(AssetAlias).where(AssetAlias.asset_id == spec.asset_id))
    await session.flush()
    session.add_all(AssetAlias(alias=a, asset_id=spec.asset_id) for a in spec.aliases)
    await session.flush()


def applied_event(source: str, row: Asset, outcome: Outcome, spec: Declared) -> events_pb2.Event:
    """The `asset.applied` event of a created or updated asset."""
    detail = events_pb2.AssetEventDetail(revision=row.revision, change=outcome,
                                         spec=declared_to_proto(spec))
    return new_event("asset.applied", source, asset_id=row.asset_id, asset=detail)


def deleted_event(source: str, asset_id: str, revision: int, spec: Declared) -> events_pb2.Event:
    """The `asset.deleted` event of an asset removed at `revision`."""
    detail = events_pb2.AssetEventDetail(revision=revision, spec=declared_to_proto(spec))
    return new_event("asset.deleted", source, asset_id=asset_id, asset=detail)
