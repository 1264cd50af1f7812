"""Composition root of the router: gRPC `Inference` front plus the HTTP API, one process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import asyncpg
import uvicorn
import uvloop
from opentelemetry.metrics import MeterProvider
from prometheus_client import CollectorRegistry

from roundhouse.v1 import (
    admin_pb2_grpc,
    events_pb2,
    inference_pb2,
    inference_pb2_grpc,
    jobs_pb2_grpc,
    registry_pb2_grpc,
)
from services.common.db import make_engine, make_sessionmaker
from services.common.drain import Drain
from services.common.events import EventBus
from services.common.grpc_client import open_channel
from services.common.grpc_server import GrpcServer, ServiceBinding, run_until_signal
from services.common.keys import KeyStore
from services.common.liveness import WorkerLiveness
from services.common.outbox import OutboxMetrics, OutboxRelay
from services.common.telemetry import setup_telemetry
from services.common.workerpool import WorkerPool
from services.router.admin_servicer import SERVICE_NAME as ADMIN_SERVICE_NAME
from services.router.admin_servicer import AdminServicer
from services.router.admin_sources import admin_stats
from services.router.admission import Admission
from services.router.cache import ResponseCache
from services.router.catalog import AssetCatalog
from services.router.gateway import Gateway
from services.router.http.app import create_app
from services.router.http.metrics import THRASHING_EVENTS, HttpMetrics
from services.router.keys import KeyAuthenticator
from services.router.limits import Limiter, create_pool
from services.router.metrics import GenAIMetrics, RequestMetrics
from services.router.remote import RemoteUpstreams
from services.router.routes.shadow import ShadowTraffic
from services.router.servicer import InferenceFrontServicer
from services.router.settings import RouterSettings
from services.router.usage import UsageLedger
from services.router.waking import ModelWaker

log = logging.getLogger(__name__)

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
HTTP_STOP_GRACE_S = 5
"""How long requests in flight get when the HTTP API is stopped outside a drain (tests)."""


class HttpServer(uvicorn.Server):
    """uvicorn's server, minus its own signal handling: the router drains on SIGTERM itself
    (`run_until_signal`) and stops this server when the drain says so."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Leave the process's signal handlers alone."""
        yield


@dataclass
class RouterParts:
    """A started router: its gateway, servers and what to close, in order."""

    gateway: Gateway
    grpc_server: GrpcServer
    http_server: uvicorn.Server
    http_port: int
    cleanups: list[Callable[[], Awaitable[None]]]
    stop_http: Callable[[float], Awaitable[None]]
    """Close the HTTP listener and give the requests in flight (streams too) that many seconds
    to finish; idle keep-alive connections are closed at once. Also the first of `cleanups`."""


async def start_router(settings: RouterSettings, bus: EventBus | None, *,
                       meter_provider: MeterProvider | None = None) -> RouterParts:
    """Build and start every piece; the caller stops them with `stop_router`. The GenAI
    metrics, when asked for (see `services.router.metrics.genai`), go to `meter_provider`
    (None: the process's)."""
    registry_channel = open_channel(settings.registry_address, settings)
    catalog = AssetCatalog(registry_pb2_grpc.RegistryStub(registry_channel))
    if bus is not None:
        async def on_asset_event(_: events_pb2.Event) -> None:
            catalog.invalidate()

        await bus.subscribe("roundhouse.events.asset.>", on_asset_event)
        bus.on_reconnect(catalog.invalidate)  # events may have been missed meanwhile
    workers = WorkerPool(settings.worker_addresses, refresh_s=settings.worker_refresh_s, settings=settings)
    await workers.start()
    stoppers: list[Callable[[], Awaitable[None]]] = []
    if bus is not None:
        liveness = WorkerLiveness(workers, bus, dead_after_s=settings.dead_after_s())
        await liveness.start()
        stoppers.append(liveness.stop)
    jobs_channel = open_channel(settings.jobs_address, settings)
    jobs = jobs_pb2_grpc.JobsStub(jobs_channel)
    waker = ModelWaker(workers, jobs, wait_s=settings.load_timeout_s)
    limiter, ledger, usage_pool, close_usage = await _start_limits_and_usage(settings)
    remote = RemoteUpstreams(settings.upstream_rules(), touch_s=settings.remote_worker_touch_s)
    metrics = HttpMetrics()
    cache = None
    if bus is not None:
        cache = ResponseCache(bus.nc, max_total_bytes=settings.response_cache_max_bytes,
                              max_entry_bytes=settings.response_cache_max_entry_bytes,
                              registry=metrics.registry)
        await cache.start()
    shadow = ShadowTraffic(max_in_flight=settings.shadow_max_in_flight, registry=metrics.registry)
    gateway = Gateway(catalog, workers, Admission(), waker, limits=limiter, usage=ledger, remote=remote,
                      request_timeout_s=settings.request_timeout_s,
                      stream_idle_timeout_s=settings.stream_idle_timeout_s, cache=cache, shadow=shadow,
                      metrics=RequestMetrics(metrics.registry, GenAIMetrics.if_asked(meter_provider)))

    async def close_routes() -> None:
        await gateway.mirror.close()
        await gateway.caching.flush()
        if cache is not None:
            await cache.close()

    store, authenticator, on_key_revoked = await _start_keys(settings, bus, stoppers, metrics.registry)

    drain = Drain.from_settings(settings)
    stats = admin_stats(gateway, jobs, usage_pool)
    # Apps call the front with API keys, never the internal token; its bodies are capped as
    # the HTTP API's are.
    grpc_server = GrpcServer(settings.router_address, [ServiceBinding(
        inference_pb2_grpc.add_InferenceServicer_to_server,
        InferenceFrontServicer(gateway, authenticator), SERVICE_NAME,
    ), ServiceBinding(admin_pb2_grpc.add_AdminServicer_to_server, AdminServicer(stats, authenticator),
                      ADMIN_SERVICE_NAME)],
        settings, internal=False, max_message_bytes=settings.max_body_bytes, drain=drain,
        refuse_while_draining=True)
    app = create_app(gateway, jobs, max_body_bytes=settings.max_body_bytes,
                     authenticator=authenticator, key_store=store, on_key_revoked=on_key_revoked,
                     metrics_auth=settings.metrics_auth, tracing=settings.otel_console, drain=drain,
                     metrics=metrics, shadow=shadow, stats=stats, bus=bus)
    if bus is not None:
        await bus.subscribe(THRASHING_EVENTS, app.state.metrics.observe_thrashing)
    # httptools parses HTTP (uvicorn's fastest protocol); the loop is the one `main` runs.
    config = uvicorn.Config(app, host=settings.http_host, port=settings.http_port, http="httptools",
                            log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=HTTP_STOP_GRACE_S)
    http_server = HttpServer(config)
    http_task = asyncio.create_task(_serve_http(http_server, settings), name="http")
    while not http_server.started:
        if http_task.done():
            await http_task  # re-raises why it could not start
            raise RuntimeError("HTTP server stopped during start-up")
        await asyncio.sleep(0.01)
    http_port = http_server.servers[0].sockets[0].getsockname()[1]

    async def stop_http(grace: float = HTTP_STOP_GRACE_S) -> None:
        if not http_server.should_exit:
            http_server.config.timeout_graceful_shutdown = math.ceil(grace)
            http_server.should_exit = True
        await http_task

    async def close_channels() -> None:
        await registry_channel.close(None)
        await jobs_channel.close(None)

    return RouterParts(gateway, grpc_server, http_server, http_port,
                       [stop_http, close_routes, close_usage, *stoppers, workers.close, remote.close,
                        close_channels],
                       stop_http)


async def _serve_http(server: uvicorn.Server, settings: RouterSettings) -> None:
    """Serve the HTTP API; a listener that cannot be bound (port taken) fails start-up. uvicorn
    exits the process for it (`SystemExit`), which a task under uvloop would swallow, leaving a
    router that serves nothing."""
    try:
        await server.serve()
    except SystemExit as exc:
        raise RuntimeError(f"the HTTP API could not listen on {settings.http_host}:{settings.http_port}") from exc


async def _start_limits_and_usage(
    settings: RouterSettings,
) -> tuple[Limiter, UsageLedger, asyncpg.Pool, Callable[[], Awaitable[None]]]:
    """The limiter and the usage ledger on one asyncpg pool (no connection is opened before the
    first request), the pool (the admin statistics read the ledger through it), and their
    cleanup: settle what is settling, write the ledger's last rows, close the pool."""
    pool = await create_pool(settings.resolved_database_url(), max_size=settings.limits_pool_size)
    limiter = Limiter(pool, hold_s=settings.limit_reservation_ttl_s,
                      default_completion_tokens=settings.limit_default_completion_tokens,
                      settle_delay_s=settings.limit_settle_delay_s)
    ledger = UsageLedger(pool, flush_s=settings.usage_flush_s,
                         max_buffered=settings.usage_max_buffered)
    ledger.start()

    async def close() -> None:
        await limiter.close()
        await ledger.close()
        await pool.close()

    return limiter, ledger, pool, close


async def _start_keys(
    settings: RouterSettings, bus: EventBus | None, stoppers: list[Callable[[], Awaitable[None]]],
    registry: CollectorRegistry,
) -> tuple[KeyStore, KeyAuthenticator | None, Callable[[str], None]]:
    """The key store on Postgres, the authenticator (None with `auth=disabled`), and what to do
    after a revocation here: drop the key from this router's cache and publish `key.revoked`
    (through the outbox) so every other router drops it too. The outbox relay's figures go to
    `registry` (the one `/metrics` serves)."""
    engine = make_engine(settings.resolved_database_url())
    stoppers.append(engine.dispose)
    sessions = make_sessionmaker(engine)
    store = KeyStore(sessions)
    if settings.admin_key is not None:
        await store.ensure_admin(settings.admin_key.get_secret_value())
    authenticator: KeyAuthenticator | None = None
    if settings.auth == "disabled":
        log.warning("ROUNDHOUSE_AUTH=disabled: API keys are not checked; anyone who reaches "
                    "this router may use every model and the admin API")
    else:
        authenticator = KeyAuthenticator(store, cache_s=settings.key_cache_s)
    relay: OutboxRelay | None = None
    if bus is not None:
        relay = OutboxRelay(sessions, bus, metrics=OutboxMetrics(registry))
        relay.start()
        stoppers.insert(0, relay.stop)
        if authenticator is not None:
            checker = authenticator

            async def on_key_event(event: events_pb2.Event) -> None:
                checker.forget(event.key_name)

            await bus.subscribe("roundhouse.events.key.revoked.>", on_key_event)
            bus.on_reconnect(checker.forget_all)  # revocations may have been missed meanwhile

    def on_key_revoked(name: str) -> None:
        if authenticator is not None:
            authenticator.forget(name)
        if relay is not None:
            relay.notify()

    return store, authenticator, on_key_revoked


async def serve(settings: RouterSettings) -> None:
    """Run the router until SIGTERM/SIGINT, then drain: /readyz and gRPC health report not
    ready and new requests are refused (503 `shutting_down` / UNAVAILABLE) at once, both
    listeners close after the drain delay, and requests and streams in flight get the rest of
    the drain timeout to finish."""
    bus = await EventBus.connect(settings.resolved_nats_url(), name="roundhouse-router",
                                 ensure_stream=False)
    parts = await start_router(settings, bus)
    await run_until_signal(
        parts.grpc_server,
        on_started=lambda port: log.info(
            "router listening: gRPC port %d, HTTP http://%s:%d", port, settings.http_host,
            parts.http_port),
        also_stop=[parts.stop_http],
        cleanups=[*parts.cleanups, bus.close],
    )


def main() -> None:
    """Entry point of `roundhouse router`, on uvloop (a faster event loop than asyncio's own)."""
    settings = RouterSettings()
    setup_telemetry("router", level=settings.log_level, console=settings.otel_console,
                    key_envs=settings.upstream_key_envs)
    uvloop.run(serve(settings))
