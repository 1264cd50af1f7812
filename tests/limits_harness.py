"""What tests of per-minute limits share."""

from __future__ import annotations

import asyncio
import time

MINUTE_MARGIN_S = 10.0
"""The most a test of one rate window is expected to take."""


async def clear_of_minute_boundary() -> None:
    """Rate windows renew at the calendar minute: a test of one window starts clear of it
    (waiting for the next minute when fewer than `MINUTE_MARGIN_S` seconds are left)."""
    into_minute = time.time() % 60
    if into_minute > 60 - MINUTE_MARGIN_S:
        await asyncio.sleep(60.5 - into_minute)  # until the next window, not a synchronisation
