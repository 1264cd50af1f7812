"""At most one active load per asset: concurrent wake-ups join it instead of starting another.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ACTIVE_LOAD = "type = 'load' AND status IN ('queued', 'running')"


def upgrade() -> None:
    op.create_index("uq_operations_active_load", "operations", ["asset_id"], unique=True,
                    postgresql_where=sa.text(ACTIVE_LOAD))


def downgrade() -> None:
    op.drop_index("uq_operations_active_load", table_name="operations")
