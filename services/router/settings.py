"""Router settings (`ROUNDHOUSE_*`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from services.common.keys.tokens import operator_secret
from services.common.settings import FleetSettings
from services.router.cache.store import DEFAULT_MAX_ENTRY_BYTES, DEFAULT_MAX_TOTAL_BYTES
from services.router.deadlines import DEFAULT_REQUEST_TIMEOUT_S, DEFAULT_STREAM_IDLE_TIMEOUT_S
from services.router.remote import DEFAULT_TOUCH_S


class RouterSettings(FleetSettings):
    """Settings of the router: its two front doors and where it finds the rest."""

    # A refused value is never echoed in the error: it may be the admin key.
    model_config = SettingsConfigDict(hide_input_in_errors=True)

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

    request_timeout_s: float = Field(default=DEFAULT_REQUEST_TIMEOUT_S, gt=0)
    """How long one request may take in all, queue wait and wake included
    (`ROUNDHOUSE_REQUEST_TIMEOUT_S`); past it the request ends with 504 `timeout` (a stream
    already started ends with an error event) and its worker call is cancelled. A client may ask
    for less: the `x-request-timeout` header (seconds) over HTTP, its deadline over gRPC."""

    stream_idle_timeout_s: float = Field(default=DEFAULT_STREAM_IDLE_TIMEOUT_S, gt=0)
    """Longest silence allowed between two streamed chunks from a worker or remote upstream
    (`ROUNDHOUSE_STREAM_IDLE_TIMEOUT_S`; the first chunk may also take the queue wait); past it
    the request ends as past its deadline."""

    limit_reservation_ttl_s: float = Field(default=900.0, gt=0)
    """How long a request's reservation against its key's limits lives if its router never
    settles it (a crash): then its max_parallel slot is freed; its estimate stays charged."""

    limit_default_completion_tokens: int = Field(default=256, gt=0)
    """Completion tokens reserved for a request without `max_tokens` when its asset sets no
    `generation.max_tokens` (what it really used is charged when it ends)."""

    limit_settle_delay_s: float = Field(default=0.05, ge=0)
    """How long a finished request's settle (its real usage replacing its estimate, its
    max_parallel slot freed) waits for the key's next request on this router to carry it in
    its own reservation statement before it is sent on its own. Within this router the next
    request always sees it settled; other routers see the slot and the estimate held up to
    this much longer (never more admitted than the limits allow)."""

    limits_pool_size: int = Field(default=10, gt=0)
    """Postgres connections of the limits and usage ledger (one statement per limited request)."""

    usage_flush_s: float = Field(default=0.5, gt=0)
    """How often the usage ledger writes its buffered rows to Postgres."""

    usage_max_buffered: int = Field(default=100_000, gt=0)
    """Ledger rows kept in memory while Postgres is away; beyond it the oldest are dropped
    (and logged)."""

    remote_worker_touch_s: float = Field(default=DEFAULT_TOUCH_S, gt=0)
    """Chats for a remote (`runtime: openai`) asset go from the router straight to its upstream,
    except one per this many seconds per asset and worker, which goes through the worker holding
    it so that the worker's idle clock (auto-sleep, eviction order) sees the asset in use. Keep
    it well below the shortest auto-sleep."""

    response_cache_max_bytes: int = Field(default=DEFAULT_MAX_TOTAL_BYTES, gt=0)
    """Bound of the routes' shared response cache, all entries together
    (`ROUNDHOUSE_RESPONSE_CACHE_MAX_BYTES`); past it the oldest entries go. Set by the first
    router that creates the NATS bucket."""

    response_cache_max_entry_bytes: int = Field(default=DEFAULT_MAX_ENTRY_BYTES, gt=0)
    """Largest answer a route's cache keeps when the route sets no `cache.max_bytes`
    (`ROUNDHOUSE_RESPONSE_CACHE_MAX_ENTRY_BYTES`)."""

    shadow_max_in_flight: int = Field(default=4, gt=0)
    """Shadow copies one router runs at once per route and shadow asset
    (`ROUNDHOUSE_SHADOW_MAX_IN_FLIGHT`); more are dropped and counted as `saturated`."""

    auth: Literal["enabled", "disabled"] = "enabled"
    """API keys on every `/v1` and `/admin/v1` route and on the gRPC front (`ROUNDHOUSE_AUTH`).
    `disabled` turns every check off (a warning is logged at start): for trusted networks only."""

    metrics_auth: bool = False
    """`/metrics` needs a key too (`ROUNDHOUSE_METRICS_AUTH=true`); open otherwise."""

    key_cache_s: float = Field(default=10.0, gt=0)
    """How long a router trusts a key it looked up before asking Postgres again; a revocation
    reaches every router at once anyway (a `key.revoked` event)."""

    admin_key: SecretStr | None = None
    """The admin key's secret (`ROUNDHOUSE_ADMIN_KEY`, `rh-...`): the router stores its hash as the
    admin key at start, and the CLI sends it. Surrounding whitespace (the newline of a secret
    mounted from a file) is stripped; anything but a Roundhouse key fails at start. Unset:
    `roundhouse up` makes one and writes it to `$ROUNDHOUSE_HOME/admin.key`, which the CLI reads."""

    router_url: str | None = None
    """Base URL of the router's HTTP API for the CLI (`ROUNDHOUSE_ROUTER_URL`). Unset:
    `http://<http_host>:<http_port>`."""

    @field_validator("admin_key", mode="after")
    @classmethod
    def _admin_key_is_a_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        return SecretStr(operator_secret(value.get_secret_value(), "ROUNDHOUSE_ADMIN_KEY"))

    def resolved_router_url(self) -> str:
        """The router's HTTP base URL, without a trailing slash."""
        if self.router_url:
            return self.router_url.rstrip("/")
        host = "127.0.0.1" if self.http_host in ("0.0.0.0", "::", "") else self.http_host
        return f"http://{host}:{self.http_port}"
