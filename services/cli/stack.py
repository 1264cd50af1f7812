"""`roundhouse up`: the embedded default stack, supervised, with the default catalog."""

from __future__ import annotations

import asyncio
import fcntl
import os
import secrets
import sys
from contextlib import ExitStack
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr

from roundhouse.v1 import registry_pb2
from services.cli.assets import OUTCOME_WORDS, apply_specs
from services.cli.bootstrap import admin_key_line, bootstrap_admin_key
from services.cli.private_files import write_private
from services.cli.supervisor import ChildSpec, Supervisor
from services.common.assetspec import AssetSpec
from services.common.db.migrate import upgrade
from services.common.documents import load_path
from services.common.embedded import EmbeddedNats, EmbeddedPostgres, free_port
from services.common.grpc_client import open_channel
from services.common.modelstore.model import Progress, ProgressCallback
from services.common.modelstore.settings import StoreSettings
from services.common.modelstore.store import ModelStore
from services.common.route_proto import declared_to_proto
from services.common.routespec import RouteSpec
from services.common.secrets import known_secrets, mask_url, redact
from services.common.settings import INTERNAL_TOKEN_FILE, CommonSettings
from services.jobs.settings import JobsSettings
from services.registry.settings import RegistrySettings
from services.router.settings import RouterSettings
from services.worker.settings import WorkerSettings

CATALOG = Path(__file__).resolve().parents[2] / "deploy" / "catalog"
SERVICES = ("registry", "worker", "router", "jobs")
STOP_MARGIN_S = 15.0
"""Beyond the drain timeout, how long a service may take to close its connections and exit
before `roundhouse up` kills it."""


def _say(line: str) -> None:
    print(f"[roundhouse] {redact(line)}", flush=True)


def up(catalog: str | None = None) -> int:
    """Start everything, wait for Ctrl-C (or SIGTERM), stop everything. Returns an exit code."""
    settings = StoreSettings()
    home = settings.home
    run_dir = home / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        lock = stack.enter_context((run_dir / "up.lock").open("w"))
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"error: another `roundhouse up` is running with home {home}", file=sys.stderr)
            return 1
        dsn = settings.database_url or _embedded_postgres(stack, home)
        nats_url = settings.nats_url or _embedded_nats(stack, home)
        # A fresh internal token each start, unless one is set: the children require it, and
        # CLI commands find it recorded here.
        token = settings.internal_token.get_secret_value() if settings.internal_token else ""
        token = token or secrets.token_urlsafe(32)
        for name, value in (("database_url", dsn), ("nats_url", nats_url), (INTERNAL_TOKEN_FILE, token)):
            write_private(run_dir / name, value)  # it may be or carry a secret
            stack.callback((run_dir / name).unlink, missing_ok=True)
        upgrade(dsn)
        _say("database migrated")
        _say(admin_key_line(bootstrap_admin_key(dsn)))
        specs = [item.spec for item in load_path(Path(catalog) if catalog else CATALOG,
                                                 source_roots=settings.resolved_source_roots(),
                                                 upstreams=settings.upstream_rules())]
        store = ModelStore.from_settings(settings)
        for spec in specs:
            if isinstance(spec, AssetSpec) and not store.is_installed(spec):
                _say(f"installing {spec.asset_id} into {store.root}")
                store.install(spec, progress=_progress_printer(spec.asset_id))
        _say(f"model store ready: {', '.join(s.asset_id for s in specs)}")
        env = {**os.environ, "ROUNDHOUSE_DATABASE_URL": dsn, "ROUNDHOUSE_NATS_URL": nats_url,
               "ROUNDHOUSE_INTERNAL_TOKEN": token}
        return asyncio.run(_run_services(env, specs, dsn, nats_url, home))


def _embedded_postgres(stack: ExitStack, home: Path) -> str:
    server = EmbeddedPostgres(home / "postgres")
    dsn = server.start()
    stack.callback(server.stop)
    _say(f"embedded Postgres at {mask_url(dsn)}")
    return dsn


def _embedded_nats(stack: ExitStack, home: Path) -> str:
    server = EmbeddedNats(home / "nats")
    url = server.start()
    stack.callback(server.stop)
    _say(f"embedded NATS (JetStream) at {mask_url(url)}")
    return url


def _progress_printer(asset_id: str) -> ProgressCallback:
    said: set[tuple[str, bool]] = set()

    def report(progress: Progress) -> None:
        key = (progress.stage, progress.percent >= 100)
        if key not in said:
            said.add(key)
            state = "done" if key[1] else "started"
            _say(f"  {asset_id}: {progress.stage} {state} {progress.message}".rstrip())

    return report


async def _run_services(
    env: dict[str, str], specs: list[AssetSpec | RouteSpec], dsn: str, nats_url: str, home: Path
) -> int:
    registry = RegistrySettings(internal_token=SecretStr(env["ROUNDHOUSE_INTERNAL_TOKEN"]))
    router, worker, jobs = RouterSettings(), WorkerSettings(), JobsSettings()
    # A metrics port each for the worker and the jobs service: the configured one, else a free
    # one chosen here, so that it can be listed below.
    worker_metrics = worker.worker_metrics_port or free_port(worker.metrics_host)
    jobs_metrics = jobs.jobs_metrics_port or free_port(jobs.metrics_host)
    env = {**env, "ROUNDHOUSE_WORKER_METRICS_PORT": str(worker_metrics),
           "ROUNDHOUSE_JOBS_METRICS_PORT": str(jobs_metrics)}
    supervisor = Supervisor(
        (ChildSpec(name, [sys.executable, "-m", "services.cli.main", name], env) for name in SERVICES),
        secrets=known_secrets(registry.upstream_key_envs, env), grace=registry.drain_timeout_s + STOP_MARGIN_S,
    )
    running = asyncio.create_task(supervisor.run())  # handles Ctrl-C / SIGTERM itself
    for address in (registry.registry_address, worker.worker_address, router.router_address,
                    jobs.jobs_address):
        if not await _wait_serving(address, registry, running):
            supervisor.request_stop()
            await running
            return 1
    request = registry_pb2.ApplyAssetsRequest(
        assets=[registry_pb2.AssetApply(spec=declared_to_proto(s)) for s in specs]
    )
    response = await apply_specs(registry.registry_address, request, registry)
    for result in response.results:
        _say(f"catalog: {result.asset.spec.asset_id} {OUTCOME_WORDS[result.outcome]} "
             f"(revision {result.asset.revision})")
    for line in (
        "up:",
        f"  OpenAI API     http://{router.http_host}:{router.http_port}/v1",
        f"  router gRPC    {router.router_address}",
        f"  registry gRPC  {registry.registry_address}",
        f"  worker gRPC    {worker.worker_address}",
        f"  jobs gRPC      {jobs.jobs_address}",
        f"  router metrics http://{router.http_host}:{router.http_port}/metrics",
        f"  worker metrics http://{worker.metrics_host}:{worker_metrics}/metrics",
        f"  jobs metrics   http://{jobs.metrics_host}:{jobs_metrics}/metrics",
        f"  Postgres       {mask_url(dsn)}",
        f"  NATS           {mask_url(nats_url)}",
        f"  home           {home}",
        "Ctrl-C stops everything (work in flight finishes first; Ctrl-C twice: at once)",
    ):
        _say(line)
    return await running


async def _wait_serving(
    address: str, settings: CommonSettings, running: asyncio.Task[int], timeout_s: float = 120.0
) -> bool:
    """Poll the gRPC health of `address` until SERVING, a deadline, or the stack stopping."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with open_channel(address, settings) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while not running.done():
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.aio.AioRpcError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                print(f"error: nothing answered at {address} within {timeout_s:.0f}s",
                      file=sys.stderr)
                return False
            await asyncio.wait([running], timeout=0.2)
    return False
