"""Typed SQLAlchemy models of every Roundhouse table.

The schema itself is owned by the alembic history in `services.common.migrations`; these
models mirror it (same names, types, defaults and indexes) so queries are typed. A change
here needs a new hand-written migration.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    LargeBinary,
    MetaData,
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
    """A declared model: its spec (desired state) and what was last observed of it."""

    __tablename__ = "assets"
    __table_args__ = (
        Index("ix_assets_interfaces", "interfaces", postgresql_using="gin"),
        Index("ix_assets_runtime", "runtime"),
        Index("ix_assets_state", "state"),
    )

    asset_id: Mapped[str] = mapped_column(primary_key=True)
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


class ApiKey(Base):
    """An API key for the HTTP API; only a hash of the secret is stored."""

    __tablename__ = "api_keys"

    key_id: Mapped[str] = mapped_column(primary_key=True)
    name: Mapped[str]
    key_hash: Mapped[str] = mapped_column(unique=True)
    created_at: Mapped[datetime] = _created_at()
    revoked_at: Mapped[datetime | None]
