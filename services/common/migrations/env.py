"""Alembic environment for Roundhouse (async, asyncpg).

Configured programmatically by `services.common.db.migrate`, which passes the plain DSN in
`config.attributes["dsn"]`; without it the DSN comes from `ROUNDHOUSE_DATABASE_URL`.
The whole upgrade runs in one transaction under a Postgres advisory lock, so services
migrating at the same start-up take turns instead of racing.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import pool, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from services.common.db.models import Base
from services.common.settings import CommonSettings, async_database_url

config = context.config
target_metadata = Base.metadata

# Arbitrary constant shared by every Roundhouse process: "roundhouse migrate".
MIGRATION_LOCK_ID = 0x526F_756E_6448_6F75


def _url() -> str:
    dsn = config.attributes.get("dsn") or CommonSettings().resolved_database_url()
    return async_database_url(dsn)


def run_migrations_offline() -> None:
    """Emit the migration SQL to the script output instead of running it."""
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    """Run the migrations on one connection, serialised by the advisory lock."""
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})
        context.run_migrations()


async def run_async_migrations() -> None:
    """Connect with asyncpg and run the migrations on that connection."""
    engine = create_async_engine(_url(), poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    """Run the migrations against the database (needs a thread without a running loop)."""
    asyncio.run(run_async_migrations())


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
