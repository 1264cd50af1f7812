"""The usage ledger writer: rows kept in memory, written to Postgres in batches.

`record` only appends to a buffer (no I/O on the request path). A background task writes
what the buffer holds every `flush_s` (0.5 s by default, so a row is at most about a second
late) with one `COPY` per batch of up to `batch_rows`. When Postgres is away the rows stay
in the buffer and the write is retried with a backoff (up to 5 s); the buffer holds at most
`max_buffered` rows (100,000 by default, some 30 MB), beyond which the oldest rows are
dropped, counted in `dropped` and logged. `close` (the router's shutdown) writes what is
left, retrying for up to `drain_s`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from datetime import datetime

import asyncpg

from services.common.keys import KeyRecord
from services.router.usage.summary import GroupBy, UsageSummary, summarize
from services.router.usage.ticket import COLUMNS, UsageTicket

log = logging.getLogger(__name__)

STORE_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)
MAX_BACKOFF_S = 5.0


class UsageLedger:
    """Records every request the router serves; without a pool it records nothing."""

    def __init__(self, pool: asyncpg.Pool | None, *, flush_s: float = 0.5, batch_rows: int = 1000,
                 max_buffered: int = 100_000, drain_s: float = 10.0) -> None:
        self._pool = pool
        self.flush_s, self.batch_rows, self.max_buffered, self.drain_s = (
            flush_s, batch_rows, max_buffered, drain_s)
        self._pending: deque[tuple[object, ...]] = deque()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    def open(self, key: KeyRecord | None, route: str, interface: str,
             request_id: str) -> UsageTicket:
        """A ticket for a request that starts now (`route`: the model name the client sent)."""
        return UsageTicket(key.key_id if key is not None else "", route, interface, request_id)

    def record(self, ticket: UsageTicket) -> None:
        """Queue the ticket's row for the next batch; never blocks, never raises."""
        if self._pool is None:
            return
        ticket.finish()
        self._pending.append(ticket.row())
        if len(self._pending) > self.max_buffered:
            self._pending.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                log.error("usage ledger: Postgres unreachable and %d rows buffered; %d oldest "
                          "rows dropped so far", self.max_buffered, self.dropped)

    @property
    def pending(self) -> int:
        """Rows not written yet."""
        return len(self._pending)

    def start(self) -> None:
        """Start writing in the background."""
        if self._pool is not None and self._task is None:
            self._task = asyncio.create_task(self._run(), name="usage-ledger")

    async def flush(self) -> None:
        """Write every buffered row now; raises the store's error, keeping the rows, if it
        fails."""
        if self._pool is None:
            return
        async with self._lock:
            while self._pending:
                batch = [self._pending[i] for i in range(min(self.batch_rows, len(self._pending)))]
                async with self._pool.acquire(timeout=5) as conn, conn.transaction():
                    # The pool's commits skip the disk flush (see `limits.create_pool`); these don't.
                    await conn.execute("SET LOCAL synchronous_commit = on")
                    await conn.copy_records_to_table("usage_records", records=batch,
                                                     columns=COLUMNS, timeout=10)
                for _ in batch:
                    self._pending.popleft()

    async def _run(self) -> None:
        backoff = self.flush_s
        while True:
            await asyncio.sleep(backoff)  # the write period, not a synchronisation
            try:
                await self.flush()
                backoff = self.flush_s
            except STORE_ERRORS as exc:
                backoff = min(MAX_BACKOFF_S, backoff * 2)
                log.warning("usage ledger: %d rows not written yet (%s); retrying in %gs",
                            len(self._pending), exc, backoff)

    async def close(self) -> None:
        """Stop the background writer and write what is left, retrying for up to `drain_s`."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_s
        while self._pending:
            try:
                await self.flush()
            except STORE_ERRORS as exc:
                if loop.time() >= deadline:
                    log.error("usage ledger: %d rows lost at shutdown: %s", len(self._pending), exc)
                    return
                await asyncio.sleep(0.2)  # retry period while Postgres comes back

    async def summary(self, group_by: GroupBy, since: datetime, until: datetime) -> list[UsageSummary]:
        """Requests, errors, tokens, cost and latency percentiles per key, asset or day, rows of
        this router not yet written included."""
        if self._pool is None:
            return []
        try:
            await self.flush()
        except STORE_ERRORS:
            log.warning("usage ledger: summary without this router's latest rows", exc_info=True)
        return await summarize(self._pool, group_by, since, until)
