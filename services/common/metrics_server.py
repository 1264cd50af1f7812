"""A Prometheus `/metrics` endpoint of its own, for the services that serve no HTTP (workers,
the jobs service): `ROUNDHOUSE_WORKER_METRICS_PORT`, `ROUNDHOUSE_JOBS_METRICS_PORT`."""

from __future__ import annotations

import logging
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)


class MetricsServer:
    """Serves `registry` in the Prometheus text format on `host:port` (0: a free port), from a
    thread of its own, so a scrape never waits on the service's event loop."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry = registry
        self._host = host
        self._port = port
        self._server: WSGIServer | None = None
        self.port = 0

    def start(self, service: str) -> int:
        """Start serving; returns (and logs) the bound port."""
        self._server, _ = start_http_server(self._port, addr=self._host, registry=self.registry)
        self.port = self._server.server_port
        log.info("%s metrics on http://%s:%d/metrics", service, self._host, self.port)
        return self.port

    def stop(self) -> None:
        """Stop serving (idempotent)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
            self.port = 0
