"""API keys get their scope and limits: prefix, admin, models, rate limits, budgets, expiry;
a name is unique among unrevoked keys.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNREVOKED = "revoked_at IS NULL"


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("prefix", sa.Text(), nullable=False, server_default=sa.text("''")))
    op.add_column("api_keys", sa.Column("admin", sa.Boolean(), nullable=False, server_default=sa.text("false")))
    op.add_column("api_keys", sa.Column("models", JSONB(), nullable=False,
                                        server_default=sa.text("'[]'::jsonb")))
    op.add_column("api_keys", sa.Column("rpm", sa.Integer(), nullable=True))
    op.add_column("api_keys", sa.Column("tpm", sa.Integer(), nullable=True))
    op.add_column("api_keys", sa.Column("max_parallel", sa.Integer(), nullable=True))
    op.add_column("api_keys", sa.Column("budget_tokens", sa.BigInteger(), nullable=True))
    op.add_column("api_keys", sa.Column("budget_usd", sa.Numeric(18, 6), nullable=True))
    op.add_column("api_keys", sa.Column("budget_period_s", sa.BigInteger(), nullable=True))
    op.add_column("api_keys", sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("uq_api_keys_active_name", "api_keys", ["name"], unique=True,
                    postgresql_where=sa.text(UNREVOKED))


def downgrade() -> None:
    op.drop_index("uq_api_keys_active_name", table_name="api_keys")
    for column in ("expires_at", "budget_period_s", "budget_usd", "budget_tokens", "max_parallel",
                   "tpm", "rpm", "models", "admin", "prefix"):
        op.drop_column("api_keys", column)
