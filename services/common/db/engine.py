"""Async engine and session factory built from the plain Postgres DSN every tool takes."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from services.common.settings import async_database_url


def make_engine(dsn: str, **kwargs: Any) -> AsyncEngine:
    """Create an asyncpg-backed engine from a plain DSN (`postgresql://user@host/db`).

    Pooled connections are pinged before use, so a Postgres restart costs one failed
    checkout rather than a stream of errors. Extra keyword arguments go to
    `create_async_engine`. Dispose of it with `await engine.dispose()` at shutdown.
    """
    kwargs.setdefault("pool_pre_ping", True)
    return create_async_engine(async_database_url(dsn), **kwargs)


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Session factory for `engine`; objects stay readable after commit."""
    return async_sessionmaker(engine, expire_on_commit=False)
