"""The alembic history against a real Postgres: up, down, up again, and the schema's rules."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.common.db import Asset, AssetAlias, Base, Operation, make_engine, make_sessionmaker
from services.common.db.migrate import current, downgrade, head, upgrade

TABLES = {"assets", "asset_aliases", "operations", "outbox", "api_keys", "limit_counters",
          "limit_reservations", "usage_records", "evictions", "thrashing_episodes"}


def _with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


def _asyncpg_dsn(dsn: str) -> str:
    return dsn.replace("postgresql+asyncpg://", "postgresql://", 1)


@pytest.fixture
async def scratch_dsn(pg_dsn: str) -> AsyncIterator[str]:
    """A fresh empty database on the test server, dropped afterwards."""
    name = f"rh_migrations_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(_asyncpg_dsn(pg_dsn))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield _with_database(pg_dsn, name)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def scratch_sessions(scratch_dsn: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """Sessions on a migrated scratch database: constraint tests leave no rows behind."""
    await asyncio.to_thread(upgrade, scratch_dsn)
    engine = make_engine(scratch_dsn)
    yield make_sessionmaker(engine)
    await engine.dispose()


async def _tables(dsn: str) -> set[str]:
    engine = make_engine(dsn)
    try:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
    finally:
        await engine.dispose()


async def test_upgrade_downgrade_upgrade_roundtrip(scratch_dsn: str) -> None:
    assert await asyncio.to_thread(current, scratch_dsn) is None

    await asyncio.to_thread(upgrade, scratch_dsn)
    assert await asyncio.to_thread(current, scratch_dsn) == head()
    assert await _tables(scratch_dsn) == TABLES | {"alembic_version"}

    await asyncio.to_thread(downgrade, scratch_dsn, "base")
    assert await asyncio.to_thread(current, scratch_dsn) is None
    assert await _tables(scratch_dsn) <= {"alembic_version"}

    await asyncio.to_thread(upgrade, scratch_dsn)
    assert await _tables(scratch_dsn) == TABLES | {"alembic_version"}


async def test_upgrade_called_on_the_event_loop_thread(scratch_dsn: str) -> None:
    upgrade(scratch_dsn)
    upgrade(scratch_dsn)  # already at head: nothing to do
    assert current(scratch_dsn) == head()


async def test_models_match_the_migrated_schema(db_dsn: str) -> None:
    engine = make_engine(db_dsn)
    try:
        async with engine.connect() as conn:
            diff = await conn.run_sync(
                lambda c: compare_metadata(
                    MigrationContext.configure(c, opts={"compare_type": True}), Base.metadata
                )
            )
    finally:
        await engine.dispose()
    assert diff == []


async def test_deleting_an_asset_removes_its_aliases(
    scratch_sessions: async_sessionmaker[AsyncSession],
) -> None:
    asset_id, alias = f"cascade-{uuid.uuid4().hex[:8]}", f"alias-{uuid.uuid4().hex[:8]}"
    async with scratch_sessions() as session, session.begin():
        session.add(Asset(asset_id=asset_id, spec={}, revision=1, runtime="transformers",
                          desired="on-demand", interfaces=["llm-runtime"]))
        await session.flush()
        session.add(AssetAlias(alias=alias, asset_id=asset_id))
    async with scratch_sessions() as session, session.begin():
        asset = await session.get(Asset, asset_id)
        assert asset is not None and asset.state == "registered" and asset.labels == {}
        await session.delete(asset)
    async with scratch_sessions() as session:
        assert await session.get(AssetAlias, alias) is None


async def test_an_alias_names_one_asset(scratch_sessions: async_sessionmaker[AsyncSession]) -> None:
    ids = [f"alias-owner-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    alias = f"shared-{uuid.uuid4().hex[:8]}"
    async with scratch_sessions() as session, session.begin():
        for asset_id in ids:
            session.add(Asset(asset_id=asset_id, spec={}, revision=1, runtime="openai",
                              desired="running"))
        await session.flush()
        session.add(AssetAlias(alias=alias, asset_id=ids[0]))
    with pytest.raises(IntegrityError):
        async with scratch_sessions() as session, session.begin():
            session.add(AssetAlias(alias=alias, asset_id=ids[1]))


@pytest.mark.parametrize("progress", [-1, 101])
async def test_operation_progress_stays_within_0_to_100(
    scratch_sessions: async_sessionmaker[AsyncSession], progress: int
) -> None:
    with pytest.raises(IntegrityError, match="ck_operations_progress_range"):
        async with scratch_sessions() as session, session.begin():
            session.add(Operation(operation_id=uuid.uuid4(), type="install",
                                  asset_id="x", progress=progress))


async def test_idempotency_keys_are_unique(scratch_sessions: async_sessionmaker[AsyncSession]) -> None:
    key = f"key-{uuid.uuid4().hex}"
    async with scratch_sessions() as session, session.begin():
        session.add(Operation(operation_id=uuid.uuid4(), type="load", asset_id="x",
                              idempotency_key=key))
    with pytest.raises(IntegrityError):
        async with scratch_sessions() as session, session.begin():
            session.add(Operation(operation_id=uuid.uuid4(), type="load", asset_id="x",
                                  idempotency_key=key))
