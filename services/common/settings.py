"""Settings shared by every service, read from `ROUNDHOUSE_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.secrets import DEFAULT_UPSTREAM_KEY_ENVS
from services.common.upstreams import UpstreamRules

INTERNAL_TOKEN_FILE = "internal_token"
"""Name of the file under `home/run` where `roundhouse up` records the internal token."""


def default_home() -> Path:
    """`~/.roundhouse`: data dir of the embedded stack and the default model store."""
    return Path.home() / ".roundhouse"


class CommonSettings(BaseSettings):
    """Connection settings every service needs. Service settings subclass this."""

    model_config = SettingsConfigDict(env_prefix="ROUNDHOUSE_", extra="ignore")

    home: Path = Field(default_factory=default_home)
    """Data dir: embedded Postgres and NATS data, their recorded URLs, the default model store."""

    database_url: str | None = None
    """Plain Postgres DSN (`postgresql://user@host:5432/db`, or `?host=/socket/dir`).
    Unset: the URL recorded by `roundhouse up` under `home`."""

    nats_url: str | None = None
    """NATS server URL (`nats://127.0.0.1:4222`). Unset: the URL recorded under `home`."""

    log_level: str = "INFO"
    """Python logging level."""

    otel_console: bool = False
    """Print OpenTelemetry spans and metrics to stderr (for debugging)."""

    metrics_host: str = "127.0.0.1"
    """Interface the worker's and the jobs service's Prometheus metrics ports listen on
    (`0.0.0.0` in a container). The router serves `/metrics` on its HTTP port."""

    upstream_key_envs: list[str] = Field(default_factory=lambda: list(DEFAULT_UPSTREAM_KEY_ENVS))
    """Environment variables an asset's `source.api_key_env` may name (JSON list); a
    `ROUNDHOUSE_*` name is refused whatever this says. Their values are scrubbed from logs."""

    allow_link_local_upstreams: bool = False
    """Let `url` sources point at link-local (169.254.0.0/16, fe80::/10) and cloud metadata
    addresses; refused by default. Loopback and private networks are always allowed."""

    internal_token: SecretStr | None = None
    """Shared secret of the internal services (registry, jobs, workers): set, they refuse gRPC
    calls without it (`x-roundhouse-internal-token` metadata), health and reflection aside, and
    every client sends it. `roundhouse up` makes a fresh one on each start and records it under
    `home`. The router's public `Inference` front never asks for it (apps use API keys)."""

    tls_cert: Path | None = None
    """PEM certificate chain this service's gRPC server presents; with `tls_key`, it serves
    TLS only."""

    tls_key: Path | None = None
    """PEM private key of `tls_cert`."""

    tls_ca: Path | None = None
    """PEM CA certificates gRPC clients (services and CLI) trust. Set (or `tls_cert` set),
    clients connect over TLS; without it they trust the system's roots."""

    drain_delay_s: float = Field(default=0.0, ge=0)
    """Seconds between SIGTERM and closing the listener (`ROUNDHOUSE_DRAIN_DELAY_S`), so a load
    balancer sees the readiness probe fail before connections are refused; meanwhile new
    requests are refused with 503 `shutting_down` and a Retry-After (UNAVAILABLE over gRPC)."""

    drain_timeout_s: float = Field(default=60.0, ge=0)
    """Seconds after SIGTERM that requests and streams in flight (and a jobs instance's running
    operations) get to finish (`ROUNDHOUSE_DRAIN_TIMEOUT_S`); then what is left is cut (running
    operations go back to the queue) and the process exits."""

    def upstream_rules(self) -> UpstreamRules:
        """The upstream policy these settings describe."""
        return UpstreamRules(tuple(self.upstream_key_envs), self.allow_link_local_upstreams)

    def resolved_database_url(self) -> str:
        """The DSN to use: the setting, else the one `roundhouse up` recorded."""
        return self.database_url or _recorded(self.home, "database_url")

    def resolved_nats_url(self) -> str:
        """The NATS URL to use: the setting, else the one `roundhouse up` recorded."""
        return self.nats_url or _recorded(self.home, "nats_url")

    def resolved_internal_token(self) -> str | None:
        """The token clients send: the setting, else the one a running `roundhouse up` recorded
        under `home`, else None (servers require only the setting itself)."""
        if self.internal_token is not None:
            return self.internal_token.get_secret_value()
        try:
            return (self.home / "run" / INTERNAL_TOKEN_FILE).read_text().strip() or None
        except FileNotFoundError:
            return None

    def client_tls(self) -> bool:
        """Whether gRPC clients connect over TLS."""
        return self.tls_ca is not None or self.tls_cert is not None


class FleetSettings(CommonSettings):
    """How a service finds the workers and tells whether they are alive (router, jobs)."""

    worker_addresses: list[str] = Field(default_factory=lambda: ["127.0.0.1:50061"])
    """Workers known from the start (`host:port`, JSON list in the environment); workers that
    heartbeat on NATS are discovered whatever this says."""

    worker_refresh_s: float = Field(default=2.0, gt=0)
    """How often each worker is asked what it holds."""

    worker_heartbeat_s: float = Field(default=2.0, gt=0)
    """How often workers heartbeat (`ROUNDHOUSE_WORKER_HEARTBEAT_S`); sets the default below."""

    worker_dead_after_s: float | None = Field(default=None, gt=0)
    """A worker silent this long is declared dead (`ROUNDHOUSE_WORKER_DEAD_AFTER_S`).
    Unset: three heartbeats."""

    def dead_after_s(self) -> float:
        """Seconds of silence after which a worker is declared dead."""
        return self.worker_dead_after_s or 3 * self.worker_heartbeat_s


def _recorded(home: Path, name: str) -> str:
    path = home / "run" / name
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        raise RuntimeError(
            f"ROUNDHOUSE_{name.upper()} is not set and no running `roundhouse up` recorded one "
            f"at {path}"
        ) from None


def async_database_url(dsn: str) -> str:
    """Turn a plain Postgres DSN into the SQLAlchemy asyncpg URL.

    Accepts `postgresql://`, `postgres://` and already-qualified `postgresql+asyncpg://` URLs;
    a `?host=/socket/dir` query is kept (asyncpg reads it as a Unix socket directory).
    """
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgresql", "postgres", "postgresql+asyncpg"):
        raise ValueError(f"not a Postgres DSN: {parts.scheme}://...")
    query = urlencode(parse_qsl(parts.query))
    return urlunsplit(("postgresql+asyncpg", parts.netloc, parts.path, query, parts.fragment))
