"""Router settings (`ROUNDHOUSE_*`)."""

from __future__ import annotations

from pydantic import Field

from services.common.settings import CommonSettings


class RouterSettings(CommonSettings):
    """Settings of the router: its two front doors and where it finds the rest."""

    router_address: str = "127.0.0.1:50051"
    """Where the `Inference` gRPC front listens (`host:port`; port 0 picks a free one)."""

    http_host: str = "127.0.0.1"
    """Interface of the OpenAI-compatible HTTP API."""

    http_port: int = 8080
    """Port of the HTTP API (0 picks a free one)."""

    registry_address: str = "127.0.0.1:50052"
    """The registry's gRPC address."""

    worker_addresses: list[str] = Field(default_factory=lambda: ["127.0.0.1:50061"])
    """Workers to route to (`host:port`, JSON list in the environment)."""

    worker_refresh_s: float = 2.0
    """How often the router asks each worker what it holds."""

    worker_heartbeat_s: float = Field(default=2.0, gt=0)
    """How often workers heartbeat (`ROUNDHOUSE_WORKER_HEARTBEAT_S`); sets the default below."""

    worker_dead_after_s: float | None = Field(default=None, gt=0)
    """A worker silent this long is declared dead (`ROUNDHOUSE_WORKER_DEAD_AFTER_S`).
    Unset: three heartbeats."""

    load_timeout_s: float = 120.0
    """How long a request may wait for its model to load before 503."""

    max_body_bytes: int = 8 * 1024 * 1024
    """Largest HTTP request body accepted; larger gets 413."""

    def dead_after_s(self) -> float:
        """Seconds of silence after which a worker is declared dead."""
        return self.worker_dead_after_s or 3 * self.worker_heartbeat_s
