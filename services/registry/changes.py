"""Writing asset changes: the checks an apply must pass, the row it writes, and the events
that announce an applied or deleted asset (through the outbox, in the same transaction)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from roundhouse.v1 import events_pb2
from services.common.asset_proto import spec_to_proto
from services.common.assetspec import AssetSpec
from services.common.db.models import Asset, AssetAlias
from services.common.errors import Conflict, FieldProblem, InvalidSpec
from services.common.events import new_event
from services.registry.validation import listed

Outcome = Literal["created", "updated", "unchanged"]


@dataclass(frozen=True)
class ApplyItem:
    """One spec to apply, with the revision the caller expects (None: no check, 0: new)."""

    spec: AssetSpec
    expected_revision: int | None = None


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
    session: AsyncSession, spec: AssetSpec, row: Asset | None, now: datetime
) -> tuple[Asset, Outcome]:
    """Create or update the asset's row from `spec`; a new revision only when it changed."""
    document = spec.to_document()
    if row is not None and row.spec == document:
        return row, "unchanged"
    values = {
        "spec": document,
        "interfaces": list(spec.interface),
        "runtime": spec.runtime,
        "desired": spec.desired,
        "labels": dict(spec.labels),
        "updated_at": now,
    }
    if row is None:
        row = Asset(asset_id=spec.asset_id, revision=1, created_at=now, state="registered",
                    status={}, **values)
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


async def replace_aliases(session: AsyncSession, spec: AssetSpec) -> None:
    """Make the asset's stored aliases those of `spec`."""
    await session.execute(delete(AssetAlias).where(AssetAlias.asset_id == spec.asset_id))
    await session.flush()
    session.add_all(AssetAlias(alias=a, asset_id=spec.asset_id) for a in spec.aliases)
    await session.flush()


def applied_event(source: str, row: Asset, outcome: Outcome, spec: AssetSpec) -> events_pb2.Event:
    """The `asset.applied` event of a created or updated asset."""
    detail = events_pb2.AssetEventDetail(revision=row.revision, change=outcome, spec=spec_to_proto(spec))
    return new_event("asset.applied", source, asset_id=row.asset_id, asset=detail)


def deleted_event(source: str, asset_id: str, revision: int, spec: AssetSpec) -> events_pb2.Event:
    """The `asset.deleted` event of an asset removed at `revision`."""
    detail = events_pb2.AssetEventDetail(revision=revision, spec=spec_to_proto(spec))
    return new_event("asset.deleted", source, asset_id=asset_id, asset=detail)
