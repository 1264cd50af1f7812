"""Composition root of the jobs service: `roundhouse jobs`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from roundhouse.v1 import jobs_pb2, jobs_pb2_grpc
from services.common.db.engine import make_engine, make_sessionmaker
from services.common.events import EventBus
from services.common.grpc_server import GrpcServer, ServiceBinding, run_until_signal
from services.common.liveness import WorkerLiveness
from services.common.metrics_server import MetricsServer
from services.common.modelstore import ModelStore
from services.common.outbox import OutboxRelay
from services.common.telemetry import setup_telemetry
from services.common.workerpool import WorkerPool
from services.jobs.executor import Executor
from services.jobs.install import GIB, InstallRunner
from services.jobs.loading import LoadRunner, ProfileRunner, UnloadRunner
from services.jobs.metrics import InProgressSampler, JobsMetrics
from services.jobs.model import OperationRecord
from services.jobs.reconciler import Reconciler
from services.jobs.registry_client import RegistryClient
from services.jobs.repository import OperationRepository
from services.jobs.runners import DeleteRunner, Runner
from services.jobs.service import JobService
from services.jobs.servicer import JobsServicer
from services.jobs.settings import JobsSettings
from services.jobs.storage import StorageReport
from services.jobs.thrashing import ThrashingMonitor
from services.jobs.watch import ChangeNotifier

log = logging.getLogger(__name__)

SERVICE_NAME = jobs_pb2.DESCRIPTOR.services_by_name["Jobs"].full_name


def storage_quota(settings: JobsSettings) -> int | None:
    """The model store's quota in bytes (`ROUNDHOUSE_MAX_STORAGE_GB`); None: no quota."""
    return int(settings.max_storage_gb * GIB) if settings.max_storage_gb else None


def default_runners(
    store: ModelStore, registry: RegistryClient, pool: WorkerPool, settings: JobsSettings,
    thrashing: ThrashingMonitor | None = None,
) -> dict[str, Runner]:
    """The runner of every operation type; loads report evictions to `thrashing`."""
    load = LoadRunner(pool, registry, load_call_s=settings.jobs_load_timeout_s, thrashing=thrashing)
    return {
        "install": InstallRunner(store, registry, max_storage_bytes=storage_quota(settings)),
        "delete": DeleteRunner(store, registry),
        "load": load,
        "unload": UnloadRunner(pool, registry),
        "profile": ProfileRunner(pool, load),
    }


@dataclass
class JobsApp:
    """The assembled service: its gRPC server, the executor, and what to close at the end."""

    server: GrpcServer
    executor: Executor
    service: JobService
    reconciler: Reconciler | None
    """None when this instance does not reconcile (`ROUNDHOUSE_JOBS_RECONCILE=false`)."""
    cleanups: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    metrics: JobsMetrics = field(default_factory=JobsMetrics)
    metrics_port: int | None = None
    """Where `/metrics` is served (`ROUNDHOUSE_JOBS_METRICS_PORT`); None when it is not."""

    async def start(self) -> int:
        """Serve gRPC, start running operations and reconciling; returns the bound port."""
        port = await self.server.start()
        self.begin()
        return port

    def begin(self) -> None:
        """Start running operations and reconciling (the server is already serving)."""
        self.executor.start()
        if self.reconciler is not None:
            self.reconciler.start()

    async def drain(self) -> None:
        """Reconcile and claim nothing more; let running operations finish within what is left of
        the drain timeout, then hand those still running back to the queue (lease released)."""
        if self.reconciler is not None:
            await self.reconciler.stop()
        await self.executor.stop(self.server.drain.remaining_s())

    async def stop(self, grace: float = 5.0) -> None:
        """Stop serving, hand running operations back to the queue, close connections."""
        await self.server.stop(grace)
        for cleanup in self.cleanups:
            try:
                await cleanup()
            except Exception:  # noqa: BLE001 - keep shutting the rest down
                log.exception("cleanup failed")


async def build_app(
    settings: JobsSettings,
    runners: Callable[[ModelStore, RegistryClient], Mapping[str, Runner]] | None = None,
) -> JobsApp:
    """Wire the jobs service from settings; `runners` replaces the table of runners. Serves
    `/metrics` from here when `jobs_metrics_port` is set: first, so that a port already taken
    fails start-up before anything else has started."""
    metrics = JobsMetrics()
    exporter = None
    if settings.jobs_metrics_port is not None:
        exporter = MetricsServer(metrics.registry, settings.metrics_host, settings.jobs_metrics_port)
        exporter.start("jobs")
    engine = make_engine(settings.resolved_database_url())
    bus = await EventBus.connect(settings.resolved_nats_url(), name="roundhouse-jobs")
    sessions = make_sessionmaker(engine)
    relay = OutboxRelay(sessions, bus, metrics=metrics.outbox)
    relay.start()
    notifier = ChangeNotifier()

    def on_change(operation_id: str, record: OperationRecord) -> None:
        relay.notify()
        notifier.notify(operation_id, record)
        sampler.changed()
        if record.terminal:
            metrics.finished(record)

    repository = OperationRepository(sessions, on_change=on_change)
    sampler = InProgressSampler(repository, metrics)
    sampler.start()
    registry = RegistryClient(settings.registry_address, settings)
    store = ModelStore.from_settings(settings)
    pool = WorkerPool(settings.worker_addresses, refresh_s=settings.worker_refresh_s, settings=settings)
    await pool.start()
    thrashing = ThrashingMonitor(sessions, evictions=settings.jobs_thrashing_evictions,
                                 window_s=settings.jobs_thrashing_window_s,
                                 hold_s=settings.jobs_thrashing_hold_s, on_commit=relay.notify)
    table = (runners(store, registry) if runners
             else default_runners(store, registry, pool, settings, thrashing))
    executor = Executor(
        repository, table,
        instance_id=settings.jobs_instance_id,
        workers=settings.jobs_workers,
        lease_s=settings.jobs_lease_s,
        poll_interval_s=settings.jobs_poll_interval_s,
        timeouts=settings.timeouts(),
        backoff_s=settings.jobs_retry_backoff_s,
        backoff_max_s=settings.jobs_retry_backoff_max_s,
        cancel_grace_s=settings.jobs_cancel_grace_s,
    )
    service = JobService(repository, executor, registry, notifier, pool,
                         max_attempts=settings.jobs_max_attempts,
                         failure_cooldown_s=settings.load_failure_cooldown_s)
    reconciler = Reconciler(repository, executor, registry, pool, store,
                            interval_s=settings.reconcile_interval_s,
                            sleep_unit_s=settings.auto_sleep_unit_s,
                            failure_cooldown_s=settings.load_failure_cooldown_s,
                            max_attempts=settings.jobs_max_attempts) if settings.jobs_reconcile else None
    # The router announces dead workers; this service only adopts the verdict and reacts.
    liveness = WorkerLiveness(pool, bus, dead_after_s=settings.dead_after_s(), announce=False,
                              on_down=reconciler.poke if reconciler else None)
    await liveness.start()
    servicer = JobsServicer(service, StorageReport(store, registry, storage_quota(settings)))
    server = GrpcServer(settings.jobs_address, [
        ServiceBinding(jobs_pb2_grpc.add_JobsServicer_to_server, servicer, SERVICE_NAME)
    ], settings)
    stops = [reconciler.stop] if reconciler else []

    async def stop_metrics() -> None:
        if exporter is not None:
            exporter.stop()

    return JobsApp(server, executor, service, reconciler,
                   [*stops, executor.stop, liveness.stop, pool.close, relay.stop, sampler.stop,
                    stop_metrics, registry.close, bus.close, engine.dispose],
                   metrics, exporter.port if exporter else None)


async def serve(settings: JobsSettings) -> None:
    """Run the jobs service until SIGTERM/SIGINT, then drain (`JobsApp.drain`) and stop."""
    app = await build_app(settings)

    def started(port: int) -> None:
        app.begin()
        log.info("jobs listening on port %d as instance %s", port, settings.jobs_instance_id)

    await run_until_signal(app.server, on_started=started, before_stop=app.drain, cleanups=app.cleanups)


def main() -> None:
    """Entry point of `roundhouse jobs`."""
    settings = JobsSettings()
    setup_telemetry("jobs", level=settings.log_level, console=settings.otel_console,
                    key_envs=settings.upstream_key_envs)
    asyncio.run(serve(settings))
