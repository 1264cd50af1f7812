"""Composition root of a worker: `roundhouse worker`."""

from __future__ import annotations

import asyncio
import functools
import logging

from roundhouse.v1 import inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.common.events import EventBus
from services.common.grpc_server import GrpcServer, ServiceBinding, run_until_signal
from services.common.metrics_server import MetricsServer
from services.common.modelstore.store import ModelStore
from services.common.secrets import mask_url
from services.common.telemetry import setup_telemetry
from services.worker.heartbeat import Heartbeat
from services.worker.holdings import MIB
from services.worker.loading import load_from_store
from services.worker.metrics import WorkerMetrics
from services.worker.service import ModelHost
from services.worker.servicer import WorkerControlServicer, WorkerInferenceServicer
from services.worker.settings import WorkerSettings

log = logging.getLogger(__name__)

INFERENCE = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
CONTROL = worker_pb2.DESCRIPTOR.services_by_name["WorkerControl"].full_name


class WorkerServer:
    """A worker's gRPC server around a `ModelHost`; the worker's id and address follow its port.

    With a bus, the worker announces itself and heartbeats once it serves. Its Prometheus
    metrics (`metrics`) are served on `worker_metrics_port` when that is set.
    """

    def __init__(self, settings: WorkerSettings, store: ModelStore, bus: EventBus | None = None) -> None:
        self._settings = settings
        loader = functools.partial(load_from_store, upstreams=settings.upstream_rules())
        self.metrics = WorkerMetrics()
        self.host = ModelHost(store=store, memory_budget_bytes=settings.worker_memory_mb * MIB, bus=bus,
                              loader=loader, metrics=self.metrics)
        port = settings.worker_metrics_port
        self._metrics_server = None if port is None else MetricsServer(self.metrics.registry,
                                                                       settings.metrics_host, port)
        self.grpc = GrpcServer(settings.worker_address, [
            ServiceBinding(inference_pb2_grpc.add_InferenceServicer_to_server,
                           WorkerInferenceServicer(self.host), INFERENCE),
            ServiceBinding(worker_pb2_grpc.add_WorkerControlServicer_to_server,
                           WorkerControlServicer(self.host), CONTROL),
        ], settings)
        self._bus = bus
        self._serving = False
        self.heartbeat: Heartbeat | None = None

    async def start(self) -> int:
        """Bind, name the worker after its port, serve (metrics too); returns the gRPC port."""
        port = await self.grpc.start()
        self.serve_metrics()
        self.serving(port)
        return port

    @property
    def metrics_port(self) -> int | None:
        """The port `/metrics` is served on; None when not served."""
        server = self._metrics_server
        return server.port if server is not None and server.port else None

    def serve_metrics(self) -> int | None:
        """Serve `/metrics` on `worker_metrics_port` (logged) unless it is unset or served
        already; returns its port (None: not served)."""
        if self._metrics_server is not None and not self._metrics_server.port:
            self._metrics_server.start("worker")
        return self.metrics_port

    async def stop_metrics(self) -> None:
        """Stop serving `/metrics` (idempotent)."""
        if self._metrics_server is not None:
            await asyncio.to_thread(self._metrics_server.stop)

    def serving(self, port: int) -> None:
        """Name the worker once bound to `port`; heartbeats start when a bus is attached."""
        self.host.identify(self._settings.identity(port), self._settings.advertised(port))
        self._serving = True
        self._start_heartbeat()

    def attach_bus(self, bus: EventBus) -> None:
        """Publish events (and heartbeats, once serving) on `bus` from now on."""
        self._bus = bus
        self.host.attach_bus(bus)
        self._start_heartbeat()

    def _start_heartbeat(self) -> None:
        if self._serving and self._bus is not None and self.heartbeat is None:
            self.heartbeat = Heartbeat(self.host, self._bus, self._settings.worker_heartbeat_s)
            self.heartbeat.start()

    async def stop_heartbeat(self) -> None:
        """Stop heartbeating and announce `worker.down`, so routers stop sending work here."""
        if self.heartbeat is not None:
            await self.heartbeat.stop()

    async def drain(self) -> None:
        """Stop heartbeating and announce `worker.down` (routers stop sending work here), then
        refuse new requests (`ShuttingDown`) and wait for the running ones to finish, for up to
        what is left of the drain timeout."""
        await self.stop_heartbeat()
        await self.host.drain(self.grpc.drain.remaining_s())

    async def stop(self, grace: float = 5.0) -> None:
        """Announce the shutdown, stop serving, then unload every model."""
        await self.stop_heartbeat()
        await self.grpc.stop(grace)
        await self.host.close()
        await self.stop_metrics()


async def serve(settings: WorkerSettings) -> None:
    """Run a worker until SIGTERM/SIGINT, then drain (`WorkerServer.drain`), stop serving and
    unload every model.

    The worker serves at once (its metrics port too, when set); events and heartbeats are
    published once NATS answers.
    """
    worker = WorkerServer(settings, ModelStore.from_settings(settings), bus=None)
    worker.serve_metrics()
    events = asyncio.create_task(_connect_events(settings, worker), name="worker-events")

    async def close_events() -> None:
        if not events.done():
            events.cancel()
            return
        bus = None if events.cancelled() or events.exception() else events.result()
        if bus is not None:
            await bus.close()

    def started(port: int) -> None:
        worker.serving(port)
        log.info("worker %s listening on %s (advertised as %s)", worker.host.worker_id,
                 settings.worker_address.rsplit(":", 1)[0] + f":{port}", worker.host.address)

    await run_until_signal(worker.grpc, on_started=started, before_stop=worker.drain,
                           cleanups=[worker.host.close, close_events, worker.stop_metrics])


async def _connect_events(settings: WorkerSettings, worker: WorkerServer) -> EventBus | None:
    """Connect to NATS (retrying until it answers) and hand the bus to `worker`."""
    try:
        url = settings.resolved_nats_url()
    except RuntimeError as exc:
        log.warning("model events will not be published: %s", exc)
        return None
    bus = await EventBus.connect(url, name="roundhouse-worker", ensure_stream=False)
    worker.attach_bus(bus)
    log.info("publishing model events and heartbeats to %s", mask_url(url))
    return bus


def main() -> None:
    """Entry point of `roundhouse worker`."""
    settings = WorkerSettings()
    setup_telemetry("worker", level=settings.log_level, console=settings.otel_console,
                    key_envs=settings.upstream_key_envs)
    asyncio.run(serve(settings))
