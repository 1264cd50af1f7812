"""Worker settings (`ROUNDHOUSE_*`)."""

from __future__ import annotations

import socket

from pydantic import Field

from services.common.modelstore.settings import StoreSettings


class WorkerSettings(StoreSettings):
    """Settings of one worker process."""

    worker_address: str = "127.0.0.1:50061"
    """Where the worker's gRPC server listens (`host:port`; port 0 picks a free one)."""

    worker_advertise_address: str = ""
    """The address others dial to reach this worker. Empty: the bound host and port."""

    worker_id: str = ""
    """Stable id of this worker. Empty: `worker-<hostname>-<port>`."""

    worker_metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """Port of this worker's Prometheus `/metrics` (`ROUNDHOUSE_WORKER_METRICS_PORT`; 0 picks a
    free one and logs it). Unset: no metrics port. `roundhouse up` sets one per worker."""

    worker_memory_mb: int = Field(default=4096, gt=0)
    """Memory this worker may use for models, in MiB (`ROUNDHOUSE_WORKER_MEMORY_MB`); loads
    beyond it are refused."""

    worker_heartbeat_s: float = Field(default=2.0, gt=0)
    """Seconds between the worker's heartbeats on NATS (`ROUNDHOUSE_WORKER_HEARTBEAT_S`)."""

    def advertised(self, port: int) -> str:
        """The address to announce once bound to `port`."""
        if self.worker_advertise_address:
            return self.worker_advertise_address
        host = self.worker_address.rsplit(":", 1)[0]
        return f"{'127.0.0.1' if host in ('0.0.0.0', '[::]', '') else host}:{port}"

    def identity(self, port: int) -> str:
        """The worker id to use once bound to `port`."""
        return self.worker_id or f"worker-{socket.gethostname()}-{port}"
