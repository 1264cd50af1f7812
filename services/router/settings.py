"""Router settings (`ROUNDHOUSE_*`)."""

from __future__ import annotations

from services.common.settings import FleetSettings


class RouterSettings(FleetSettings):
    """Settings of the router: its two front doors and where it finds the rest."""

    router_address: str = "127.0.0.1:50051"
    """Where the `Inference` gRPC front listens (`host:port`; port 0 picks a free one)."""

    http_host: str = "127.0.0.1"
    """Interface of the OpenAI-compatible HTTP API."""

    http_port: int = 8080
    """Port of the HTTP API (0 picks a free one)."""

    registry_address: str = "127.0.0.1:50052"
    """The registry's gRPC address."""

    jobs_address: str = "127.0.0.1:50053"
    """The jobs service's gRPC address; it loads sleeping models when requests need them."""

    load_timeout_s: float = 120.0
    """How long a request may wait for its sleeping model to wake (load) before 503."""

    max_body_bytes: int = 8 * 1024 * 1024
    """Largest HTTP request body accepted; larger gets 413."""
