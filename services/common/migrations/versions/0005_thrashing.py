"""Evictions and thrashing episodes: which models keep evicting each other on a worker.

`evictions` keeps the evictions of the last thrashing window (older rows are deleted as new
ones come); `thrashing_episodes` holds each worker's latest episode, whose row lock makes
one jobs instance, not several, announce it.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "evictions",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("worker_id", sa.Text(), nullable=False),
        sa.Column("asset_id", sa.Text(), nullable=False),
        sa.Column("evicted_for", sa.Text(), nullable=False),
        sa.Column("evicted_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_evictions"),
    )
    op.create_index("ix_evictions_worker_id_evicted_at", "evictions", ["worker_id", "evicted_at"])
    op.create_table(
        "thrashing_episodes",
        sa.Column("worker_id", sa.Text(), nullable=False),
        sa.Column("asset_ids", ARRAY(sa.Text()), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("worker_id", name="pk_thrashing_episodes"),
    )


def downgrade() -> None:
    op.drop_table("thrashing_episodes")
    op.drop_index("ix_evictions_worker_id_evicted_at", table_name="evictions")
    op.drop_table("evictions")
