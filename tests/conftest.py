"""Shared fixtures: real Postgres and NATS servers for the test session.

`ROUNDHOUSE_DATABASE_URL` / `ROUNDHOUSE_NATS_URL` point the tests at existing servers;
without them the tests start their own embedded servers on free loopback ports.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import openai
import pytest
from stack_harness import Stack, running_stack, tiny_documents

from services.common.embedded import EmbeddedNats, EmbeddedPostgres


def _run_sync(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine from sync code on a private loop, leaving the current loop alone."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


async def _execute(dsn: str, statement: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def _with_database(dsn: str, database: str) -> str:
    """`dsn` pointing at another database on the same server."""
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{database}"))


@pytest.fixture(scope="session")
def server_root() -> Iterator[Path]:
    """A session dir for embedded server data, outside pytest's private tmp root.

    As root, Postgres runs as an unprivileged user that must traverse to its data dir, and
    pytest resets its own tmp root to mode 0700 whenever a pytest session starts.
    """
    root = Path(tempfile.mkdtemp(prefix="roundhouse-test-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def server_dir(server_root: Path) -> Path:
    """A fresh, empty dir under `server_root` for one test's embedded server."""
    return Path(tempfile.mkdtemp(dir=server_root))


@pytest.fixture(scope="session")
def pg_dsn(server_root: Path) -> Iterator[str]:
    """Plain DSN of a Postgres database of our own for the session.

    With `ROUNDHOUSE_DATABASE_URL`: a freshly created, uniquely named database on that
    server, dropped at the end. Without: an embedded server in a temp dir.
    """
    url = os.environ.get("ROUNDHOUSE_DATABASE_URL")
    if not url:
        with EmbeddedPostgres(server_root / "postgres") as postgres:
            yield postgres.dsn
        return
    name = f"roundhouse_test_{uuid.uuid4().hex[:12]}"
    _run_sync(_execute(url, f'CREATE DATABASE "{name}"'))
    try:
        yield _with_database(url, name)
    finally:
        _run_sync(_execute(url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def nats_url(server_root: Path) -> Iterator[str]:
    """URL of a NATS server with JetStream for the session: `ROUNDHOUSE_NATS_URL`, else embedded."""
    url = os.environ.get("ROUNDHOUSE_NATS_URL")
    if url:
        yield url
        return
    with EmbeddedNats(server_root / "nats") as nats_server:
        yield nats_server.url


@pytest.fixture
def nats_factory(tmp_path: Path) -> Iterator[Callable[[], EmbeddedNats]]:
    """Start dedicated NATS servers for one test; it may stop and restart them at will.

    Each call starts a new server in its own store dir and returns it; all are stopped at
    teardown.
    """
    started: list[EmbeddedNats] = []

    def start() -> EmbeddedNats:
        server = EmbeddedNats(tmp_path / f"nats-{len(started)}")
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def db_dsn(pg_dsn: str) -> Iterator[str]:
    """`pg_dsn` migrated to the latest schema (once per session)."""
    from services.common.db.migrate import upgrade

    upgrade(pg_dsn)
    yield pg_dsn


@pytest.fixture
async def sessionmaker(db_dsn: str) -> Any:
    """An async session factory on the migrated test database; its engine is disposed after."""
    from services.common.db.engine import make_engine, make_sessionmaker

    engine = make_engine(db_dsn)
    yield make_sessionmaker(engine)
    await engine.dispose()


CATALOG_DIR = Path(__file__).resolve().parents[1] / "deploy" / "catalog"


@pytest.fixture(scope="session")
def catalog_store(server_root: Path) -> Any:
    """A model store with the two default catalog models installed, once per session.

    Installing SmolLM2 converts its GGUF (about 20 s); every catalog test shares the result.
    """
    from services.common.documents import load_path
    from services.common.modelstore.store import ModelStore

    store = ModelStore(server_root / "catalog-store", [])
    for item in load_path(CATALOG_DIR):
        store.install(item.spec)
    return store


@pytest.fixture(scope="session")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A source root with the tiny chat and embedding models (`stack_harness.build_sources`),
    built once per session; a module may add models of its own beside them."""
    from stack_harness import build_sources

    return build_sources(tmp_path_factory.mktemp("tiny-sources"))


@pytest.fixture(scope="module")
def store(sources: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A model store of the module's own with the tiny chat and embedding models installed."""
    from stack_harness import tiny_documents

    from services.common.assetspec import parse_spec
    from services.common.modelstore.store import ModelStore

    installed = ModelStore(tmp_path_factory.mktemp("store"), [sources])
    for document in tiny_documents(sources):
        installed.install(parse_spec(document, source_roots=[sources]))
    return installed


@pytest.fixture(scope="session")
def tiny_llama(server_root: Path) -> Path:
    """A tiny transformers model folder, built once per session."""
    from jobs_harness import tiny_llama as build_once

    return build_once(server_root)


@pytest.fixture
async def no_leftover_operations(db_dsn: str) -> None:
    """Operations left by earlier tests removed (the jobs tests count what they list)."""
    from jobs_harness import clear_operations

    await clear_operations(db_dsn)


@pytest.fixture
async def registry(db_dsn: str, nats_url: str, tmp_path: Path) -> AsyncIterator[Any]:
    """A registry whose source root is this test's `sources` folder."""
    from registry_harness import running_registry

    (tmp_path / "sources").mkdir()
    async with running_registry(db_dsn, nats_url, [tmp_path / "sources"]) as running:
        yield running


@pytest.fixture
async def events(nats_url: str) -> AsyncIterator[Any]:
    """`job.*` events collected while the test runs."""
    from jobs_harness import job_events

    async with job_events(nats_url) as collected:
        yield collected


@pytest.fixture(scope="module")
def own_db(pg_dsn: str) -> Iterator[str]:
    """A migrated database of this test module's own, dropped after it.

    For tests whose reconciler acts on every asset in the database: other modules' assets
    must not be there.
    """
    from services.common.db.migrate import upgrade

    name = f"roundhouse_own_{uuid.uuid4().hex[:12]}"
    _run_sync(_execute(pg_dsn, f'CREATE DATABASE "{name}"'))
    dsn = _with_database(pg_dsn, name)
    try:
        upgrade(dsn)
        yield dsn
    finally:
        _run_sync(_execute(pg_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def no_assets(own_db: str) -> None:
    """The module's own database emptied of assets and operations: a `running` model an earlier
    test applied would otherwise be loaded by this test's reconciler, and take the room this
    test's own models need."""
    await _execute(own_db, "DELETE FROM operations; DELETE FROM assets")


@pytest.fixture(scope="module")
async def stack(
    db_dsn: str, nats_url: str, sources: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    """A module's in-process stack (see `stack_harness.running_stack`) with the tiny chat and
    embedding models applied; a module that needs another one defines its own `stack`."""
    store = tmp_path_factory.mktemp("store")
    async with running_stack(db_dsn, nats_url, sources, store) as running:
        await running.apply(*tiny_documents(sources))
        yield running


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """A plain HTTP client of the module's `stack`'s router (no key)."""
    async with httpx.AsyncClient(base_url=stack.http_url, timeout=60) as plain:
        yield plain


@pytest.fixture
async def admin(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the module's `stack`'s admin API (`/admin/v1`), with its admin key
    when it checks keys."""
    async with httpx.AsyncClient(base_url=f"{stack.http_url}/admin/v1", timeout=60,
                                 headers=stack.admin_headers) as http:
        yield http


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official openai client against the module's `stack`, without retries."""
    async with openai.AsyncOpenAI(
        base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0, timeout=60
    ) as api:
        yield api
