"""Reserve and settle a key's limits in Postgres, exact across any number of routers.

`reserve` is one statement (`rh_limit_reserve`, migration 0004): it locks the key's counter
row, rolls the minute and budget windows, drops expired reservations, checks rpm, tpm,
max_parallel and both budgets against the request's estimate and, when all pass, charges the
estimate and records a reservation, all before the lock is released. Routers sharing the
database therefore see one sequence of checks per key, bursts of first requests included.

`settle` replaces the estimate by the real usage and frees the request's parallel slot, off
the request's path (a task of its own, retried a few times with a bounded backoff); the next
reservation of the same key on this router waits for it (up to the statement timeout), so a
client's next request sees its previous one settled. A `reserve` that is cancelled or fails
once its statement may have reached Postgres lets the statement finish and settles the
reservation it may have made (settling is idempotent), so a request cancelled at the wrong
moment holds no parallel slot. A router that dies mid-request never settles: its reservations
expire after `hold_s` (the parallel slot is freed then, even if the request still runs; the
estimate stays charged to its windows, an upper bound of what the request could have used).
Windows are fixed: rpm and tpm count per calendar minute (UTC), budgets per `budget_period_s`
from the key's first request (never renewed without one).
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass
from decimal import Decimal

import asyncpg

from services.common.errors import BudgetExhausted, LimitsUnavailable, RateLimited
from services.common.keys import KeyLimits, KeyRecord
from services.router.limits.estimate import Estimate
from services.router.limits.report import LimitStatus, publish

log = logging.getLogger(__name__)

RESERVE = "SELECT * FROM rh_limit_reserve($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
SETTLE = "SELECT rh_limit_settle($1, $2, $3)"
STORE_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)
PARALLEL_RETRY_S = 1.0
SETTLE_ATTEMPTS = 3
SETTLE_BACKOFF_S = 0.2
"""The first retry's delay; each further one doubles it."""


@dataclass(frozen=True)
class Reservation:
    """What one admitted request holds until it settles."""

    reservation_id: uuid.UUID
    key_id: str
    estimate: Estimate


async def create_pool(dsn: str, *, max_size: int = 10) -> asyncpg.Pool:
    """A connection pool for the limits and the usage ledger, opening no connection before it
    is used. Connections go back to the pool without asyncpg's reset query (a second round
    trip per statement): these statements leave no session state behind.

    Commits do not wait for the WAL to reach the disk (`synchronous_commit=off`; it halves a
    reservation's time). Every router still sees every committed change at once; only a crash
    of Postgres itself may forget the last fraction of a second of counter updates (at most
    three `wal_writer_delay`, 0.6 s by default). The ledger turns it back on for its writes."""
    return await asyncpg.create_pool(
        dsn.replace("postgresql+asyncpg://", "postgresql://", 1), min_size=0, max_size=max_size,
        reset=_keep_session, server_settings={"synchronous_commit": "off"})


async def _keep_session(_: asyncpg.Connection) -> None:
    return None


def is_limited(limits: KeyLimits) -> bool:
    """Whether any limit of the key is set (an unlimited key costs no round trip)."""
    return any(v is not None for v in (limits.rpm, limits.tpm, limits.max_parallel,
                                       limits.budget_tokens, limits.budget_usd))


class Limiter:
    """The limit step of the router: `reserve` before a request runs, `settle` after."""

    def __init__(self, pool: asyncpg.Pool | None, *, hold_s: float = 900.0,
                 timeout_s: float = 5.0, default_completion_tokens: int = 256) -> None:
        self._pool = pool
        self.hold_s = hold_s
        self.default_completion_tokens = default_completion_tokens
        """The completion a request without `max_tokens` is expected to use (see `estimate`)."""
        self._timeout_s = timeout_s
        self._settling: dict[str, set[asyncio.Task[None]]] = {}

    async def reserve(self, key: KeyRecord | None, estimate: Estimate) -> Reservation | None:
        """Reserve `estimate` for one request of `key`; None when nothing limits it (no key, or
        a key without limits).

        Raises `RateLimited` (rpm, tpm, max_parallel; with Retry-After), `BudgetExhausted` (a
        budget could be overspent) or `LimitsUnavailable` (the store does not answer: refused,
        never let through unchecked). The key's per-minute status is published either way.
        """
        if key is None or not is_limited(key.limits):
            return None
        if self._pool is None:
            raise LimitsUnavailable("rate limits cannot be checked: the router has no database")
        limits = key.limits
        settling = self._settling.get(key.key_id)
        if settling:
            await asyncio.wait(settling, timeout=self._timeout_s)
        reservation = Reservation(uuid.uuid4(), key.key_id, estimate)
        statement = asyncio.ensure_future(self._pool.fetchrow(
            RESERVE, key.key_id, reservation.reservation_id, estimate.tokens, estimate.usd,
            limits.rpm, limits.tpm, limits.max_parallel, limits.budget_tokens,
            limits.budget_usd, limits.budget_period_s, self.hold_s, timeout=self._timeout_s))
        try:
            # Shielded: a cancelled request lets the statement end, then settles what it made.
            row = await asyncio.shield(statement)
        except BaseException as exc:
            if not _never_sent(exc):
                self._track(reservation, self._release(statement, reservation))
            if isinstance(exc, STORE_ERRORS):
                log.warning("limit check for key %s failed: %s", key.key_id, exc)
                raise LimitsUnavailable("rate limits cannot be checked now; retry later") from None
            raise
        assert row is not None
        reset_s = max(0.0, row["minute_reset_s"])
        publish(LimitStatus(
            rpm=limits.rpm, remaining_requests=max(0, (limits.rpm or 0) - row["minute_requests"]),
            tpm=limits.tpm, remaining_tokens=max(0, (limits.tpm or 0) - row["minute_tokens"]),
            reset_s=reset_s))
        outcome = row["outcome"]
        if outcome != "ok":
            raise _refusal(outcome, key, estimate, row, reset_s)
        return reservation

    def settle(self, reservation: Reservation | None, tokens: int, usd: Decimal) -> Awaitable[None]:
        """Replace the reservation's estimate by what the request used (`tokens`, `usd`) and
        free its parallel slot, in the background; await the result to wait for it. Never
        fails: if the store is still away after a few tries the reservation expires.
        """
        if reservation is None or self._pool is None:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        return self._track(reservation, self._settle(reservation, tokens, usd))

    def _track(self, reservation: Reservation, settling: Coroutine[None, None, None]) -> asyncio.Task[None]:
        """Run `settling` as a task the key's next reservation on this router waits for."""
        task = asyncio.create_task(settling)
        tasks = self._settling.setdefault(reservation.key_id, set())
        tasks.add(task)

        def forget(_: asyncio.Task[None]) -> None:
            tasks.discard(task)
            if not tasks:
                self._settling.pop(reservation.key_id, None)

        task.add_done_callback(forget)
        return task

    async def _release(self, statement: asyncio.Future[asyncpg.Record | None],
                       reservation: Reservation) -> None:
        """Once the reserve statement of a request that went away has ended (its own timeout
        bounds it), give back whatever it reserved."""
        await asyncio.wait([statement])
        if not statement.cancelled() and statement.exception() is None:
            row = statement.result()
            if row is None or row["outcome"] != "ok":
                return  # refused: nothing was reserved
        await self._settle(reservation, 0, Decimal(0))

    async def _settle(self, reservation: Reservation, tokens: int, usd: Decimal) -> None:
        assert self._pool is not None
        for attempt in range(1, SETTLE_ATTEMPTS + 1):
            try:
                await self._pool.execute(SETTLE, reservation.reservation_id, tokens, usd,
                                         timeout=self._timeout_s)
                return
            except STORE_ERRORS as exc:
                if attempt == SETTLE_ATTEMPTS:
                    log.warning("settling reservation %s of key %s failed %d times (it expires "
                                "after %gs): %s", reservation.reservation_id, reservation.key_id,
                                attempt, self.hold_s, exc)
                    return
            await asyncio.sleep(SETTLE_BACKOFF_S * 2 ** (attempt - 1))  # retry backoff

    async def close(self) -> None:
        """Wait for settles still under way, for at most the statement timeout; those left
        then expire."""
        tasks = [t for pending in self._settling.values() for t in pending]
        if tasks:
            await asyncio.wait(tasks, timeout=self._timeout_s)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _never_sent(exc: BaseException) -> bool:
    """Whether the reserve statement surely never reached Postgres (no connection could be made;
    a timeout, although an OSError too, may come after the statement committed)."""
    return isinstance(exc, OSError) and not isinstance(exc, TimeoutError)


def _refusal(outcome: str, key: KeyRecord, estimate: Estimate, row: asyncpg.Record,
             reset_s: float) -> Exception:
    limits, who = key.limits, f"API key '{key.name}'"
    retry = max(1.0, math.ceil(reset_s))
    if outcome == "parallel":
        return RateLimited(f"{who} already has {row['in_flight']} requests in flight, its limit "
                           f"(max_parallel {limits.max_parallel}); retry when one finishes",
                           retry_after_s=PARALLEL_RETRY_S)
    if outcome == "rpm":
        return RateLimited(f"{who} reached its limit of {limits.rpm} requests per minute; "
                           f"retry in {retry:g}s", retry_after_s=retry)
    if outcome == "tpm":
        if limits.tpm is not None and estimate.tokens > limits.tpm:
            return RateLimited(
                f"this request may use up to {estimate.tokens} tokens, more than {who}'s limit of "
                f"{limits.tpm} tokens per minute; lower max_tokens or shorten the prompt",
                retry_after_s=retry)
        return RateLimited(f"{who} reached its limit of {limits.tpm} tokens per minute "
                           f"({row['minute_tokens']} used or reserved, this request may use up "
                           f"to {estimate.tokens}); retry in {retry:g}s", retry_after_s=retry)
    renews = ("it does not renew" if row["budget_reset_s"] is None
              else f"it renews in {max(1, math.ceil(row['budget_reset_s']))}s")
    if outcome == "budget_tokens":
        return BudgetExhausted(f"{who} has used {row['budget_tokens']} of its budget of "
                               f"{limits.budget_tokens} tokens and this request may use up to "
                               f"{estimate.tokens}; {renews}")
    return BudgetExhausted(f"{who} has spent ${row['budget_usd']:.6f} of its budget of "
                           f"${limits.budget_usd} and this request may cost up to "
                           f"${estimate.usd:.6f}; {renews}")
