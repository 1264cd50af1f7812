"""Routes and the response cache: an asset's class, and a cache outcome per ledger row.

`assets.asset_class` is `model` for every asset so far and `route` for a route (an asset
that answers with other assets); list calls filter on it. `usage_records.cache` says whether
a request to a cached route was answered from the cache (`hit`), ran and may have filled it
(`miss`), or had nothing to do with a cache (empty).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-14 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("assets", sa.Column("asset_class", sa.Text(), nullable=False,
                                      server_default="model"))
    op.create_index("ix_assets_asset_class", "assets", ["asset_class"])
    op.add_column("usage_records", sa.Column("cache", sa.Text(), nullable=False, server_default=""))


def downgrade() -> None:
    op.drop_column("usage_records", "cache")
    op.drop_index("ix_assets_asset_class", table_name="assets")
    op.drop_column("assets", "asset_class")
