"""Reserve and settle a key's limits in Postgres, exact across any number of routers.

`reserve` is one statement (`rh_limit_reserve`, migration 0004): it locks the key's counter
row, rolls the minute and budget windows, drops expired reservations, checks rpm, tpm,
max_parallel and both budgets against the request's estimate and, when all pass, charges the
estimate and records a reservation, all before the lock is released. Routers sharing the
database therefore see one sequence of checks per key, bursts of first requests included.

`settle` replaces the estimate by the real usage and frees the request's parallel slot, off
the request's path. It waits up to `settle_delay_s` for the key's next reservation on this
router to carry it: the reserve statement settles the key's unsettled reservations first, in
the same transaction. Otherwise it is sent on its own (one statement for the key's unsettled
reservations, retried a few times with a bounded backoff). A reservation is released once, so
a settle that goes out twice is harmless. A client's next request on this router therefore
sees its previous one settled without waiting for a round trip, and a busy key costs one
statement per request; other routers may see a finished request's slot and estimate held up
to `settle_delay_s` longer (never more admitted than the limits allow). A `reserve` that is
cancelled or fails once its statement may have reached Postgres lets the statement finish
and settles the reservation it may have made (the key's next reservation on this router
waits for that statement), so a request cancelled at the wrong moment holds no parallel slot.
A router that dies mid-request never settles: its reservations expire after `hold_s` (the
parallel slot is freed then, even if the request still runs; the estimate stays charged to
its windows, an upper bound of what the request could have used).
Windows are fixed: rpm and tpm count per calendar minute (UTC), budgets per `budget_period_s`
from the key's first request (never renewed without one).
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from decimal import Decimal

import asyncpg

from services.common.errors import BudgetExhausted, LimitsUnavailable, RateLimited
from services.common.keys import KeyLimits, KeyRecord
from services.router.limits.estimate import Estimate
from services.router.limits.report import LimitStatus, is_reported, publish

log = logging.getLogger(__name__)

RESERVE = ("SELECT * FROM rh_limit_reserve($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, "
           "$14)")
SETTLE = "SELECT rh_limit_settle($1, $2, $3, $4)"
STATUS = """
SELECT coalesce(c.minute_requests, 0) AS minute_requests, coalesce(c.minute_tokens, 0) AS minute_tokens,
       extract(epoch FROM date_trunc('minute', n.t) + interval '1 minute' - n.t)::double precision
           AS minute_reset_s
FROM (SELECT clock_timestamp() AS t) n
LEFT JOIN limit_counters c ON c.key_id = $1 AND c.minute_start = date_trunc('minute', n.t)
"""
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


@dataclass(frozen=True)
class _Unsettled:
    """A settle this router has not seen committed yet."""

    tokens: int
    usd: Decimal
    done: asyncio.Future[None]


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
                 timeout_s: float = 5.0, default_completion_tokens: int = 256,
                 settle_delay_s: float = 0.0) -> None:
        self._pool = pool
        self.hold_s = hold_s
        self.settle_delay_s = settle_delay_s
        """How long a settle waits for the key's next reservation on this router to carry it
        before it is sent on its own (0: at once)."""
        self.default_completion_tokens = default_completion_tokens
        """The completion a request without `max_tokens` is expected to use (see `estimate`)."""
        self._timeout_s = timeout_s
        self._settling: set[asyncio.Task[None]] = set()
        self._unsettled: dict[str, dict[uuid.UUID, _Unsettled]] = {}
        """Per key: settles not seen committed yet, by reservation id."""
        self._releasing: dict[str, set[asyncio.Future[asyncpg.Record | None]]] = {}
        """Per key: reserve statements of requests that went away, still running."""
        self._due: dict[str, asyncio.TimerHandle] = {}
        """Per key: when its unsettled reservations are sent on their own."""

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
        releasing = self._releasing.get(key.key_id)
        if releasing:
            await asyncio.wait(releasing, timeout=self._timeout_s)
        carried = list(self._unsettled.get(key.key_id, {}).items())
        reservation = Reservation(uuid.uuid4(), key.key_id, estimate)
        statement = asyncio.ensure_future(self._pool.fetchrow(
            RESERVE, key.key_id, reservation.reservation_id, estimate.tokens, estimate.usd,
            limits.rpm, limits.tpm, limits.max_parallel, limits.budget_tokens,
            limits.budget_usd, limits.budget_period_s, self.hold_s,
            [rid for rid, _ in carried], [u.tokens for _, u in carried],
            [u.usd for _, u in carried], timeout=self._timeout_s))
        try:
            # Shielded: a cancelled request lets the statement end, then settles what it made.
            row = await asyncio.shield(statement)
        except BaseException as exc:
            if not _never_sent(exc):
                self._release_when_done(statement, reservation)
            if isinstance(exc, STORE_ERRORS):
                log.warning("limit check for key %s failed: %s", key.key_id, exc)
                raise LimitsUnavailable("rate limits cannot be checked now; retry later") from None
            raise
        assert row is not None
        for rid, _ in carried:
            self._settled(reservation.key_id, rid)
        reset_s = _publish(limits, row)
        outcome = row["outcome"]
        if outcome != "ok":
            raise _refusal(outcome, key, estimate, row, reset_s)
        return reservation

    async def report(self, key: KeyRecord | None) -> None:
        """Publish the per-minute status of a key with an rpm or tpm for a request that reserves
        nothing (the model list): one read of its counters, no lock, nothing charged. Only when
        the request's front opened a report; if the store does not answer, nothing is published.
        """
        if (key is None or self._pool is None or not is_reported()
                or (key.limits.rpm is None and key.limits.tpm is None)):
            return
        try:
            row = await self._pool.fetchrow(STATUS, key.key_id, timeout=self._timeout_s)
        except STORE_ERRORS as exc:
            log.warning("reading the limits of key %s failed: %s", key.key_id, exc)
            return
        assert row is not None
        _publish(key.limits, row)

    def settle(self, reservation: Reservation | None, tokens: int, usd: Decimal) -> Awaitable[None]:
        """Replace the reservation's estimate by what the request used (`tokens`, `usd`) and
        free its parallel slot, in the background: within the key's next reservation on this
        router if that comes within `settle_delay_s`, else on its own. Await the result to wait
        for it. Never fails: if the store is still away after a few tries the reservation
        expires.
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        if reservation is None or self._pool is None:
            done.set_result(None)
            return done
        key_id = reservation.key_id
        self._unsettled.setdefault(key_id, {})[reservation.reservation_id] = _Unsettled(tokens, usd, done)
        if key_id not in self._due:
            self._due[key_id] = loop.call_later(self.settle_delay_s, self._send, key_id)
        return done

    def _send(self, key_id: str) -> None:
        """Send the key's unsettled reservations in one statement, in a task of their own."""
        self._due.pop(key_id, None)
        batch = dict(self._unsettled.get(key_id, {}))
        if batch:
            task = asyncio.create_task(self._settle(key_id, batch))
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)

    def _settled(self, key_id: str, reservation_id: uuid.UUID) -> None:
        """The settle of that reservation committed (or is given up): no reserve carries it."""
        pending = self._unsettled.get(key_id)
        unsettled = pending.pop(reservation_id, None) if pending is not None else None
        if unsettled is not None and not unsettled.done.done():
            unsettled.done.set_result(None)
        if pending is not None and not pending:
            del self._unsettled[key_id]
            due = self._due.pop(key_id, None)
            if due is not None:
                due.cancel()

    def _release_when_done(self, statement: asyncio.Future[asyncpg.Record | None],
                           reservation: Reservation) -> None:
        """Once the reserve statement of a request that went away has ended (its own timeout
        bounds it), give back whatever it reserved. Until then the key's next reservation on
        this router waits for it, then carries the release along."""
        releasing = self._releasing.setdefault(reservation.key_id, set())
        releasing.add(statement)

        def release(_: asyncio.Future[asyncpg.Record | None]) -> None:
            releasing.discard(statement)
            if not releasing and self._releasing.get(reservation.key_id) is releasing:
                del self._releasing[reservation.key_id]
            if not statement.cancelled() and statement.exception() is None:
                row = statement.result()
                if row is None or row["outcome"] != "ok":
                    return  # refused: nothing was reserved
            self.settle(reservation, 0, Decimal(0))

        statement.add_done_callback(release)

    async def _settle(self, key_id: str, batch: dict[uuid.UUID, _Unsettled]) -> None:
        assert self._pool is not None
        try:
            for attempt in range(1, SETTLE_ATTEMPTS + 1):
                pending = self._unsettled.get(key_id, {})
                batch = {rid: u for rid, u in batch.items() if rid in pending}
                if not batch:
                    return  # a reserve of the key carried them
                try:
                    await self._pool.execute(SETTLE, key_id, list(batch),
                                             [u.tokens for u in batch.values()],
                                             [u.usd for u in batch.values()], timeout=self._timeout_s)
                    return
                except STORE_ERRORS as exc:
                    if attempt == SETTLE_ATTEMPTS:
                        log.warning("settling %d reservations of key %s failed %d times (they "
                                    "expire after %gs): %s", len(batch), key_id, attempt,
                                    self.hold_s, exc)
                        return
                await asyncio.sleep(SETTLE_BACKOFF_S * 2 ** (attempt - 1))  # retry backoff
        finally:
            for rid in batch:
                self._settled(key_id, rid)

    async def close(self) -> None:
        """Send the settles still waiting, and wait for those under way, for at most the
        statement timeout; those left then expire."""
        releasing = [f for pending in self._releasing.values() for f in pending]
        if releasing:
            await asyncio.wait(releasing, timeout=self._timeout_s)
        for key_id in list(self._due):
            self._due[key_id].cancel()
            self._send(key_id)
        tasks = list(self._settling)
        if tasks:
            await asyncio.wait(tasks, timeout=self._timeout_s)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _publish(limits: KeyLimits, row: asyncpg.Record) -> float:
    """Publish the key's per-minute status from a reserve or status row; the seconds until its
    minute window resets."""
    reset_s = max(0.0, row["minute_reset_s"])
    publish(LimitStatus(
        rpm=limits.rpm, remaining_requests=max(0, (limits.rpm or 0) - row["minute_requests"]),
        tpm=limits.tpm, remaining_tokens=max(0, (limits.tpm or 0) - row["minute_tokens"]),
        reset_s=reset_s))
    return reset_s


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
