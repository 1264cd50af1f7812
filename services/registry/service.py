"""The registry's domain logic: assets (desired state) in Postgres, events via the outbox.

What an apply checks and writes is in `changes`, how a list call pages in `listing`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.common.asset_proto import AssetRecord
from services.common.assetspec import AssetSpec
from services.common.db.models import Asset, AssetAlias
from services.common.db.unavailable import lost_a_race
from services.common.errors import AssetNotFound, Conflict, InvalidArgument
from services.common.outbox import add_to_outbox
from services.common.route_proto import RouteRecord, Stored, check_serves
from services.common.routespec import RouteSpec, parse_document
from services.registry import changes
from services.registry.changes import ApplyItem, Outcome
from services.registry.listing import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, AssetFilter, next_page_token, page_query

log = logging.getLogger(__name__)
T = TypeVar("T")


class AssetRegistry:
    """Applies, reads, lists, deletes and resolves assets. No protobuf here."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        on_commit: Callable[[], None] = lambda: None,
        source: str = "registry",
    ) -> None:
        self._sessions = sessions
        self._on_commit = on_commit
        self._source = source

    async def apply(
        self, items: list[ApplyItem], *, dry_run: bool = False
    ) -> list[tuple[Stored, Outcome]]:
        """Create or update every item in one transaction; all or nothing (see `_apply`). A
        transaction that lost a race with another apply or delete (a deadlock over the rows
        a route names) is run again."""
        return await _again_after_a_race(lambda: self._apply(items, dry_run=dry_run))

    async def _apply(
        self, items: list[ApplyItem], *, dry_run: bool = False
    ) -> list[tuple[Stored, Outcome]]:
        """One run of `apply`. A route's targets must exist (stored or in the same apply) and
        offer its interface; a model cannot become a route nor a route a model; an apply that
        would break a stored route (dropping an alias it names an asset by, or giving it to an
        asset without the route's interface, changing a used model's interface) is a
        `Conflict`."""
        if not items:
            raise InvalidArgument("assets: at least one asset is required")
        changes.check_unique_ids(items)
        async with self._sessions() as session, session.begin():
            ids = [item.spec.asset_id for item in items]
            rows = {
                row.asset_id: row
                for row in await session.scalars(
                    select(Asset).where(Asset.asset_id.in_(ids)).with_for_update()
                )
            }
            await changes.check_aliases(session, items)
            await changes.check_routes(session, items)
            now = datetime.now(UTC)
            results: list[tuple[Stored, Outcome]] = []
            for n, item in enumerate(items):
                row = rows.get(item.spec.asset_id)
                changes.check_class(f"assets[{n}]", item, row)
                changes.check_revision(f"assets[{n}]", item, row)
                row, outcome = changes.write(session, item.spec, row, now)
                if outcome != "unchanged":
                    await changes.replace_aliases(session, item.spec)
                    add_to_outbox(session, changes.applied_event(self._source, row, outcome, item.spec))
                results.append((_record(row), outcome))
            if dry_run:
                await session.rollback()
                return results
        self._on_commit()
        return results

    async def get(self, asset_id: str) -> Stored:
        """The asset with that id; `AssetNotFound` otherwise."""
        async with self._sessions() as session:
            row = await session.get(Asset, asset_id)
            if row is None:
                raise AssetNotFound(f"asset '{asset_id}' not found")
            return _record(row)

    async def list_assets(
        self, filters: AssetFilter, *, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[Stored], str]:
        """One page of assets ordered by id, and the token of the next page ('' at the end)."""
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        query = page_query(filters, size, page_token)
        async with self._sessions() as session:
            rows = list(await session.scalars(query))
        return [_record(r) for r in rows[:size]], next_page_token(rows, size)

    async def delete(self, asset_id: str, expected_revision: int | None = None) -> Stored:
        """Remove an asset and its aliases; publishes `asset.deleted`. `Conflict` naming the
        routes that use it, if any. Run again after losing a race, as `apply`."""
        return await _again_after_a_race(lambda: self._delete(asset_id, expected_revision))

    async def _delete(self, asset_id: str, expected_revision: int | None) -> Stored:
        async with self._sessions() as session, session.begin():
            row = await session.get(Asset, asset_id, with_for_update=True)
            if row is None:
                raise AssetNotFound(f"asset '{asset_id}' not found")
            if expected_revision is not None and expected_revision != row.revision:
                raise Conflict(
                    f"asset '{asset_id}' is at revision {row.revision}, not {expected_revision}"
                )
            record = _record(row)
            await changes.check_not_routed(session, asset_id, list(record.spec.aliases))
            await session.delete(row)
            add_to_outbox(session, changes.deleted_event(self._source, asset_id, row.revision, record.spec))
        self._on_commit()
        return record

    async def resolve(self, name: str, interface: str = "") -> Stored:
        """An asset id or alias, checked against the interface a request needs."""
        async with self._sessions() as session:
            row = await session.get(Asset, name)
            if row is None:
                alias = await session.get(AssetAlias, name)
                row = await session.get(Asset, alias.asset_id) if alias else None
        if row is None:
            raise AssetNotFound(f"model '{name}' not found")
        record = _record(row)
        check_serves(record, name, interface)
        return record

    async def report_status(
        self,
        asset_id: str,
        *,
        state: str,
        status: dict[str, Any],
        capabilities: dict[str, Any] | None = None,
    ) -> AssetRecord:
        """Record observed state (and detected capabilities) without touching the spec."""
        async with self._sessions() as session, session.begin():
            row = await session.get(Asset, asset_id, with_for_update=True)
            if row is None or row.asset_class != "model":
                raise AssetNotFound(f"model '{asset_id}' not found")
            if state:
                row.state = state
            now = datetime.now(UTC)
            row.status = {**row.status, **status, "updated_at": now.isoformat()}
            row.updated_at = now  # set here so the row stays readable after the commit
            if capabilities is not None:
                row.capabilities = capabilities
        record = _record(row)
        assert isinstance(record, AssetRecord)
        return record


RACE_TRIES = 3
"""Runs of one apply or delete that lost a race before the last loss is the answer."""


async def _again_after_a_race(run: Callable[[], Awaitable[T]]) -> T:
    for attempt in range(1, RACE_TRIES + 1):
        try:
            return await run()
        except DBAPIError as exc:
            if attempt == RACE_TRIES or not lost_a_race(exc):
                raise
            log.info("a registry transaction lost a race (%s); running it again", type(exc.orig).__name__)
    raise AssertionError("unreachable")


def _record(row: Asset) -> Stored:
    # Stored specs were validated when applied; re-check shape only, not source roots.
    spec = parse_document(row.spec, source_roots=["/"], upstreams=None)
    if isinstance(spec, RouteSpec):
        return RouteRecord(spec=spec, revision=row.revision, created_at=row.created_at,
                           updated_at=row.updated_at)
    assert isinstance(spec, AssetSpec)
    return AssetRecord(
        spec=spec,
        revision=row.revision,
        created_at=row.created_at,
        updated_at=row.updated_at,
        state=row.state,
        status=dict(row.status or {}),
        capabilities=row.capabilities,
    )
