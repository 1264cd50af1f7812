"""Typed SQLAlchemy models of every Roundhouse table.

The schema itself is owned by the alembic history in `services.common.migrations`; these
models mirror it (same names, types, defaults and indexes) so queries are typed. A change
here needs a new hand-written migration.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    LargeBinary,
    MetaData,
    Numeric,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
"""Constraint names are derived, never left to the database, so migrations can name them."""

JSON_OBJECT = text("'{}'::jsonb")


class Base(DeclarativeBase):
    """Declarative base: shared metadata with the naming convention and type mapping."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        str: Text(),
        dict[str, Any]: JSONB(),
        list[str]: ARRAY(Text()),
        datetime: DateTime(timezone=True),
        bytes: LargeBinary(),
    }


def _created_at() -> Mapped[datetime]:
    return mapped_column(server_default=func.now())


def _updated_at() -> Mapped[datetime]:
    return mapped_column(server_default=func.now(), onupdate=func.now())


class Asset(Base):
    """A declared model or route: its spec (desired state) and what was last observed of it."""

    __tablename__ = "assets"
    __table_args__ = (
        Index("ix_assets_interfaces", "interfaces", postgresql_using="gin"),
        Index("ix_assets_runtime", "runtime"),
        Index("ix_assets_state", "state"),
        Index("ix_assets_asset_class", "asset_class"),
    )

    asset_id: Mapped[str] = mapped_column(primary_key=True)
    asset_class: Mapped[str] = mapped_column(server_default="model")
    """`model`, or `route` (an asset that answers with other assets; no runtime)."""
    spec: Mapped[dict[str, Any]]
    """The AssetSpec as a JSON object."""
    revision: Mapped[int] = mapped_column(BigInteger)
    """Bumped on every change of the spec; used for optimistic concurrency."""
    interfaces: Mapped[list[str]] = mapped_column(server_default=text("'{}'::text[]"))
    runtime: Mapped[str]
    desired: Mapped[str]
    labels: Mapped[dict[str, Any]] = mapped_column(server_default=JSON_OBJECT)
    state: Mapped[str] = mapped_column(server_default="registered")
    """Observed state name: `registered`, `installed`, `loaded`, ..."""
    status: Mapped[dict[str, Any]] = mapped_column(server_default=JSON_OBJECT)
    """The rest of the observed status (where it is loaded, install path, errors...)."""
    capabilities: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()


class AssetAlias(Base):
    """Another name of an asset; an alias names at most one asset."""

    __tablename__ = "asset_aliases"
    __table_args__ = (Index("ix_asset_aliases_asset_id", "asset_id"),)

    alias: Mapped[str] = mapped_column(primary_key=True)
    asset_id: Mapped[str] = mapped_column(ForeignKey("assets.asset_id", ondelete="CASCADE"))


ACTIVE_LOAD = "type = 'load' AND status IN ('queued', 'running')"
"""Operations that are a load still under way."""


class Operation(Base):
    """A durable operation (install, load, unload, delete, profile) and its progress."""

    __tablename__ = "operations"
    __table_args__ = (
        CheckConstraint("progress >= 0 AND progress <= 100", name="progress_range"),
        Index("ix_operations_status_created_at", "status", "created_at"),
        Index("ix_operations_asset_id", "asset_id"),
        # One load of an asset at a time: concurrent wake-ups join the active one.
        Index("uq_operations_active_load", "asset_id", unique=True,
              postgresql_where=text(ACTIVE_LOAD)),
    )

    operation_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    type: Mapped[str]
    asset_id: Mapped[str]
    status: Mapped[str] = mapped_column(server_default="queued")
    progress: Mapped[int] = mapped_column(server_default=text("0"))
    message: Mapped[str] = mapped_column(server_default="")
    error: Mapped[str | None]
    attempts: Mapped[int] = mapped_column(server_default=text("0"))
    max_attempts: Mapped[int] = mapped_column(server_default=text("3"))
    idempotency_key: Mapped[str | None] = mapped_column(unique=True)
    worker_id: Mapped[str | None]
    force: Mapped[bool] = mapped_column(server_default=text("false"))
    params: Mapped[dict[str, Any]] = mapped_column(server_default=JSON_OBJECT)
    lease_owner: Mapped[str | None]
    """The jobs instance running it; another may take it over once the lease expires."""
    lease_expires_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = _created_at()
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = _updated_at()
    trace_context: Mapped[str] = mapped_column(server_default="")
    """`traceparent` of the submitter's span: the operation runs inside that trace."""
    request_id: Mapped[str] = mapped_column(server_default="")
    """`x-request-id` of the request that submitted it; empty outside one."""


class OutboxEvent(Base):
    """An event written in the same transaction as the change it reports.

    The outbox relay publishes unpublished rows in `id` order and stamps `published_at`.
    """

    __tablename__ = "outbox"
    __table_args__ = (
        Index(
            "ix_outbox_unpublished",
            "id",
            postgresql_where=text("published_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    event_id: Mapped[uuid.UUID] = mapped_column(unique=True)
    subject: Mapped[str]
    payload: Mapped[bytes]
    """The event as proto3 JSON bytes, exactly as published."""
    created_at: Mapped[datetime] = _created_at()
    published_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(server_default=text("0"))
    """Failed publish attempts so far."""
    trace_context: Mapped[str] = mapped_column(server_default="")
    """`traceparent` of the transaction that wrote it, sent as a NATS header."""
    request_id: Mapped[str] = mapped_column(server_default="")
    """`x-request-id` of that transaction's request, sent as a NATS header."""


class ApiKey(Base):
    """An API key for the HTTP and gRPC fronts; only a hash of the secret is stored.

    A name is unique among unrevoked keys: a revoked key's name may be given to a new key.
    """

    __tablename__ = "api_keys"
    __table_args__ = (
        Index("uq_api_keys_active_name", "name", unique=True,
              postgresql_where=text("revoked_at IS NULL")),
    )

    key_id: Mapped[str] = mapped_column(primary_key=True)
    name: Mapped[str]
    key_hash: Mapped[str] = mapped_column(unique=True)
    created_at: Mapped[datetime] = _created_at()
    revoked_at: Mapped[datetime | None]
    prefix: Mapped[str] = mapped_column(server_default=text("''"))
    """The start of the secret, safe to show."""
    admin: Mapped[bool] = mapped_column(server_default=text("false"))
    models: Mapped[list[Any]] = mapped_column(JSONB(), server_default=text("'[]'::jsonb"))
    """Asset ids or aliases the key may use; empty: every model."""
    rpm: Mapped[int | None]
    tpm: Mapped[int | None]
    max_parallel: Mapped[int | None]
    budget_tokens: Mapped[int | None] = mapped_column(BigInteger)
    budget_usd: Mapped[Decimal | None] = mapped_column(Numeric(18, 6))
    budget_period_s: Mapped[int | None] = mapped_column(BigInteger)
    expires_at: Mapped[datetime | None]


USD = Numeric(20, 9)
"""Dollar amounts: nine decimals, so a single token of a cheap model still counts."""


class LimitCounter(Base):
    """One API key's usage in its current minute and budget period, shared by every router.

    Written only by the `rh_limit_reserve` / `rh_limit_settle` functions (migration 0004).
    """

    __tablename__ = "limit_counters"

    key_id: Mapped[str] = mapped_column(primary_key=True)
    minute_start: Mapped[datetime]
    minute_requests: Mapped[int] = mapped_column(server_default=text("0"))
    minute_tokens: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    budget_start: Mapped[datetime]
    budget_tokens: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    budget_usd: Mapped[Decimal] = mapped_column(USD, server_default=text("0"))


class LimitReservation(Base):
    """What one request in flight reserved (its estimate) until it settles or expires."""

    __tablename__ = "limit_reservations"
    __table_args__ = (Index("ix_limit_reservations_key_id", "key_id"),)

    reservation_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    key_id: Mapped[str]
    minute_start: Mapped[datetime]
    budget_start: Mapped[datetime]
    tokens: Mapped[int] = mapped_column(BigInteger)
    usd: Mapped[Decimal] = mapped_column(USD)
    expires_at: Mapped[datetime]


class UsageRecord(Base):
    """One request in the usage ledger (written in batches by the router)."""

    __tablename__ = "usage_records"
    __table_args__ = (Index("ix_usage_records_at", "at"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    at: Mapped[datetime]
    """When the request arrived."""
    request_id: Mapped[str]
    key_id: Mapped[str]
    """Empty when auth is off."""
    asset_id: Mapped[str]
    """The asset that answered (empty when the name did not resolve)."""
    route: Mapped[str]
    """The model name the client sent."""
    interface: Mapped[str]
    prompt_tokens: Mapped[int]
    completion_tokens: Mapped[int]
    cost_usd: Mapped[Decimal] = mapped_column(USD)
    latency_ms: Mapped[float]
    ttft_ms: Mapped[float | None]
    status: Mapped[str]
    """`ok`, `cancelled`, or the failure as a snake-case name (`rate_limited`,
    `budget_exhausted`, `model_not_ready`...; `internal` for an unexpected one)."""
    woke: Mapped[bool]
    """Whether the request had to wake its model."""
    cache: Mapped[str] = mapped_column(server_default="")
    """For a route with a response cache: `hit` (answered from it) or `miss`; else empty."""


class Eviction(Base):
    """A model evicted from a worker to make room for another (kept for the thrashing window)."""

    __tablename__ = "evictions"
    __table_args__ = (Index("ix_evictions_worker_id_evicted_at", "worker_id", "evicted_at"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    worker_id: Mapped[str]
    asset_id: Mapped[str]
    """The model evicted."""
    evicted_for: Mapped[str]
    """The model loaded in its place."""
    evicted_at: Mapped[datetime]


class ThrashingEpisode(Base):
    """The latest thrashing episode of a worker: models that keep evicting each other there.

    An episode is ongoing while evictions that bring a model back keep coming within the
    window; one `model.thrashing` per model is published when it starts.
    """

    __tablename__ = "thrashing_episodes"

    worker_id: Mapped[str] = mapped_column(primary_key=True)
    asset_ids: Mapped[list[str]]
    started_at: Mapped[datetime]
    last_at: Mapped[datetime]
    """The last eviction that kept it going."""
