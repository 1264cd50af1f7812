"""Roundhouse services as real processes, for tests: `roundhouse_process` runs any
`roundhouse` command, `worker_process` a worker, `router_fleet` real `roundhouse router`
processes in front of an in-process registry, jobs service and worker, `process_stack` every
service as a process of its own; `wait_ready` waits for a process's `/readyz`, `wait_serving`
for a gRPC server's health."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from jobs_harness import jobs_settings, running_jobs
from polling import wait_until
from registry_harness import running_registry
from stack_harness import REPO, RunningWorker, running_worker

from roundhouse.v1 import registry_pb2, registry_pb2_grpc
from services.common.asset_proto import spec_to_proto
from services.common.assetspec import parse_spec
from services.common.embedded import free_port
from services.common.events import EventBus
from services.common.grpc_client import open_channel
from services.common.keys.tokens import new_secret
from services.common.modelstore.store import ModelStore
from services.common.route_proto import declared_to_proto
from services.common.routespec import parse_document
from services.common.settings import CommonSettings


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
            "ROUNDHOUSE_WORKER_REFRESH_S": "0.5", "ROUNDHOUSE_WORKER_HEARTBEAT_S": "0.5",
            # The worker heartbeats from the test's own event loop, which a busy two-core machine
            # can stall past three missed beats: no fleet test is about a worker's death.
            "ROUNDHOUSE_WORKER_DEAD_AFTER_S": "15", **router_settings,
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
    """`roundhouse worker` as a real process, once it serves; yields it with its id and address."""
    address = f"127.0.0.1:{free_port()}"
    worker_id = f"doomed-{address.rsplit(':', 1)[1]}"
    settings = {"ROUNDHOUSE_WORKER_ADDRESS": address, "ROUNDHOUSE_WORKER_ID": worker_id,
                "ROUNDHOUSE_NATS_URL": nats_url, "ROUNDHOUSE_MODEL_STORE": str(store),
                "ROUNDHOUSE_SOURCE_ROOTS": str(sources), "ROUNDHOUSE_HOME": str(log.parent / "home"),
                "ROUNDHOUSE_WORKER_HEARTBEAT_S": "0.5"}
    async with roundhouse_process("worker", settings, log) as process:
        # Until it listens, the jobs service finds no worker for a wake (a 503 at once).
        await wait_serving(address, process, log)
        yield process, worker_id, address


async def wait_serving(address: str, process: asyncio.subprocess.Process, log: Path,
                       timeout: float = 180) -> None:
    """Wait for the gRPC health of a `roundhouse_process` at `address` to say SERVING; fail
    with its log if it exits first. A worker imports torch and transformers before it listens:
    on a busy two-core machine that alone can take a minute or more."""
    async with open_channel(address, CommonSettings()) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        async def serving() -> bool:
            if process.returncode is not None:
                raise AssertionError(f"{log.stem} exited with {process.returncode}:\n{log.read_text()}")
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.aio.AioRpcError:
                return False
            return reply.status == health_pb2.HealthCheckResponse.SERVING

        try:
            await wait_until(serving, timeout=timeout, interval=0.1)
        except AssertionError:
            if process.returncode is not None:
                raise  # it exited: that error already carries its log
            raise AssertionError(f"{log.stem} not serving at {address} within {timeout} s:\n"
                                 f"{log.read_text()}") from None


@dataclass
class ProcessWorker:
    """A `roundhouse worker` process of a `ProcessStack`."""

    worker_id: str
    address: str
    metrics_port: int
    log: Path


@dataclass
class ProcessStack:
    """Registry, jobs service, workers and router, each a real process; where to reach them."""

    http_url: str
    router_address: str
    registry_address: str
    jobs_address: str
    jobs_metrics_port: int
    workers: list[ProcessWorker]
    admin_key: str
    sources: Path
    logs: dict[str, Path] = field(default_factory=dict)
    """The log file of each service, by name (`registry`, `jobs`, `router`, `worker-0`...)."""

    @property
    def admin_headers(self) -> dict[str, str]:
        """`Authorization` with the router's admin key."""
        return {"Authorization": f"Bearer {self.admin_key}"}

    async def apply(self, *documents: dict) -> None:
        """Apply asset documents (models and routes) through the registry."""
        specs = [parse_document(d, source_roots=[self.sources]) for d in documents]
        async with open_channel(self.registry_address, CommonSettings()) as channel:
            await registry_pb2_grpc.RegistryStub(channel).ApplyAssets(registry_pb2.ApplyAssetsRequest(
                assets=[registry_pb2.AssetApply(spec=declared_to_proto(s)) for s in specs]))


@asynccontextmanager
async def process_stack(
    dsn: str, nats_url: str, store: Path, sources: Path, root: Path, settings: dict[str, str],
    workers: int = 1,
) -> AsyncIterator[ProcessStack]:
    """`roundhouse registry`, `jobs`, `worker` (`workers` of them) and `router` as real
    processes on free ports, with `settings` added to each one's environment, serving models
    installed in `store`; logs under `root`. Every worker and the jobs service have a metrics
    port; the router checks keys and has an admin key of its own. The jobs service runs no
    reconciler, so a model is loaded only when asked (a request wakes it). Yields once every
    service answers."""
    ports = {name: free_port() for name in ("registry", "jobs", "jobs-metrics", "router", "http")}
    own = [ProcessWorker(f"worker-{i}", f"127.0.0.1:{free_port()}", free_port(), root / f"worker-{i}.log")
           for i in range(workers)]
    addresses = json.dumps([w.address for w in own])
    shared = {"ROUNDHOUSE_DATABASE_URL": dsn, "ROUNDHOUSE_NATS_URL": nats_url,
              "ROUNDHOUSE_MODEL_STORE": str(store), "ROUNDHOUSE_SOURCE_ROOTS": str(sources),
              "ROUNDHOUSE_REGISTRY_ADDRESS": f"127.0.0.1:{ports['registry']}",
              "ROUNDHOUSE_JOBS_ADDRESS": f"127.0.0.1:{ports['jobs']}",
              "ROUNDHOUSE_WORKER_ADDRESSES": addresses, "ROUNDHOUSE_WORKER_REFRESH_S": "0.5",
              "ROUNDHOUSE_WORKER_HEARTBEAT_S": "0.5", **settings}
    running = ProcessStack(
        f"http://127.0.0.1:{ports['http']}", f"127.0.0.1:{ports['router']}", shared["ROUNDHOUSE_REGISTRY_ADDRESS"],
        shared["ROUNDHOUSE_JOBS_ADDRESS"], ports["jobs-metrics"], own, new_secret(), sources)
    services: list[tuple[str, dict[str, str], str]] = [
        ("registry", {}, running.registry_address),
        ("jobs", {"ROUNDHOUSE_JOBS_METRICS_PORT": str(ports["jobs-metrics"]), "ROUNDHOUSE_JOBS_RECONCILE": "false",
                  "ROUNDHOUSE_JOBS_INSTANCE_ID": f"process-jobs-{uuid.uuid4().hex[:8]}"}, running.jobs_address),
        *((f"worker-{i}", {"ROUNDHOUSE_WORKER_ADDRESS": w.address, "ROUNDHOUSE_WORKER_ID": w.worker_id,
                           "ROUNDHOUSE_WORKER_METRICS_PORT": str(w.metrics_port)}, w.address)
          for i, w in enumerate(own)),
        ("router", {"ROUNDHOUSE_ROUTER_ADDRESS": running.router_address, "ROUNDHOUSE_HTTP_PORT": str(ports["http"]),
                    "ROUNDHOUSE_ADMIN_KEY": running.admin_key, "ROUNDHOUSE_LOAD_TIMEOUT_S": "60"},
         running.router_address),
    ]
    async with AsyncExitStack() as stack:
        started = []
        for name, extra, address in services:
            log = running.logs[name] = root / f"{name}.log"
            env = {**shared, "ROUNDHOUSE_HOME": str(root / f"home-{name}"), **extra}
            command = name.split("-")[0]
            started.append((await stack.enter_async_context(roundhouse_process(command, env, log)), log, address))
        stack.callback(_terminate_all, [process for process, _, _ in started])
        for process, log, address in started:
            await wait_serving(address, process, log)
        await wait_ready(running.http_url, started[-1][0], started[-1][1])
        yield running


def _terminate_all(processes: list[asyncio.subprocess.Process]) -> None:
    """SIGTERM to every process still running at once, so that they drain side by side rather
    than one after the other."""
    for process in processes:
        if process.returncode is None:
            with suppress(ProcessLookupError):
                process.terminate()
