"""Initial schema: assets, aliases, operations, outbox, api keys.

Revision ID: 0001
Revises:
Create Date: 2025-01-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON_OBJECT = sa.text("'{}'::jsonb")


def _timestamps() -> list[sa.Column]:
    return [
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
    ]


def upgrade() -> None:
    """Create every table with its constraints and indexes."""
    op.create_table(
        "assets",
        sa.Column("asset_id", sa.Text(), nullable=False),
        sa.Column("spec", postgresql.JSONB(), nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("interfaces", postgresql.ARRAY(sa.Text()), nullable=False,
                  server_default=sa.text("'{}'::text[]")),
        sa.Column("runtime", sa.Text(), nullable=False),
        sa.Column("desired", sa.Text(), nullable=False),
        sa.Column("labels", postgresql.JSONB(), nullable=False, server_default=JSON_OBJECT),
        sa.Column("state", sa.Text(), nullable=False, server_default="registered"),
        sa.Column("status", postgresql.JSONB(), nullable=False, server_default=JSON_OBJECT),
        sa.Column("capabilities", postgresql.JSONB(), nullable=True),
        *_timestamps(),
        sa.PrimaryKeyConstraint("asset_id", name="pk_assets"),
    )
    # GIN serves `interfaces @> ARRAY[...]` (list assets implementing an interface).
    op.create_index("ix_assets_interfaces", "assets", ["interfaces"], postgresql_using="gin")
    op.create_index("ix_assets_runtime", "assets", ["runtime"])
    op.create_index("ix_assets_state", "assets", ["state"])

    op.create_table(
        "asset_aliases",
        sa.Column("alias", sa.Text(), nullable=False),
        sa.Column("asset_id", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("alias", name="pk_asset_aliases"),
        sa.ForeignKeyConstraint(
            ["asset_id"], ["assets.asset_id"],
            name="fk_asset_aliases_asset_id_assets", ondelete="CASCADE",
        ),
    )
    op.create_index("ix_asset_aliases_asset_id", "asset_aliases", ["asset_id"])

    op.create_table(
        "operations",
        sa.Column("operation_id", sa.Uuid(), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("asset_id", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False, server_default="queued"),
        sa.Column("progress", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("message", sa.Text(), nullable=False, server_default=""),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("max_attempts", sa.Integer(), nullable=False, server_default=sa.text("3")),
        sa.Column("idempotency_key", sa.Text(), nullable=True),
        sa.Column("worker_id", sa.Text(), nullable=True),
        sa.Column("force", sa.Boolean(), nullable=False, server_default=sa.text("false")),
        sa.Column("params", postgresql.JSONB(), nullable=False, server_default=JSON_OBJECT),
        sa.Column("lease_owner", sa.Text(), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        *_timestamps(),
        sa.PrimaryKeyConstraint("operation_id", name="pk_operations"),
        sa.UniqueConstraint("idempotency_key", name="uq_operations_idempotency_key"),
        sa.CheckConstraint(
            "progress >= 0 AND progress <= 100", name="ck_operations_progress_range"
        ),
    )
    # The queue: oldest queued (or expired running) operations first.
    op.create_index("ix_operations_status_created_at", "operations", ["status", "created_at"])
    op.create_index("ix_operations_asset_id", "operations", ["asset_id"])

    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.PrimaryKeyConstraint("id", name="pk_outbox"),
        sa.UniqueConstraint("event_id", name="uq_outbox_event_id"),
    )
    # Stays small however long the table grows: only rows still waiting for the relay.
    op.create_index(
        "ix_outbox_unpublished", "outbox", ["id"],
        postgresql_where=sa.text("published_at IS NULL"),
    )

    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("key_hash", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("key_id", name="pk_api_keys"),
        sa.UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
    )


def downgrade() -> None:
    """Drop every table (and with them their indexes), dependents first."""
    op.drop_table("api_keys")
    op.drop_table("outbox")
    op.drop_table("operations")
    op.drop_table("asset_aliases")
    op.drop_table("assets")
