"""Registry settings (`ROUNDHOUSE_*`)."""

from __future__ import annotations

from services.common.modelstore.settings import StoreSettings


class RegistrySettings(StoreSettings):
    """Settings of the registry service; source roots decide which `path` sources are valid."""

    registry_address: str = "127.0.0.1:50052"
    """Where the Registry gRPC server listens (`host:port`; port 0 picks a free one)."""
