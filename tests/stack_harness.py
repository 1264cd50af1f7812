"""An in-process Roundhouse (registry, workers, router with HTTP) on free ports, for tests.

Tiny random-weight models stand in for real ones: a chat model and an embedding model,
installed into a temporary model store as `path` sources. `running_worker` starts one worker
on its own; `running_stack` composes it with a registry and a router. Services as real
processes are in `process_harness`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from jobs_harness import RunningJobs, jobs_settings, running_jobs
from pydantic import SecretStr
from registry_harness import RunningRegistry, running_registry
from tiny_models import build_tiny_llama, build_tiny_sentence_model
from tls_files import TlsFiles

from roundhouse.v1 import asset_pb2, events_pb2, inference_pb2_grpc, registry_pb2, worker_pb2_grpc
from services.common.asset_proto import AssetRecord, record_to_proto
from services.common.assetspec import AssetSpec, parse_spec
from services.common.db import make_engine, make_sessionmaker
from services.common.events import EventBus
from services.common.grpc_client import open_channel
from services.common.keys import KeyStore, NewKey
from services.common.modelstore.store import ModelStore
from services.common.route_proto import declared_to_proto
from services.common.routespec import RouteSpec, parse_document
from services.common.settings import CommonSettings
from services.router.server import RouterParts, start_router
from services.router.settings import RouterSettings
from services.worker.server import WorkerServer
from services.worker.settings import WorkerSettings

REPO = Path(__file__).resolve().parents[1]
TINY_CHAT = "tiny-chat"
TINY_EMBED = "tiny-embed"


@dataclass
class RunningWorker:
    """A worker started by the harness."""

    server: WorkerServer
    address: str
    channel: grpc.aio.Channel

    @property
    def control(self) -> worker_pb2_grpc.WorkerControlStub:
        """The worker's `WorkerControl` service."""
        return worker_pb2_grpc.WorkerControlStub(self.channel)

    @property
    def inference(self) -> inference_pb2_grpc.InferenceStub:
        """The worker's `Inference` service (`model` is the asset id)."""
        return inference_pb2_grpc.InferenceStub(self.channel)


@asynccontextmanager
async def running_worker(
    store: ModelStore, *, memory_mb: int = 4096, bus: EventBus | None = None,
    heartbeat_s: float = 0.5, internal_token: str | None = None, tls: TlsFiles | None = None,
) -> AsyncIterator[RunningWorker]:
    """Start a worker on 127.0.0.1:0 serving from `store`; stopped (models unloaded) on exit.

    With a bus it announces itself and heartbeats every `heartbeat_s`. With `internal_token`
    it requires the token, with `tls` it serves TLS; the harness's channel has both.
    """
    settings = WorkerSettings(worker_address="127.0.0.1:0", worker_memory_mb=memory_mb,
                              worker_heartbeat_s=heartbeat_s,
                              internal_token=SecretStr(internal_token) if internal_token else None,
                              **(tls.server() if tls else {}))
    server = WorkerServer(settings, store, bus)
    port = await server.start()
    address = f"127.0.0.1:{port}"
    channel = open_channel(address, settings)
    try:
        yield RunningWorker(server, address, channel)
    finally:
        await channel.close(grace=None)
        await server.stop(0.5)


@dataclass
class Stack:
    """Everything the harness started, and how to reach it."""

    registry: RunningRegistry
    store: ModelStore
    sources: Path
    workers: list[RunningWorker]
    router: RouterParts
    router_address: str
    http_url: str
    channel: grpc.aio.Channel
    jobs: RunningJobs
    extra: list[str] = field(default_factory=list)
    admin_key: str | None = None
    """An admin key's secret when the stack checks keys (`auth=True`); None otherwise."""
    router_settings: RouterSettings | None = None
    bus: EventBus | None = None

    @property
    def admin_headers(self) -> dict[str, str]:
        """`Authorization` with the admin key (empty without auth)."""
        return {"Authorization": f"Bearer {self.admin_key}"} if self.admin_key else {}

    @property
    def inference(self) -> inference_pb2_grpc.InferenceStub:
        """The router's gRPC front."""
        return inference_pb2_grpc.InferenceStub(self.channel)

    async def registry_asset(self, asset_id: str) -> asset_pb2.Asset:
        """The asset as the registry has it now (observed state included)."""
        return await self.registry.stub.GetAsset(registry_pb2.GetAssetRequest(asset_id=asset_id))

    async def apply(self, *documents: dict) -> list[AssetSpec | RouteSpec]:
        """Apply asset documents (models and routes) through the registry, installing the
        models first."""
        specs = [parse_document(d, source_roots=[self.sources]) for d in documents]
        for spec in specs:
            if isinstance(spec, AssetSpec):
                self.store.install(spec)
        await self.registry.stub.ApplyAssets(registry_pb2.ApplyAssetsRequest(
            assets=[registry_pb2.AssetApply(spec=declared_to_proto(s)) for s in specs]))
        return specs


def tiny_documents(sources: Path, **policy: float) -> list[dict]:
    """Asset documents of the two tiny models, with an optional policy for the chat model."""
    return [
        {"asset_id": TINY_CHAT, "interface": "llm-runtime", "aliases": ["tiny-alias"],
         "source": {"kind": "path", "path": str(sources / TINY_CHAT)},
         "policy": {"max_concurrency": 2, "max_queue": 2, "queue_timeout_s": 60, **policy}},
        {"asset_id": TINY_EMBED, "interface": "embedding-runtime",
         "source": {"kind": "path", "path": str(sources / TINY_EMBED)}},
    ]


def build_sources(root: Path) -> Path:
    """Build the tiny models once into `root`."""
    if not (root / TINY_CHAT).exists():
        build_tiny_llama(root / TINY_CHAT)
        build_tiny_sentence_model(root / TINY_EMBED)
    return root


@asynccontextmanager
async def running_stack(
    dsn: str, nats_url: str, sources: Path, store_root: Path, *, workers: int = 1,
    worker_memory_mb: int = 4096, extra_workers: list[str] | None = None,
    worker_heartbeat_s: float = 0.5, reconcile: bool = False, auth: bool = False,
    internal_token: str | None = None, tls: TlsFiles | None = None, **jobs: Any,
) -> AsyncIterator[Stack]:
    """Start a registry, `workers` workers, a jobs service and a router (gRPC + HTTP), all on
    port 0.

    The router and the jobs service also learn workers from their heartbeats (every
    `worker_heartbeat_s`) and declare one dead after three missed. The jobs service wakes
    models for the router; its reconciler runs only with `reconcile` (it acts on every asset
    in the database, so only tests with a database of their own should turn it on). `jobs`
    overrides further jobs settings. With `auth` the router checks API keys (on Postgres at
    `dsn`) and `Stack.admin_key` is an admin key made for it; without, it checks none
    (`ROUNDHOUSE_AUTH=disabled`). With `internal_token` the registry, workers and jobs service
    require it and every service sends it; with `tls` every gRPC server serves TLS and every
    client trusts its CA (`Stack.channel`, to the router's front, too, without the token).
    """
    security: dict[str, Any] = {"internal_token": internal_token, **(tls.server() if tls else {})}
    async with AsyncExitStack() as stack:
        registry = await stack.enter_async_context(running_registry(
            dsn, nats_url, [sources], settings=CommonSettings(**security)))
        store = ModelStore(store_root, [sources])
        bus = await EventBus.connect(nats_url, name="test-stack", ensure_stream=False)
        stack.push_async_callback(bus.close)
        started = [
            await stack.enter_async_context(running_worker(
                store, memory_mb=worker_memory_mb, bus=bus, heartbeat_s=worker_heartbeat_s,
                internal_token=internal_token, tls=tls))
            for _ in range(workers)
        ]
        addresses = [w.address for w in started] + (extra_workers or [])
        settings = jobs_settings(
            dsn, nats_url, store_root.parent / f"jobs-{uuid.uuid4().hex[:8]}", registry.address,
            model_store=store_root, source_roots=[sources], worker_addresses=addresses,
            worker_refresh_s=0.5, worker_heartbeat_s=worker_heartbeat_s, jobs_reconcile=reconcile,
            jobs_instance_id=f"stack-jobs-{uuid.uuid4().hex[:8]}", **security, **jobs)
        jobs_service = await stack.enter_async_context(running_jobs(settings))
        router_settings = RouterSettings(
            router_address="127.0.0.1:0", http_port=0, registry_address=registry.address,
            jobs_address=jobs_service.address, worker_addresses=addresses,
            worker_refresh_s=0.5, load_timeout_s=60, worker_heartbeat_s=worker_heartbeat_s,
            database_url=dsn, auth="enabled" if auth else "disabled", **security,
        )
        admin_key = await _make_admin_key(dsn) if auth else None
        router, router_port = await stack.enter_async_context(running_router(router_settings, bus))
        front = CommonSettings(home=store_root.parent / "app-home", **(tls.client() if tls else {}))
        channel = open_channel(f"127.0.0.1:{router_port}", front)
        stack.push_async_callback(channel.close, None)
        yield Stack(registry, store, sources, started, router, f"127.0.0.1:{router_port}",
                    f"http://127.0.0.1:{router.http_port}", channel, jobs_service,
                    admin_key=admin_key, router_settings=router_settings, bus=bus)


@asynccontextmanager
async def running_router(settings: RouterSettings, bus: EventBus | None) -> AsyncIterator[tuple[RouterParts, int]]:
    """A router (gRPC front and HTTP API) with `settings`; yields it with its gRPC port. Start a
    second one on a running stack with `running_router(stack.router_settings, stack.bus)`."""
    async with AsyncExitStack() as stack:
        router = await start_router(settings, bus)
        for cleanup in reversed(router.cleanups):  # run in the order the router lists them
            stack.push_async_callback(cleanup)
        port = await router.grpc_server.start()
        stack.push_async_callback(router.grpc_server.stop, 0.5)
        yield router, port


async def _make_admin_key(dsn: str) -> str:
    """A fresh admin key of its own name, straight into the key store; its secret."""
    engine = make_engine(dsn)
    try:
        _, secret = await KeyStore(make_sessionmaker(engine)).create(
            NewKey(name=f"harness-admin-{uuid.uuid4().hex[:8]}", admin=True))
    finally:
        await engine.dispose()
    return secret


def tiny_spec(sources: Path, name: str, **overrides: object) -> AssetSpec:
    """One of the tiny models' specs (`tiny_documents`), with fields replaced."""
    document = next(d for d in tiny_documents(sources) if d["asset_id"] == name)
    return parse_spec({**document, **overrides}, source_roots=[sources])


def not_installed(sources: Path) -> AssetSpec:
    """A chat asset whose source was never installed (an install is found by its source)."""
    (sources / "never-installed").mkdir(exist_ok=True)
    return tiny_spec(sources, TINY_CHAT, asset_id="not-installed",
                     source={"kind": "path", "path": str(sources / "never-installed")})


def asset_message(item: AssetSpec, revision: int = 1) -> asset_pb2.Asset:
    """`item` as the registry would hand it to a worker, at `revision`."""
    now = datetime.now(UTC)
    return record_to_proto(AssetRecord(item, revision, now, now))


class Witness:
    """Every `model.*` event while open."""

    def __init__(self) -> None:
        self.events: list[events_pb2.Event] = []

    def of(self, kind: str, asset_id: str = "") -> list[events_pb2.Event]:
        """Events of that type (about that asset)."""
        return [e for e in self.events if e.type == kind and (not asset_id or e.asset_id == asset_id)]


@asynccontextmanager
async def witness(nats_url: str) -> AsyncIterator[Witness]:
    """A `Witness` collecting `model.*` events until the block ends."""
    seen = Witness()
    bus = await EventBus.connect(nats_url, name="lifecycle-witness", ensure_stream=False)

    async def keep(event: events_pb2.Event) -> None:
        seen.events.append(event)

    await bus.subscribe("roundhouse.events.model.>", keep)
    try:
        yield seen
    finally:
        await bus.close()
