"""The stack the chaos suite breaks: its own Postgres and nats-server, and `roundhouse up`.

Postgres and NATS are the suite's own so that it may restart them; both are started,
stopped and restarted from one long-lived thread, because their parent-death signal fires
when the thread that started them exits. The four services run under `roundhouse up`, that
is under the real supervisor, which restarts whichever of them dies.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import psutil
import yaml
from polling import wait_until
from stack_harness import REPO, tiny_documents

from services.common.embedded import EmbeddedNats, EmbeddedPostgres, free_port
from services.common.keys.tokens import new_secret

SERVICES = ("registry", "worker", "router", "jobs")
READY_LINE = "Ctrl-C stops everything"
REQUEST_TIMEOUT_S = 4.0
"""The router's request deadline (`ROUNDHOUSE_REQUEST_TIMEOUT_S`)."""
STREAM_IDLE_TIMEOUT_S = 3.0
"""The router's limit on silence between two tokens (`ROUNDHOUSE_STREAM_IDLE_TIMEOUT_S`)."""

T = TypeVar("T")


class ServerThread:
    """The suite's Postgres and nats-server, driven from one thread that lives as long as they do."""

    def __init__(self, root: Path) -> None:
        self.postgres = EmbeddedPostgres(root / "postgres")
        self.nats = EmbeddedNats(root / "nats")
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chaos-servers")

    async def call(self, action: Callable[[], T]) -> T:
        """Run `action` (a blocking start or stop) on the servers' thread."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, action)

    async def start(self) -> tuple[str, str]:
        """Start both servers; their DSN and URL."""
        return await self.call(self.postgres.start), await self.call(self.nats.start)

    async def close(self) -> None:
        """Stop both servers and the thread."""
        await self.call(self.nats.stop)
        await self.call(self.postgres.stop)
        self._thread.shutdown()


@dataclass
class ChaosStack:
    """`roundhouse up` on the suite's servers, and how to reach every part of it."""

    up: asyncio.subprocess.Process
    servers: ServerThread
    env: dict[str, str]
    log: Path
    dsn: str
    nats_url: str
    admin_key: str
    internal_token: str
    addresses: dict[str, str] = field(default_factory=dict)
    """gRPC address of each service, by name."""

    @property
    def http_url(self) -> str:
        """The router's OpenAI-compatible base URL (with `/v1`)."""
        return f"http://127.0.0.1:{self.env['ROUNDHOUSE_HTTP_PORT']}/v1"

    def service_pids(self) -> dict[str, int]:
        """Process id of each service `roundhouse up` runs now, by name."""
        found: dict[str, int] = {}
        for child in psutil.Process(self.up.pid).children():
            try:
                argv, alive = child.cmdline(), child.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                continue  # gone meanwhile
            if alive and argv and argv[-1] in SERVICES:
                found[argv[-1]] = child.pid
        return found

    def log_size(self) -> int:
        """Bytes `roundhouse up` has printed so far."""
        return self.log.stat().st_size

    def trouble_logged(self, since: int, limit: int = 40) -> list[str]:
        """The supervisor's, warning and error lines printed after `since` bytes (the first
        `limit`), to explain a violation."""
        with self.log.open("rb") as log:
            log.seek(since)
            lines = log.read().decode(errors="replace").splitlines()
        trouble = [line for line in lines if line.startswith("[supervisor]")
                   or any(f" {level} " in line for level in ("WARNING", "ERROR", "CRITICAL"))]
        return trouble[:limit]

    def supervisor_lines(self) -> list[str]:
        """The supervisor's own lines in the output of `roundhouse up`."""
        return [line for line in self.log.read_text(errors="replace").splitlines()
                if line.startswith("[supervisor]")]


def chaos_environment(root: Path, sources: Path, dsn: str, nats_url: str) -> dict[str, str]:
    """The environment of `roundhouse up`: free ports, fast heartbeats, the deadlines under test."""
    ports = {name: free_port() for name in (*SERVICES, "http")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROUNDHOUSE_")}
    env.update({
        "ROUNDHOUSE_HOME": str(root / "home"),
        "ROUNDHOUSE_MODEL_STORE": str(root / "store"),
        "ROUNDHOUSE_SOURCE_ROOTS": json.dumps([str(sources)]),
        "ROUNDHOUSE_DATABASE_URL": dsn,
        "ROUNDHOUSE_NATS_URL": nats_url,
        "ROUNDHOUSE_ADMIN_KEY": new_secret(),
        "ROUNDHOUSE_INTERNAL_TOKEN": secrets.token_urlsafe(32),
        "ROUNDHOUSE_REGISTRY_ADDRESS": f"127.0.0.1:{ports['registry']}",
        "ROUNDHOUSE_ROUTER_ADDRESS": f"127.0.0.1:{ports['router']}",
        "ROUNDHOUSE_WORKER_ADDRESS": f"127.0.0.1:{ports['worker']}",
        "ROUNDHOUSE_WORKER_ADDRESSES": json.dumps([f"127.0.0.1:{ports['worker']}"]),
        "ROUNDHOUSE_JOBS_ADDRESS": f"127.0.0.1:{ports['jobs']}",
        "ROUNDHOUSE_HTTP_PORT": str(ports["http"]),
        "ROUNDHOUSE_WORKER_HEARTBEAT_S": "0.5",
        "ROUNDHOUSE_WORKER_REFRESH_S": "0.5",
        "ROUNDHOUSE_RECONCILE_INTERVAL_S": "1",
        # A jobs instance that died holds its operations this long before another takes over.
        "ROUNDHOUSE_JOBS_LEASE_S": "6",
        "ROUNDHOUSE_LOAD_FAILURE_COOLDOWN_S": "10",
        "ROUNDHOUSE_LOAD_TIMEOUT_S": "30",
        "ROUNDHOUSE_REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S),
        "ROUNDHOUSE_STREAM_IDLE_TIMEOUT_S": str(STREAM_IDLE_TIMEOUT_S),
        "ROUNDHOUSE_DRAIN_TIMEOUT_S": "10",
        # Two cores for four services, a load generator and the models: one thread each.
        "OMP_NUM_THREADS": "1",
    })
    return env


def write_catalog(folder: Path, sources: Path) -> Path:
    """The tiny chat (on-demand) and embedding (running) models as a catalog folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for document in tiny_documents(sources, max_queue=8):
        (folder / f"{document['asset_id']}.yaml").write_text(yaml.safe_dump(document))
    return folder


async def start_chaos_stack(root: Path, sources: Path) -> ChaosStack:
    """Start the servers and `roundhouse up`; return once it printed that it is up."""
    servers = ServerThread(root / "servers")
    dsn, nats_url = await servers.start()
    env = chaos_environment(root, sources, dsn, nats_url)
    catalog = write_catalog(root / "catalog", sources)
    log = root / "up.log"
    with log.open("wb") as out:
        up = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli.main", "up", "--catalog", str(catalog), cwd=REPO,
            env=env, stdout=out, stderr=out, start_new_session=True)
    stack = ChaosStack(up, servers, env, log, dsn, nats_url, env["ROUNDHOUSE_ADMIN_KEY"],
                       env["ROUNDHOUSE_INTERNAL_TOKEN"],
                       {name: env[f"ROUNDHOUSE_{name.upper()}_ADDRESS"] for name in SERVICES})

    def printed_up() -> bool:
        if up.returncode is not None:
            raise AssertionError(f"roundhouse up exited with {up.returncode}:\n{log.read_text()[-4000:]}")
        return READY_LINE in log.read_text(errors="replace")

    try:
        await wait_until(printed_up, timeout=180, interval=0.2)
    except BaseException:
        await stop_chaos_stack(stack)
        raise
    return stack


async def stop_chaos_stack(stack: ChaosStack) -> None:
    """Ctrl-C `roundhouse up` (SIGKILL after a minute), then stop the servers."""
    if stack.up.returncode is None:
        stack.up.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(stack.up.wait(), 60)
        except TimeoutError:
            stack.up.kill()
            await stack.up.wait()
    await stack.servers.close()

