"""Telling a database that does not answer now (down, restarting, connection lost) from a
statement that is wrong: the first is worth a retry, the second is a bug."""

from __future__ import annotations

import asyncpg
import sqlalchemy.exc

from services.common.errors import DatabaseUnavailable

_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,  # SQLSTATE class 08
    asyncpg.CannotConnectNowError,  # starting up or shutting down
    asyncpg.AdminShutdownError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.exceptions.ConnectionFailureError,
    sqlalchemy.exc.TimeoutError,  # no pooled connection came free in time
)
_TRANSPORT_ERRORS = (ConnectionError, TimeoutError)
"""Refused, reset, timed out: the database's only when a database library raised them."""
_DATABASE_MODULES = ("asyncpg.", "sqlalchemy.")
_DATABASE_ERRORS = (sqlalchemy.exc.SQLAlchemyError, asyncpg.PostgresError, asyncpg.InterfaceError)


def database_unavailable(exc: BaseException) -> bool:
    """Whether `exc`, or what it wraps, says the database cannot be reached now."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    if any(isinstance(e, _CONNECTION_ERRORS) for e in chain):
        return True
    if any(isinstance(e, sqlalchemy.exc.DBAPIError) and e.connection_invalidated for e in chain):
        return True
    if not any(isinstance(e, _TRANSPORT_ERRORS) for e in chain):
        return False
    return any(isinstance(e, _DATABASE_ERRORS) or _raised_in_database_library(e) for e in chain)


def lost_a_race(exc: BaseException) -> bool:
    """Whether `exc`, or what it wraps, is Postgres ending a transaction that lost a race with
    another (a deadlock, a serialization failure): run again, it will pass."""
    current: BaseException | None = exc
    for _ in range(8):  # the chain of a wrapped driver error is short
        if current is None:
            return False
        if isinstance(current, asyncpg.DeadlockDetectedError | asyncpg.SerializationError):
            return True
        current = current.__cause__ or current.__context__
    return False


def _raised_in_database_library(exc: BaseException) -> bool:
    """Whether `exc` went through asyncpg or SQLAlchemy (a refused connect is a bare OSError)."""
    tb = exc.__traceback__
    while tb is not None:
        if str(tb.tb_frame.f_globals.get("__name__", "")).startswith(_DATABASE_MODULES):
            return True
        tb = tb.tb_next
    return False


def as_domain_error(exc: BaseException) -> BaseException:
    """`DatabaseUnavailable` for a database that does not answer now; `exc` otherwise."""
    if database_unavailable(exc):
        return DatabaseUnavailable("the database does not answer now; retry later")
    return exc
