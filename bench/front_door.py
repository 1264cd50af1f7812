"""Front door: what the key and limit checks add to an embedding request over HTTP, end to end.

One in-process stack on embedded Postgres and NATS (registry, jobs service, one worker) with two
routers in front of the same worker: one with auth disabled (today's path), one checking API
keys, called with a key that has every limit set (rpm, tpm, max_parallel, token and dollar
budgets) high enough never to refuse, and, to split the cost, with a key that has no limits
(the key check without the reservation). A client in another thread sends one short embedding at a
time over HTTP (keep-alive), in interleaved rounds (the order flips every round so that drift
falls on both paths alike). The model is the catalog's all-MiniLM-L6-v2 when it is installed in
the bench model store (`ROUNDHOUSE_BENCH_STORE`, default `~/.roundhouse/models`); otherwise a
tiny random-weight sentence model built for the run (then the model's own time is near zero,
so the difference stands out more).

Run: .venv/bin/python -m bench.front_door [--calls 2000] [--round 100] [--gap-ms 0]
Target: <= 0.3 ms added at p50.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from bench.results import percentile, record, summary
from bench.stack import bench_store, catalog_folder, catalog_spec, print_table
from roundhouse.v1 import registry_pb2, registry_pb2_grpc
from services.common.asset_proto import spec_to_proto
from services.common.assetspec import AssetSpec, parse_spec
from services.common.db import make_engine, make_sessionmaker
from services.common.db.migrate import upgrade
from services.common.embedded import EmbeddedNats, EmbeddedPostgres
from services.common.events import EventBus
from services.common.grpc_client import open_channel
from services.common.grpc_server import GrpcServer, ServiceBinding
from services.common.keys import KeyStore, NewKey
from services.common.modelstore.store import ModelStore
from services.common.outbox import OutboxRelay
from services.common.settings import CommonSettings
from services.jobs.server import build_app
from services.jobs.settings import JobsSettings
from services.registry.server import SERVICE_NAME as REGISTRY_SERVICE
from services.registry.service import AssetRegistry
from services.registry.servicer import RegistryServicer
from services.router.server import start_router
from services.router.settings import RouterSettings
from services.worker.server import WorkerServer
from services.worker.settings import WorkerSettings

CATALOG_MODEL = "all-minilm-l6-v2"
TINY_MODEL = "tiny-embed"
BIG = 1_000_000_000


@dataclass(frozen=True)
class FrontDoors:
    """The two routers' HTTP base URLs, the model they serve and the limited key's secret."""

    open_url: str
    keyed_url: str
    model: str
    secret: str
    unlimited_secret: str
    """A key with no limits: the key check without the reservation."""


def choose_model(root: Path) -> tuple[AssetSpec, ModelStore]:
    """The catalog MiniLM if the bench store holds it, else a tiny model built under `root`."""
    if catalog_folder(bench_store(), CATALOG_MODEL) is not None:
        return catalog_spec(CATALOG_MODEL), ModelStore(bench_store(), [])
    from tests.tiny_models import build_tiny_sentence_model

    sources = root / "sources"
    build_tiny_sentence_model(sources / TINY_MODEL)
    spec = parse_spec({"asset_id": TINY_MODEL, "interface": "embedding-runtime",
                       "source": {"kind": "path", "path": str(sources / TINY_MODEL)},
                       "policy": {"max_concurrency": 64, "max_queue": 1024}},
                      source_roots=[sources])
    store = ModelStore(root / "store", [sources])
    store.install(spec)
    return spec, store


@asynccontextmanager
async def front_doors(dsn: str, nats_url: str, root: Path) -> AsyncIterator[FrontDoors]:
    """Registry, jobs service, one worker and the two routers, all on free loopback ports."""
    spec, store = choose_model(root)
    plain = CommonSettings(home=root / "home", database_url=dsn, nats_url=nats_url)
    async with AsyncExitStack() as stack:
        engine = make_engine(dsn)
        stack.push_async_callback(engine.dispose)
        bus = await EventBus.connect(nats_url, name="bench-front-door")
        stack.push_async_callback(bus.close)
        relay = OutboxRelay(make_sessionmaker(engine), bus)
        relay.start()
        stack.push_async_callback(relay.stop)
        registry = GrpcServer("127.0.0.1:0", [ServiceBinding(
            registry_pb2_grpc.add_RegistryServicer_to_server,
            RegistryServicer(AssetRegistry(make_sessionmaker(engine), on_commit=relay.notify),
                             store.source_roots, plain.upstream_rules()),
            REGISTRY_SERVICE)], plain)
        registry_address = f"127.0.0.1:{await registry.start()}"
        stack.push_async_callback(registry.stop, 0.5)
        worker = WorkerServer(WorkerSettings(worker_address="127.0.0.1:0", home=plain.home), store, bus)
        worker_address = f"127.0.0.1:{await worker.start()}"
        stack.push_async_callback(worker.stop, 0.5)
        jobs = await build_app(JobsSettings(
            home=plain.home, database_url=dsn, nats_url=nats_url, model_store=store.root,
            source_roots=store.source_roots, registry_address=registry_address,
            jobs_address="127.0.0.1:0", worker_addresses=[worker_address], jobs_reconcile=False))
        jobs_address = f"127.0.0.1:{await jobs.start()}"
        stack.push_async_callback(jobs.stop, 0.5)
        channel = open_channel(registry_address, plain)
        stack.push_async_callback(channel.close, None)
        await registry_pb2_grpc.RegistryStub(channel).ApplyAssets(registry_pb2.ApplyAssetsRequest(
            assets=[registry_pb2.AssetApply(spec=spec_to_proto(spec))]))
        keys = KeyStore(make_sessionmaker(engine))
        _, secret = await keys.create(NewKey(
            name="bench-front-door", rpm=BIG // 1000, tpm=BIG, max_parallel=64, budget_tokens=BIG,
            budget_usd=Decimal(1_000_000), budget_period="30d"))
        _, unlimited = await keys.create(NewKey(name="bench-front-door-unlimited"))
        urls = []
        for auth in ("disabled", "enabled"):
            settings = RouterSettings(
                home=plain.home, database_url=dsn, nats_url=nats_url, router_address="127.0.0.1:0",
                http_port=0, registry_address=registry_address, jobs_address=jobs_address,
                worker_addresses=[worker_address], auth=auth, key_cache_s=600, log_level="WARNING")
            router = await start_router(settings, bus)
            for cleanup in reversed(router.cleanups):
                stack.push_async_callback(cleanup)
            await router.grpc_server.start()
            stack.push_async_callback(router.grpc_server.stop, 0.5)
            urls.append(f"http://127.0.0.1:{router.http_port}")
        yield FrontDoors(urls[0], urls[1], spec.asset_id, secret, unlimited)


def measure(doors: FrontDoors, calls: int, round_size: int, gap_s: float = 0.0) -> dict[str, list[float]]:
    """Latencies (ms) of sequential embeddings through each router, in interleaved rounds;
    `gap_s` of idle between requests lets the work each leaves in the background finish."""
    body = {"model": doors.model, "input": "a short input"}
    with httpx.Client(base_url=doors.open_url, timeout=120) as open_, httpx.Client(
            base_url=doors.keyed_url, timeout=120, headers={"Authorization": f"Bearer {doors.secret}"}) as keyed, \
            httpx.Client(base_url=doors.keyed_url, timeout=120,
                         headers={"Authorization": f"Bearer {doors.unlimited_secret}"}) as unlimited:
        def one(client: httpx.Client) -> float:
            start = time.perf_counter()
            reply = client.post("/v1/embeddings", json=body)
            elapsed = (time.perf_counter() - start) * 1000
            reply.raise_for_status()
            if gap_s:
                time.sleep(gap_s)
            return elapsed

        one(open_)  # wakes the model
        for _ in range(200):
            one(open_)
            one(keyed)
            one(unlimited)
        clients = {"auth disabled": open_, "key without limits": unlimited, "limited key": keyed}
        times: dict[str, list[float]] = {name: [] for name in clients}
        order = list(clients)
        for _ in range(max(1, calls // round_size)):
            for name in order:
                times[name].extend(one(clients[name]) for _ in range(round_size))
            order.reverse()
    return times


class LoopThread:
    """An asyncio loop in a thread of its own: the stack lives there, the client in the caller."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        """Run a coroutine on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(make(), self.loop).result()

    def close(self) -> None:
        """Stop the loop and its thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


def main() -> None:
    """Measure and print p50/p99 of both paths and the difference at p50."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2000, help="requests per path")
    parser.add_argument("--round", type=int, default=100, help="requests per path per round")
    parser.add_argument("--gap-ms", type=float, default=0.0,
                        help="idle time after each request (lets background settles finish untimed)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="roundhouse-bench-front-door-"))
    os.chmod(root, 0o755)  # embedded Postgres runs as an unprivileged user
    with EmbeddedPostgres(root / "postgres") as postgres, EmbeddedNats(root / "nats") as nats:
        upgrade(postgres.dsn)
        loop = LoopThread()
        stack = front_doors(postgres.dsn, nats.url, root)
        try:
            doors = loop.run(stack.__aenter__)
            try:
                times = measure(doors, args.calls, args.round, args.gap_ms / 1000)
            finally:
                loop.run(lambda: stack.__aexit__(None, None, None))
        finally:
            loop.close()
    rows = [[name, f"{percentile(v, 50):.3f}", f"{percentile(v, 99):.3f}", f"{statistics.mean(v):.3f}"]
            for name, v in times.items()]
    keyed, open_ = times["limited key"], times["auth disabled"]
    print_table(f"POST /v1/embeddings ({doors.model}) one at a time over HTTP, {len(keyed)} calls each, ms",
                ["path", "p50", "p99", "mean"], rows)
    added = percentile(keyed, 50) - percentile(open_, 50)
    print(f"added by the key and limit checks at p50: {added:.3f} ms (target <= 0.3 ms)")
    record("front_door", {"model": doors.model, "calls": len(keyed), "round": args.round, "gap_ms": args.gap_ms,
                          **{f"{name.replace(' ', '_')}_ms": summary(v) for name, v in times.items()},
                          "added_p50_ms": added})


if __name__ == "__main__":
    main()
