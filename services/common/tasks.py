"""Stopping background tasks reliably.

A plain `task.cancel(); await task` can wait forever: nats-py swallows a `CancelledError`
that lands while a publish flushes its buffer, so a task cancelled mid-publish carries on
(a heartbeat loop, say, goes back to sleep and never ends). `cancel_and_wait` cancels again
until the task has ended, within a bound.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)


async def cancel_and_wait(task: asyncio.Task[Any], *, timeout_s: float = 5.0) -> None:
    """Cancel `task` and wait until it has ended, cancelling again while it goes on.

    After `timeout_s` it is left running and logged. An exception it ended with is logged,
    not raised: the caller is shutting it down.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not task.done():
        remaining = deadline - loop.time()
        if remaining <= 0:
            log.warning("task %s did not stop within %.1fs", task.get_name(), timeout_s)
            return
        task.cancel()
        await asyncio.wait({task}, timeout=min(0.2, remaining))
    if not task.cancelled() and task.exception() is not None:
        log.warning("task %s ended with %r", task.get_name(), task.exception())
