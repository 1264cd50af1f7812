"""Roundhouse services as real processes, for tests: `roundhouse_process` runs any
`roundhouse` command, `worker_process` a worker, `router_fleet` real `roundhouse router`
processes in front of an in-process registry, jobs service and worker; `wait_ready` waits for
a process's `/readyz`."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import httpx
from jobs_harness import jobs_settings, running_jobs
from polling import wait_until
from registry_harness import running_registry
from stack_harness import REPO, RunningWorker, running_worker

from roundhouse.v1 import registry_pb2
from services.common.asset_proto import spec_to_proto
from services.common.assetspec import parse_spec
from services.common.embedded import free_port
from services.common.events import EventBus
from services.common.modelstore.store import ModelStore


@asynccontextmanager
async def roundhouse_process(
    command: str, settings: dict[str, str], log: Path, args: Sequence[str] = ()
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`roundhouse COMMAND ARGS...` as a real process with `settings` added to the environment,
    its output in `log`. Left running, it gets SIGTERM at the end, then SIGKILL after 20 s."""
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli.main", command, *args, cwd=REPO,
            env={**os.environ, **settings}, stdout=out, stderr=out)
    try:
        yield process
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 20)
            except TimeoutError:
                process.kill()
        await process.wait()


async def wait_ready(url: str, process: asyncio.subprocess.Process, log: Path) -> None:
    """Wait for the `/readyz` of a `roundhouse_process` serving HTTP at `url`; fail with its
    log if it exits first."""
    async with httpx.AsyncClient(timeout=5) as http:
        async def answers() -> bool:
            if process.returncode is not None:
                raise AssertionError(f"{log.stem} exited with {process.returncode}:\n{log.read_text()}")
            try:
                return (await http.get(f"{url}/readyz")).status_code == 200
            except httpx.TransportError:
                return False

        await wait_until(answers, timeout=90, interval=0.1)


@asynccontextmanager
async def router_fleet(
    dsn: str, nats_url: str, sources: Path, root: Path, documents: list[dict],
    router_settings: dict[str, str], names: Sequence[str] = ("a", "b"),
) -> AsyncIterator[tuple[list[str], RunningWorker]]:
    """A registry, one in-process worker and a jobs service with `documents` applied and
    installed, under `root`; in front of them real `roundhouse router` processes, one a name,
    with `router_settings` added and each its own ports, home and log. Yields the routers'
    HTTP base URLs, once every one is ready, and the worker."""
    async with AsyncExitStack() as stack:
        registry = await stack.enter_async_context(running_registry(dsn, nats_url, [sources]))
        store = ModelStore(root / "store", [sources])
        bus = await EventBus.connect(nats_url, name="fleet-worker", ensure_stream=False)
        stack.push_async_callback(bus.close)
        worker = await stack.enter_async_context(running_worker(store, bus=bus))
        jobs = await stack.enter_async_context(running_jobs(jobs_settings(
            dsn, nats_url, root / "jobs", registry.address, model_store=root / "store",
            source_roots=[sources], worker_addresses=[worker.address], worker_refresh_s=0.5,
            worker_heartbeat_s=0.5, jobs_instance_id=f"fleet-{uuid.uuid4().hex[:8]}")))
        specs = [parse_spec(d, source_roots=[sources]) for d in documents]
        for spec in specs:
            store.install(spec)
        await registry.stub.ApplyAssets(registry_pb2.ApplyAssetsRequest(
            assets=[registry_pb2.AssetApply(spec=spec_to_proto(s)) for s in specs]))
        shared = {
            "ROUNDHOUSE_DATABASE_URL": dsn, "ROUNDHOUSE_NATS_URL": nats_url,
            "ROUNDHOUSE_REGISTRY_ADDRESS": registry.address, "ROUNDHOUSE_JOBS_ADDRESS": jobs.address,
            "ROUNDHOUSE_WORKER_ADDRESSES": json.dumps([worker.address]), "ROUNDHOUSE_LOAD_TIMEOUT_S": "60",
            "ROUNDHOUSE_WORKER_REFRESH_S": "0.5", "ROUNDHOUSE_WORKER_HEARTBEAT_S": "0.5", **router_settings,
        }
        routers = []
        for name in names:
            port = free_port()
            own = {"ROUNDHOUSE_HOME": str(root / f"home-{name}"), "ROUNDHOUSE_HTTP_PORT": str(port),
                   "ROUNDHOUSE_ROUTER_ADDRESS": f"127.0.0.1:{free_port()}"}
            log = root / f"router-{name}.log"
            process = await stack.enter_async_context(roundhouse_process("router", {**shared, **own}, log))
            routers.append((f"http://127.0.0.1:{port}", process, log))
        for url, process, log in routers:
            await wait_ready(url, process, log)
        yield [url for url, _, _ in routers], worker


@asynccontextmanager
async def worker_process(nats_url: str, store: Path, sources: Path, log: Path) -> AsyncIterator[
        tuple[asyncio.subprocess.Process, str, str]]:
    """`roundhouse worker` as a real process; yields it with its id and address."""
    address = f"127.0.0.1:{free_port()}"
    worker_id = f"doomed-{address.rsplit(':', 1)[1]}"
    settings = {"ROUNDHOUSE_WORKER_ADDRESS": address, "ROUNDHOUSE_WORKER_ID": worker_id,
                "ROUNDHOUSE_NATS_URL": nats_url, "ROUNDHOUSE_MODEL_STORE": str(store),
                "ROUNDHOUSE_SOURCE_ROOTS": str(sources), "ROUNDHOUSE_HOME": str(log.parent / "home"),
                "ROUNDHOUSE_WORKER_HEARTBEAT_S": "0.5"}
    async with roundhouse_process("worker", settings, log) as process:
        yield process, worker_id, address
