"""The embedded Postgres and NATS servers: they serve, keep their data, and leave no process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import asyncpg
import nats
from nats.js.api import StreamConfig

from services.common.embedded import EmbeddedNats, EmbeddedPostgres, wait_pid_gone

REPO_ROOT = Path(__file__).resolve().parents[1]


async def _fetch(dsn: str, query: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(query)
    finally:
        await conn.close()


async def _execute(dsn: str, script: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(script)
    finally:
        await conn.close()


async def test_postgres_serves_on_loopback_and_keeps_data_across_restart(server_dir: Path) -> None:
    postgres = EmbeddedPostgres(server_dir / "pg")
    with postgres:
        dsn = postgres.dsn
        assert dsn.startswith("postgresql://roundhouse@127.0.0.1:")
        assert dsn.endswith("/roundhouse")
        [settings] = await _fetch(
            dsn,
            "SELECT current_user, current_setting('listen_addresses') AS listen,"
            " current_setting('unix_socket_directories') AS sockets,"
            " current_setting('server_encoding') AS encoding",
        )
        assert dict(settings) == {
            "current_user": "roundhouse",
            "listen": "127.0.0.1",
            "sockets": str(postgres.data_dir),
            "encoding": "UTF8",
        }
        await _execute(dsn, "CREATE TABLE kept (v text); INSERT INTO kept VALUES ('still here')")
        first_pid = postgres.pid
        assert first_pid is not None
    assert postgres.pid is None
    assert wait_pid_gone(first_pid, timeout=0)

    assert postgres.start() == dsn
    try:
        assert [r["v"] for r in await _fetch(dsn, "SELECT v FROM kept")] == ["still here"]
    finally:
        postgres.stop()


async def test_postgres_starts_over_the_lock_file_of_a_killed_server(server_dir: Path) -> None:
    with EmbeddedPostgres(server_dir / "pg") as postgres:
        dsn = postgres.dsn
        await _execute(dsn, "CREATE TABLE kept (v int); INSERT INTO kept VALUES (7)")
        killed = postgres.pid
        assert killed is not None
        os.kill(killed, signal.SIGKILL)
        assert wait_pid_gone(killed, timeout=10)
        # Its pid now names a live process of the same user, as after a reboot: Postgres
        # alone would take that for a running server and refuse to start.
        pid_file = postgres.data_dir / "postmaster.pid"
        same_user = postgres.system_user if os.geteuid() == 0 else None
        with subprocess.Popen(["cat"], stdin=subprocess.PIPE, cwd="/", user=same_user) as stand_in:
            lines = pid_file.read_text().splitlines()
            pid_file.write_text("\n".join([str(stand_in.pid), *lines[1:]]) + "\n")
            assert postgres.start() == dsn
        assert [r["v"] for r in await _fetch(dsn, "SELECT v FROM kept")] == [7]


async def test_nats_restarts_on_the_same_port_keeping_streams(
    nats_factory: Callable[[], EmbeddedNats],
) -> None:
    server = nats_factory()
    url = server.url
    assert url.startswith("nats://127.0.0.1:")
    reconnected = asyncio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    nc = await nats.connect(
        url, reconnected_cb=on_reconnect, reconnect_time_wait=0.1, max_reconnect_attempts=-1
    )
    try:
        js = nc.jetstream()
        await js.account_info()
        await js.add_stream(StreamConfig(name="KEPT", subjects=["kept.>"]))
        await js.publish("kept.one", b"1")

        first_pid = server.pid
        assert first_pid is not None
        server.stop()
        assert server.pid is None
        assert wait_pid_gone(first_pid, timeout=0)
        assert server.start() == url

        await asyncio.wait_for(reconnected.wait(), timeout=20)
        await js.publish("kept.two", b"2")
        info = await js.stream_info("KEPT")
        assert info.state.messages == 2
    finally:
        await nc.close()


_SERVERS_THEN_WAIT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from services.common.embedded import EmbeddedNats, EmbeddedPostgres

    root = Path(sys.argv[1])
    postgres, nats_server = EmbeddedPostgres(root / "pg"), EmbeddedNats(root / "nats")
    postgres.start()
    nats_server.start()
    print(postgres.pid, nats_server.pid, flush=True)
    sys.stdin.read()
    """
)


async def test_servers_go_away_when_their_owner_is_killed(server_dir: Path) -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", _SERVERS_THEN_WAIT, str(server_dir)],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert owner.stdout is not None
    line = owner.stdout.readline().decode()
    owner.kill()
    owner.communicate()
    postgres_pid, nats_pid = (int(pid) for pid in line.split())

    # A new owner takes the data dir over at once, while the orphan may still shut down.
    with EmbeddedPostgres(server_dir / "pg"):
        assert wait_pid_gone(postgres_pid, timeout=0)
    assert wait_pid_gone(nats_pid, timeout=30)
