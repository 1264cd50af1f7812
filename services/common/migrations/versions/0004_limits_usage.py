"""Per-key limit counters shared by every router, and the usage ledger.

`limit_counters` holds one row per API key: the current minute's requests and tokens and the
current budget period's tokens and dollars. `limit_reservations` holds what requests in flight
reserved (their estimate), so max_parallel counts them and settling releases the unused part;
a reservation expires, so a router that dies mid-request leaks nothing for long.
`rh_limit_reserve` checks and reserves every limit of a key in one statement (the key's
counter row is locked for its duration, so any number of routers stay exact), settling first
the key's reservations it is handed; `rh_limit_settle` replaces estimates by the real usage.
Both lock the counter row before a reservation row, so they never deadlock each other.
`usage_records` is the ledger.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 00:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RELEASE = """
CREATE FUNCTION rh_limit_release(
    c limit_counters, p_settle uuid[], p_tokens bigint[], p_usd numeric[])
RETURNS limit_counters
LANGUAGE plpgsql AS $$
DECLARE
    r limit_reservations%ROWTYPE;
BEGIN
    -- `c` is the key's counter row, locked by the caller, who writes back what is returned.
    FOR i IN 1 .. coalesce(cardinality(p_settle), 0) LOOP
        DELETE FROM limit_reservations WHERE reservation_id = p_settle[i] AND key_id = c.key_id
            RETURNING * INTO r;
        CONTINUE WHEN NOT FOUND;  -- settled already, or expired: its estimate stays charged
        -- The difference goes to the windows the estimate was charged to, if they are current.
        IF c.minute_start = r.minute_start THEN
            c.minute_tokens := greatest(0, c.minute_tokens + p_tokens[i] - r.tokens);
        END IF;
        IF c.budget_start = r.budget_start THEN
            c.budget_tokens := greatest(0, c.budget_tokens + p_tokens[i] - r.tokens);
            c.budget_usd := greatest(0, c.budget_usd + p_usd[i] - r.usd);
        END IF;
    END LOOP;
    RETURN c;
END;
$$;
"""

RESERVE = """
CREATE FUNCTION rh_limit_reserve(
    p_key text, p_reservation uuid, p_tokens bigint, p_usd numeric,
    p_rpm integer, p_tpm bigint, p_parallel integer,
    p_budget_tokens bigint, p_budget_usd numeric, p_period_s bigint, p_hold_s double precision,
    p_settle uuid[], p_settle_tokens bigint[], p_settle_usd numeric[])
RETURNS TABLE (
    outcome text, minute_requests integer, minute_tokens bigint, minute_reset_s double precision,
    in_flight integer, budget_tokens bigint, budget_usd numeric, budget_reset_s double precision)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    t timestamptz := clock_timestamp();
    m timestamptz := date_trunc('minute', t);
    c limit_counters%ROWTYPE;
    flying integer;
    stale integer;
    verdict text := 'ok';
    settling boolean := cardinality(p_settle) > 0;
BEGIN
    SELECT * INTO c FROM limit_counters WHERE key_id = p_key FOR UPDATE;
    IF NOT FOUND THEN
        -- Concurrent first requests of a key: one inserts, the others wait for it, then lock.
        INSERT INTO limit_counters (key_id, minute_start, budget_start) VALUES (p_key, m, t)
            ON CONFLICT (key_id) DO NOTHING;
        SELECT * INTO c FROM limit_counters WHERE key_id = p_key FOR UPDATE;
    END IF;
    IF settling THEN
        -- Earlier requests of the key whose settle this router has not seen committed yet.
        c := rh_limit_release(c, p_settle, p_settle_tokens, p_settle_usd);
    END IF;
    IF c.minute_start < m THEN
        c.minute_start := m; c.minute_requests := 0; c.minute_tokens := 0;
    END IF;
    IF p_period_s IS NOT NULL AND c.budget_start + make_interval(secs => p_period_s) <= t THEN
        c.budget_start := c.budget_start + make_interval(
            secs => p_period_s * floor(extract(epoch FROM t - c.budget_start) / p_period_s));
        c.budget_tokens := 0; c.budget_usd := 0;
    END IF;
    SELECT count(*), count(*) FILTER (WHERE r.expires_at <= t) INTO flying, stale
        FROM limit_reservations r WHERE r.key_id = p_key;
    IF stale > 0 THEN
        DELETE FROM limit_reservations r WHERE r.key_id = p_key AND r.expires_at <= t;
        flying := flying - stale;
    END IF;
    IF p_budget_tokens IS NOT NULL AND c.budget_tokens + p_tokens > p_budget_tokens THEN
        verdict := 'budget_tokens';
    ELSIF p_budget_usd IS NOT NULL AND c.budget_usd + p_usd > p_budget_usd THEN
        verdict := 'budget_usd';
    ELSIF p_parallel IS NOT NULL AND flying + 1 > p_parallel THEN
        verdict := 'parallel';
    ELSIF p_rpm IS NOT NULL AND c.minute_requests + 1 > p_rpm THEN
        verdict := 'rpm';
    ELSIF p_tpm IS NOT NULL AND c.minute_tokens + p_tokens > p_tpm THEN
        verdict := 'tpm';
    END IF;
    IF verdict = 'ok' THEN
        c.minute_requests := c.minute_requests + 1;
        c.minute_tokens := c.minute_tokens + p_tokens;
        c.budget_tokens := c.budget_tokens + p_tokens;
        c.budget_usd := c.budget_usd + p_usd;
        flying := flying + 1;
    END IF;
    IF verdict = 'ok' OR settling THEN
        UPDATE limit_counters SET
            minute_start = c.minute_start, minute_requests = c.minute_requests,
            minute_tokens = c.minute_tokens, budget_start = c.budget_start,
            budget_tokens = c.budget_tokens, budget_usd = c.budget_usd
        WHERE key_id = p_key;
    END IF;
    IF verdict = 'ok' THEN
        INSERT INTO limit_reservations
            (reservation_id, key_id, minute_start, budget_start, tokens, usd, expires_at)
        VALUES (p_reservation, p_key, c.minute_start, c.budget_start, p_tokens, p_usd,
                t + make_interval(secs => p_hold_s));
    END IF;
    RETURN QUERY SELECT verdict, c.minute_requests, c.minute_tokens,
        extract(epoch FROM c.minute_start + interval '1 minute' - t)::double precision,
        flying, c.budget_tokens, c.budget_usd,
        CASE WHEN p_period_s IS NULL THEN NULL ELSE extract(epoch FROM
            c.budget_start + make_interval(secs => p_period_s) - t)::double precision END;
END;
$$;
"""

SETTLE = """
CREATE FUNCTION rh_limit_settle(p_key text, p_settle uuid[], p_tokens bigint[], p_usd numeric[])
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    c limit_counters%ROWTYPE;
BEGIN
    SELECT * INTO c FROM limit_counters WHERE key_id = p_key FOR UPDATE;
    IF FOUND THEN
        c := rh_limit_release(c, p_settle, p_tokens, p_usd);
        UPDATE limit_counters SET minute_tokens = c.minute_tokens,
            budget_tokens = c.budget_tokens, budget_usd = c.budget_usd
        WHERE key_id = p_key;
    END IF;
END;
$$;
"""

USD = sa.Numeric(20, 9)


def upgrade() -> None:
    op.create_table(
        "limit_counters",
        sa.Column("key_id", sa.Text(), nullable=False),
        sa.Column("minute_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("minute_requests", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("minute_tokens", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        sa.Column("budget_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("budget_tokens", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        sa.Column("budget_usd", USD, nullable=False, server_default=sa.text("0")),
        sa.PrimaryKeyConstraint("key_id", name="pk_limit_counters"),
    )
    op.create_table(
        "limit_reservations",
        sa.Column("reservation_id", sa.Uuid(), nullable=False),
        sa.Column("key_id", sa.Text(), nullable=False),
        sa.Column("minute_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("budget_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("usd", USD, nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("reservation_id", name="pk_limit_reservations"),
    )
    op.create_index("ix_limit_reservations_key_id", "limit_reservations", ["key_id"])
    op.execute(RELEASE)
    op.execute(SETTLE)
    op.execute(RESERVE)
    op.create_table(
        "usage_records",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("request_id", sa.Text(), nullable=False),
        sa.Column("key_id", sa.Text(), nullable=False),
        sa.Column("asset_id", sa.Text(), nullable=False),
        sa.Column("route", sa.Text(), nullable=False),
        sa.Column("interface", sa.Text(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("cost_usd", USD, nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("ttft_ms", sa.Float(), nullable=True),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("woke", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_usage_records"),
    )
    op.create_index("ix_usage_records_at", "usage_records", ["at"])


def downgrade() -> None:
    op.drop_table("usage_records")
    op.execute("DROP FUNCTION rh_limit_settle(text, uuid[], bigint[], numeric[])")
    op.execute("DROP FUNCTION rh_limit_reserve(text, uuid, bigint, numeric, integer, bigint, "
               "integer, bigint, numeric, bigint, double precision, uuid[], bigint[], numeric[])")
    op.execute("DROP FUNCTION rh_limit_release(limit_counters, uuid[], bigint[], numeric[])")
    op.drop_table("limit_reservations")
    op.drop_table("limit_counters")
