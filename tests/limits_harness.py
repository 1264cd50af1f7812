"""What tests of keys, per-minute limits and the usage ledger share."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import asyncpg
import httpx

MINUTE_MARGIN_S = 10.0
"""The most a test of one rate window is expected to take."""


async def clear_of_minute_boundary() -> None:
    """Rate windows renew at the calendar minute: a test of one window starts clear of it
    (waiting for the next minute when fewer than `MINUTE_MARGIN_S` seconds are left)."""
    into_minute = time.time() % 60
    if into_minute > 60 - MINUTE_MARGIN_S:
        await asyncio.sleep(60.5 - into_minute)  # until the next window, not a synchronisation


async def new_key(admin: httpx.AsyncClient, prefix: str = "key", **limits: Any) -> tuple[str, str]:
    """A fresh key with `limits`, made through the admin API (`admin`: a client whose base URL
    is `.../admin/v1`, see the `admin` fixture): its secret and its name."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    reply = await admin.post("/keys", json={"name": name, **limits})
    assert reply.status_code == 201, reply.text
    return reply.json()["key"], name


async def ledger_rows(dsn: str, key_name: str) -> list[asyncpg.Record]:
    """The usage ledger's rows of the key named `key_name`, oldest first."""
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(
            "SELECT r.* FROM usage_records r JOIN api_keys k ON k.key_id = r.key_id "
            "WHERE k.name = $1 ORDER BY r.at", key_name)
    finally:
        await conn.close()
