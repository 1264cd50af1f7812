"""Schema migrations: `roundhouse db upgrade` and friends, over alembic's command API.

Alembic is configured in code (no `alembic.ini`): the script directory is the
`services.common.migrations` package and the DSN travels in `Config.attributes`.

Every function here is synchronous and blocking. Alembic's async `env.py` drives its own
event loop with `asyncio.run`, which cannot run on a thread that already runs a loop, so
when called from such a thread the work moves to a helper thread and the call blocks
until it is done (blocking that loop meanwhile). From async code prefer
`await asyncio.to_thread(upgrade, dsn)`, which keeps the loop responsive.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from services.common.settings import async_database_url

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
"""The alembic script directory (holds `env.py` and `versions/`)."""

T = TypeVar("T")


def make_config(dsn: str | None = None) -> Config:
    """An alembic `Config` for Roundhouse's migration history, bound to `dsn` if given."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if dsn is not None:
        config.attributes["dsn"] = dsn
    return config


def upgrade(dsn: str, revision: str = "head") -> None:
    """Migrate the database at `dsn` (plain DSN) up to `revision` (default: latest)."""
    _off_loop(lambda: command.upgrade(make_config(dsn), revision))


def downgrade(dsn: str, revision: str) -> None:
    """Migrate the database at `dsn` down to `revision` (`base` drops every table)."""
    _off_loop(lambda: command.downgrade(make_config(dsn), revision))


def current(dsn: str) -> str | None:
    """The revision the database at `dsn` is at, or None when it was never migrated."""
    return _off_loop(lambda: asyncio.run(_current(dsn)))


def head() -> str | None:
    """The latest revision of the migration history."""
    return ScriptDirectory.from_config(make_config()).get_current_head()


async def _current(dsn: str) -> str | None:
    engine = create_async_engine(async_database_url(dsn), poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(_read_revision)
    finally:
        await engine.dispose()


def _read_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def _off_loop(fn: Callable[[], T]) -> T:
    """Run `fn` here, or on a helper thread if this thread is running an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn()

    result: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # re-raised on the calling thread
            errors.append(exc)

    thread = threading.Thread(target=target, name="roundhouse-migrate")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]
