"""The usage ledger writer: rows kept in memory, written to Postgres in batches.

`record` only appends to a buffer (no I/O on the request path). A background task writes
what the buffer holds every `flush_s` (0.5 s by default, so a row is at most about a second
late) with one `COPY` per batch of up to `batch_rows`. When Postgres is away the rows stay
in the buffer and the write is retried with a backoff (up to 5 s); the buffer holds at most
`max_buffered` rows (100,000 by default, some 30 MB), beyond which the oldest rows are
dropped, counted in `dropped` and logged. `close` (the router's shutdown) writes what is
left, retrying for up to `drain_s`.

A row Postgres refuses for its content (a data error, never a connection one) cannot block
the rows after it: the batch is split until the refused rows stand alone, and those are
dropped, counted in `rejected` and logged. The model name and request id a client sent are
cleaned when the ticket opens (NUL replaced, at most `MAX_TEXT` characters) so that this stays
a last resort.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from datetime import datetime

import asyncpg

from services.common.keys import KeyRecord
from services.router.usage.summary import GroupBy, KeyTotals, UsageSummary, key_totals, summarize
from services.router.usage.ticket import COLUMNS, UsageTicket

log = logging.getLogger(__name__)

STORE_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)
BAD_DATA = (asyncpg.DataError, ValueError, OverflowError, TypeError)
"""Errors of a row's content, never of the connection: Postgres's class 22 (a NUL in text, a
value out of range) and asyncpg's refusal to encode a value (its own `DataError`, a
ValueError; OverflowError for an integer out of the column's range)."""
MAX_BACKOFF_S = 5.0
MAX_TEXT = 256
"""The most characters of a client's model name or request id the ledger keeps."""


def clean(text: str) -> str:
    """`text` as the ledger can store it: NUL replaced (Postgres text cannot hold it), at most
    `MAX_TEXT` characters."""
    return text[:MAX_TEXT].replace("\x00", "\ufffd")


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
        self.rejected = 0
        """Rows Postgres refused for their content, dropped."""

    def open(self, key: KeyRecord | None, route: str, interface: str,
             request_id: str) -> UsageTicket:
        """A ticket for a request that starts now (`route`: the model name the client sent)."""
        return UsageTicket(key.key_id if key is not None else "", clean(route), interface,
                           clean(request_id))

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
                await self._write([self._pending[i]
                                   for i in range(min(self.batch_rows, len(self._pending)))])

    async def _write(self, rows: list[tuple[object, ...]]) -> None:
        """Write `rows`, the oldest pending ones, and take them off the buffer; a refused row is
        found by halving the batch and is dropped alone."""
        assert self._pool is not None
        try:
            async with self._pool.acquire(timeout=5) as conn, conn.transaction():
                # The pool's commits skip the disk flush (see `limits.create_pool`); these don't.
                await conn.execute("SET LOCAL synchronous_commit = on")
                await conn.copy_records_to_table("usage_records", records=rows,
                                                 columns=COLUMNS, timeout=10)
        except BAD_DATA as exc:
            if len(rows) > 1:
                half = len(rows) // 2
                await self._write(rows[:half])
                await self._write(rows[half:])
                return
            self.rejected += 1
            log.error("usage ledger: dropped the row of request %r, which Postgres refuses: %s",
                      str(rows[0][1])[:80], exc)
        for _ in rows:
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

    async def _flush_for_reading(self) -> None:
        try:
            await self.flush()
        except STORE_ERRORS:
            log.warning("usage ledger: read without this router's latest rows", exc_info=True)

    async def summary(self, group_by: GroupBy, since: datetime, until: datetime) -> list[UsageSummary]:
        """Requests, errors, tokens, cost and latency percentiles per key, asset or day, rows of
        this router not yet written included."""
        if self._pool is None:
            return []
        await self._flush_for_reading()
        return await summarize(self._pool, group_by, since, until)

    async def key_totals(self, key_ids: list[str]) -> dict[str, KeyTotals]:
        """All-time totals per key id of `key_ids` (keys that used nothing left out), rows of
        this router not yet written included."""
        if self._pool is None:
            return {}
        await self._flush_for_reading()
        return await key_totals(self._pool, key_ids)
