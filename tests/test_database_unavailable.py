"""A database that does not answer is a retryable 503 / UNAVAILABLE, never a 500; a wrong
statement stays an internal error."""

from __future__ import annotations

import pytest
import sqlalchemy
from sqlalchemy.ext.asyncio import create_async_engine

from services.common.db.unavailable import as_domain_error, database_unavailable
from services.common.embedded import free_port
from services.common.errors import DatabaseUnavailable
from services.common.settings import async_database_url
from services.router.http.errors import describe


async def failure_of(url: str, statement: str) -> Exception:
    """What running `statement` on the database at `url` raises (the test fails if it succeeds)."""
    engine = create_async_engine(url)
    try:
        with pytest.raises(Exception) as caught:
            async with engine.connect() as conn:
                await conn.execute(sqlalchemy.text(statement))
    finally:
        await engine.dispose()
    return caught.value


async def test_a_database_that_refuses_connections_is_unavailable() -> None:
    failure = await failure_of(f"postgresql+asyncpg://nobody@127.0.0.1:{free_port()}/none", "SELECT 1")
    assert database_unavailable(failure)
    assert isinstance(as_domain_error(failure), DatabaseUnavailable)
    status, info, headers = describe(failure)
    assert (status, info.code, info.type) == (503, "database_unavailable", "service_unavailable_error")
    assert int(headers["Retry-After"]) >= 1


async def test_a_wrong_statement_is_not_mistaken_for_an_outage(db_dsn: str) -> None:
    failure = await failure_of(async_database_url(db_dsn), "SELECT * FROM no_such_table")
    assert not database_unavailable(failure)
    assert describe(failure)[0] == 500


def test_errors_outside_the_database_keep_their_meaning() -> None:
    assert not database_unavailable(FileNotFoundError("weights.safetensors"))
    assert not database_unavailable(ConnectionRefusedError("an upstream"))
