"""Composition root of the router: gRPC `Inference` front plus the HTTP API, one process."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
import uvicorn

from roundhouse.v1 import events_pb2, inference_pb2, inference_pb2_grpc, jobs_pb2_grpc, registry_pb2_grpc
from services.common.events import EventBus
from services.common.grpc_server import GrpcServer, ServiceBinding, run_until_signal
from services.common.liveness import WorkerLiveness
from services.common.telemetry import setup_telemetry
from services.common.workerpool import WorkerPool
from services.router.admission import Admission
from services.router.catalog import AssetCatalog
from services.router.gateway import Gateway
from services.router.http.app import create_app
from services.router.servicer import InferenceFrontServicer
from services.router.settings import RouterSettings
from services.router.waking import ModelWaker

log = logging.getLogger(__name__)

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name


@dataclass
class RouterParts:
    """A started router: its gateway, servers and what to close, in order."""

    gateway: Gateway
    grpc_server: GrpcServer
    http_server: uvicorn.Server
    http_port: int
    cleanups: list[Callable[[], Awaitable[None]]]


async def start_router(settings: RouterSettings, bus: EventBus | None) -> RouterParts:
    """Build and start every piece; the caller stops them with `stop_router`."""
    registry_channel = grpc.aio.insecure_channel(settings.registry_address)
    catalog = AssetCatalog(registry_pb2_grpc.RegistryStub(registry_channel))
    if bus is not None:
        async def on_asset_event(_: events_pb2.Event) -> None:
            catalog.invalidate()

        await bus.subscribe("roundhouse.events.asset.>", on_asset_event)
        bus.on_reconnect(catalog.invalidate)  # events may have been missed meanwhile
    workers = WorkerPool(settings.worker_addresses, refresh_s=settings.worker_refresh_s)
    await workers.start()
    stoppers: list[Callable[[], Awaitable[None]]] = []
    if bus is not None:
        liveness = WorkerLiveness(workers, bus, dead_after_s=settings.dead_after_s())
        await liveness.start()
        stoppers.append(liveness.stop)
    jobs_channel = grpc.aio.insecure_channel(settings.jobs_address)
    jobs = jobs_pb2_grpc.JobsStub(jobs_channel)
    waker = ModelWaker(workers, jobs, wait_s=settings.load_timeout_s)
    gateway = Gateway(catalog, workers, Admission(), waker)

    grpc_server = GrpcServer(settings.router_address, [ServiceBinding(
        inference_pb2_grpc.add_InferenceServicer_to_server, InferenceFrontServicer(gateway),
        SERVICE_NAME,
    )])
    app = create_app(gateway, jobs, max_body_bytes=settings.max_body_bytes)
    config = uvicorn.Config(app, host=settings.http_host, port=settings.http_port,
                            log_level="warning", lifespan="off", timeout_graceful_shutdown=5)
    http_server = uvicorn.Server(config)
    http_task = asyncio.create_task(http_server.serve(), name="http")
    while not http_server.started:
        if http_task.done():
            await http_task  # re-raises why it could not start
            raise RuntimeError("HTTP server stopped during start-up")
        await asyncio.sleep(0.01)
    http_port = http_server.servers[0].sockets[0].getsockname()[1]

    async def stop_http() -> None:
        http_server.should_exit = True
        await http_task

    async def close_channels() -> None:
        await registry_channel.close(None)
        await jobs_channel.close(None)

    return RouterParts(gateway, grpc_server, http_server, http_port,
                       [stop_http, *stoppers, workers.close, close_channels])


async def serve(settings: RouterSettings) -> None:
    """Run the router until SIGTERM/SIGINT."""
    bus = await EventBus.connect(settings.resolved_nats_url(), name="roundhouse-router",
                                 ensure_stream=False)
    parts = await start_router(settings, bus)
    await run_until_signal(
        parts.grpc_server,
        on_started=lambda port: log.info(
            "router listening: gRPC port %d, HTTP http://%s:%d", port, settings.http_host,
            parts.http_port),
        cleanups=[*parts.cleanups, bus.close],
    )


def main() -> None:
    """Entry point of `roundhouse router`."""
    settings = RouterSettings()
    setup_telemetry("router", level=settings.log_level, console=settings.otel_console)
    asyncio.run(serve(settings))
