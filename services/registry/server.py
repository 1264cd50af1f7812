"""Composition root of the registry service: `roundhouse registry`."""

from __future__ import annotations

import asyncio
import logging

from roundhouse.v1 import registry_pb2, registry_pb2_grpc
from services.common.db.engine import make_engine, make_sessionmaker
from services.common.events import EventBus
from services.common.grpc_server import GrpcServer, ServiceBinding, run_until_signal
from services.common.outbox import OutboxRelay
from services.common.telemetry import setup_telemetry
from services.registry.service import AssetRegistry
from services.registry.servicer import RegistryServicer
from services.registry.settings import RegistrySettings

log = logging.getLogger(__name__)

SERVICE_NAME = registry_pb2.DESCRIPTOR.services_by_name["Registry"].full_name


async def serve(settings: RegistrySettings) -> None:
    """Run the registry until SIGTERM/SIGINT."""
    engine = make_engine(settings.resolved_database_url())
    sessions = make_sessionmaker(engine)
    bus = await EventBus.connect(settings.resolved_nats_url(), name="roundhouse-registry")
    relay = OutboxRelay(sessions, bus)
    relay.start()
    registry = AssetRegistry(sessions, on_commit=relay.notify)
    servicer = RegistryServicer(registry, settings.resolved_source_roots(), settings.upstream_rules())
    server = GrpcServer(
        settings.registry_address,
        [ServiceBinding(registry_pb2_grpc.add_RegistryServicer_to_server, servicer, SERVICE_NAME)],
        settings,
    )
    await run_until_signal(
        server,
        on_started=lambda port: log.info("registry listening on port %d", port),
        cleanups=[relay.stop, bus.close, engine.dispose],
    )


def main() -> None:
    """Entry point of `roundhouse registry`."""
    settings = RegistrySettings()
    setup_telemetry("registry", level=settings.log_level, console=settings.otel_console,
                    key_envs=settings.upstream_key_envs)
    asyncio.run(serve(settings))
