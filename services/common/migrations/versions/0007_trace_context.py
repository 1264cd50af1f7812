"""Trace context on stored work: operations and outbox events join the trace that caused them.

`trace_context` holds the W3C `traceparent` of the span that wrote the row and `request_id`
the `x-request-id` it ran for; both are empty when the writer ran outside a request (the
reconciler, a maintenance task). The jobs executor runs an operation inside that trace, and
the outbox relay publishes an event with both as NATS headers.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-21 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("operations", "outbox")


def upgrade() -> None:
    for table in TABLES:
        op.add_column(table, sa.Column("trace_context", sa.Text(), nullable=False, server_default=""))
        op.add_column(table, sa.Column("request_id", sa.Text(), nullable=False, server_default=""))


def downgrade() -> None:
    for table in TABLES:
        op.drop_column(table, "request_id")
        op.drop_column(table, "trace_context")
