"""Settings shared by every service, read from `ROUNDHOUSE_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.secrets import DEFAULT_UPSTREAM_KEY_ENVS
from services.common.upstreams import UpstreamRules


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

    upstream_key_envs: list[str] = Field(default_factory=lambda: list(DEFAULT_UPSTREAM_KEY_ENVS))
    """Environment variables an asset's `source.api_key_env` may name (JSON list); a
    `ROUNDHOUSE_*` name is refused whatever this says. Their values are scrubbed from logs."""

    allow_link_local_upstreams: bool = False
    """Let `url` sources point at link-local (169.254.0.0/16, fe80::/10) and cloud metadata
    addresses; refused by default. Loopback and private networks are always allowed."""

    def upstream_rules(self) -> UpstreamRules:
        """The upstream policy these settings describe."""
        return UpstreamRules(tuple(self.upstream_key_envs), self.allow_link_local_upstreams)

    def resolved_database_url(self) -> str:
        """The DSN to use: the setting, else the one `roundhouse up` recorded."""
        return self.database_url or _recorded(self.home, "database_url")

    def resolved_nats_url(self) -> str:
        """The NATS URL to use: the setting, else the one `roundhouse up` recorded."""
        return self.nats_url or _recorded(self.home, "nats_url")


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
