"""An in-process registry (real gRPC server, Postgres, NATS) for tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from roundhouse.v1 import registry_pb2_grpc
from services.common.db.engine import make_engine, make_sessionmaker
from services.common.events import EventBus
from services.common.grpc_client import open_channel
from services.common.grpc_server import GrpcServer, ServiceBinding
from services.common.outbox import OutboxRelay
from services.common.settings import CommonSettings
from services.common.upstreams import DEFAULT_UPSTREAM_RULES, UpstreamRules
from services.registry.server import SERVICE_NAME
from services.registry.service import AssetRegistry
from services.registry.servicer import RegistryServicer


@dataclass
class RunningRegistry:
    """Address and typed stub of a registry started by `running_registry`."""

    address: str
    channel: grpc.aio.Channel
    stub: registry_pb2_grpc.RegistryStub


@asynccontextmanager
async def running_registry(
    dsn: str, nats_url: str, source_roots: list[Path],
    upstreams: UpstreamRules = DEFAULT_UPSTREAM_RULES, settings: CommonSettings | None = None,
) -> AsyncIterator[RunningRegistry]:
    """Start the registry service on 127.0.0.1:0 and yield a stub for it; `upstreams` is its
    upstream policy (the default settings' unless given). `settings`: its TLS and internal
    token, which the stub uses too (none by default)."""
    engine = make_engine(dsn)
    bus = await EventBus.connect(nats_url, name="test-registry")
    relay = OutboxRelay(make_sessionmaker(engine), bus)
    relay.start()
    registry = AssetRegistry(make_sessionmaker(engine), on_commit=relay.notify)
    server = GrpcServer("127.0.0.1:0", [ServiceBinding(
        registry_pb2_grpc.add_RegistryServicer_to_server,
        RegistryServicer(registry, source_roots, upstreams),
        SERVICE_NAME,
    )], settings)
    port = await server.start()
    address = f"127.0.0.1:{port}"
    channel = open_channel(address, settings, [("grpc.max_send_message_length", 64 * 1024 * 1024)])
    try:
        yield RunningRegistry(address, channel, registry_pb2_grpc.RegistryStub(channel))
    finally:
        await channel.close(grace=None)
        await server.stop(1)
        await relay.stop()
        await bus.close()
        await engine.dispose()
