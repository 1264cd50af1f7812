"""The registry's domain logic: assets (desired state) in Postgres, events via the outbox."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from roundhouse.v1 import events_pb2
from services.common.asset_proto import AssetRecord, check_serves, spec_to_proto
from services.common.assetspec import AssetSpec, parse_spec
from services.common.db.models import Asset, AssetAlias
from services.common.errors import (
    AssetNotFound,
    Conflict,
    FieldProblem,
    InvalidArgument,
    InvalidSpec,
)
from services.common.events import new_event
from services.common.outbox import add_to_outbox
from services.common.request_text import shown
from services.registry.validation import listed

Outcome = Literal["created", "updated", "unchanged"]
CAPABILITY_FILTERS = {"chat", "embeddings", "streaming", "system_role", "tools"}
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000


@dataclass(frozen=True)
class ApplyItem:
    """One spec to apply, with the revision the caller expects (None: no check, 0: new)."""

    spec: AssetSpec
    expected_revision: int | None = None


@dataclass(frozen=True)
class AssetFilter:
    """Filters of a list call; empty values match everything."""

    interface: str = ""
    runtime: str = ""
    state: str = ""
    capability: str = ""
    labels: dict[str, str] = field(default_factory=dict)


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
    ) -> list[tuple[AssetRecord, Outcome]]:
        """Create or update every item in one transaction; all or nothing."""
        if not items:
            raise InvalidArgument("assets: at least one asset is required")
        self._check_unique_ids(items)
        async with self._sessions() as session, session.begin():
            ids = [item.spec.asset_id for item in items]
            rows = {
                row.asset_id: row
                for row in await session.scalars(
                    select(Asset).where(Asset.asset_id.in_(ids)).with_for_update()
                )
            }
            await self._check_aliases(session, items)
            now = datetime.now(UTC)
            results: list[tuple[AssetRecord, Outcome]] = []
            for n, item in enumerate(items):
                row = rows.get(item.spec.asset_id)
                _check_revision(f"assets[{n}]", item, row)
                row, outcome = _write(session, item.spec, row, now)
                if outcome != "unchanged":
                    await self._replace_aliases(session, item.spec)
                    detail = events_pb2.AssetEventDetail(
                        revision=row.revision, change=outcome, spec=spec_to_proto(item.spec)
                    )
                    add_to_outbox(session, new_event(
                        "asset.applied", self._source, asset_id=row.asset_id, asset=detail
                    ))
                results.append((_record(row), outcome))
            if dry_run:
                await session.rollback()
                return results
        self._on_commit()
        return results

    async def get(self, asset_id: str) -> AssetRecord:
        """The asset with that id; `AssetNotFound` otherwise."""
        async with self._sessions() as session:
            row = await session.get(Asset, asset_id)
            if row is None:
                raise AssetNotFound(f"asset '{asset_id}' not found")
            return _record(row)

    async def list_assets(
        self, filters: AssetFilter, *, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[AssetRecord], str]:
        """One page of assets ordered by id, and the token of the next page ('' at the end)."""
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        query = select(Asset).order_by(Asset.asset_id).limit(size + 1)
        if page_token:
            query = query.where(Asset.asset_id > _decode_token(page_token))
        if filters.interface:
            query = query.where(Asset.interfaces.contains([filters.interface]))
        if filters.runtime:
            query = query.where(Asset.runtime == filters.runtime)
        if filters.state:
            query = query.where(Asset.state == filters.state)
        if filters.labels:
            query = query.where(Asset.labels.contains(filters.labels))
        if filters.capability:
            query = query.where(_capability_clause(filters.capability))
        async with self._sessions() as session:
            rows = list(await session.scalars(query))
        next_token = _encode_token(rows[size - 1].asset_id) if len(rows) > size else ""
        return [_record(r) for r in rows[:size]], next_token

    async def delete(self, asset_id: str, expected_revision: int | None = None) -> AssetRecord:
        """Remove an asset and its aliases; publishes `asset.deleted`."""
        async with self._sessions() as session, session.begin():
            row = await session.get(Asset, asset_id, with_for_update=True)
            if row is None:
                raise AssetNotFound(f"asset '{asset_id}' not found")
            if expected_revision is not None and expected_revision != row.revision:
                raise Conflict(
                    f"asset '{asset_id}' is at revision {row.revision}, not {expected_revision}"
                )
            record = _record(row)
            await session.delete(row)
            detail = events_pb2.AssetEventDetail(
                revision=row.revision, spec=spec_to_proto(record.spec)
            )
            add_to_outbox(session, new_event(
                "asset.deleted", self._source, asset_id=asset_id, asset=detail
            ))
        self._on_commit()
        return record

    async def resolve(self, name: str, interface: str = "") -> AssetRecord:
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
            if row is None:
                raise AssetNotFound(f"asset '{asset_id}' not found")
            if state:
                row.state = state
            now = datetime.now(UTC)
            row.status = {**row.status, **status, "updated_at": now.isoformat()}
            row.updated_at = now  # set here so the row stays readable after the commit
            if capabilities is not None:
                row.capabilities = capabilities
        return _record(row)

    @staticmethod
    def _check_unique_ids(items: list[ApplyItem]) -> None:
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

    @staticmethod
    async def _check_aliases(session: AsyncSession, items: list[ApplyItem]) -> None:
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

    @staticmethod
    async def _replace_aliases(session: AsyncSession, spec: AssetSpec) -> None:
        await session.execute(delete(AssetAlias).where(AssetAlias.asset_id == spec.asset_id))
        await session.flush()
        session.add_all(AssetAlias(alias=a, asset_id=spec.asset_id) for a in spec.aliases)
        await session.flush()


def _check_revision(where: str, item: ApplyItem, row: Asset | None) -> None:
    if item.expected_revision is None:
        return
    current = row.revision if row else 0
    if current != item.expected_revision:
        state = f"is at revision {current}" if row else "does not exist"
        raise Conflict(
            f"{where}: asset '{item.spec.asset_id}' {state}, not revision "
            f"{item.expected_revision}; read it again and retry"
        )


def _write(
    session: AsyncSession, spec: AssetSpec, row: Asset | None, now: datetime
) -> tuple[Asset, Outcome]:
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


def _record(row: Asset) -> AssetRecord:
    # Stored specs were validated when applied; re-check shape only, not source roots.
    spec = parse_spec(row.spec, source_roots=["/"], upstreams=None)
    return AssetRecord(
        spec=spec,
        revision=row.revision,
        created_at=row.created_at,
        updated_at=row.updated_at,
        state=row.state,
        status=dict(row.status or {}),
        capabilities=row.capabilities,
    )


def _capability_clause(capability: str) -> Any:
    if capability not in CAPABILITY_FILTERS:
        raise InvalidArgument(
            f"capability: unknown {shown(capability)}; one of {', '.join(sorted(CAPABILITY_FILTERS))}"
        )
    if capability == "chat":
        return Asset.interfaces.contains(["llm-runtime"])
    if capability == "embeddings":
        return Asset.interfaces.contains(["embedding-runtime"])
    name = {"system_role": "supports_system_role", "tools": "supports_tools"}.get(
        capability, capability
    )
    return Asset.capabilities[name].as_boolean().is_(True)


_TOKEN_PREFIX = "after:"


def _encode_token(asset_id: str) -> str:
    return base64.urlsafe_b64encode(f"{_TOKEN_PREFIX}{asset_id}".encode()).decode()


def _decode_token(token: str) -> str:
    try:
        text = base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    # A NUL would reach the query (Postgres refuses it); no token this server issues has one.
    if not text.startswith(_TOKEN_PREFIX) or "\x00" in text:
        raise InvalidArgument("page_token: not a token this server issued")
    return text.removeprefix(_TOKEN_PREFIX)
