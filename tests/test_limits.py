"""Per-key limits against a real Postgres: two limiters on two pools stand for two routers."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg
import pytest
from limits_harness import clear_of_minute_boundary
from polling import wait_until

from services.common.embedded import free_port
from services.common.errors import BudgetExhausted, LimitsUnavailable, RateLimited
from services.common.keys import KeyLimits, KeyRecord
from services.router.limits import Estimate, Limiter, Reservation, open_report

SMALL = Estimate(tokens=100, usd=Decimal("0.0003"))


def key_with(**limits: object) -> KeyRecord:
    """A key of its own (fresh counters) with `limits`."""
    key_id = uuid.uuid4().hex
    return KeyRecord(key_id=key_id, name=f"test-{key_id[:6]}", prefix="rh-test", admin=False,
                     models=(), limits=KeyLimits(**limits))  # type: ignore[arg-type]


@pytest.fixture
async def routers(db_dsn: str) -> AsyncIterator[tuple[Limiter, Limiter]]:
    """Two limiters on two connection pools: what two router processes share is Postgres."""
    pools = [await asyncpg.create_pool(db_dsn, min_size=0, max_size=20) for _ in range(2)]
    yield Limiter(pools[0]), Limiter(pools[1])
    for pool in pools:
        await pool.close()


async def burst(routers: tuple[Limiter, Limiter], key: KeyRecord, n: int,
                estimate: Estimate = SMALL) -> tuple[list[Reservation], list[Exception]]:
    """`n` concurrent first requests of `key`, alternately on either router."""
    results = await asyncio.gather(
        *(routers[i % 2].reserve(key, estimate) for i in range(n)), return_exceptions=True)
    admitted = [r for r in results if isinstance(r, Reservation)]
    refused = [r for r in results if isinstance(r, Exception)]
    assert len(admitted) + len(refused) == n, results
    return admitted, refused


async def test_a_burst_of_first_requests_admits_exactly_rpm(routers: tuple[Limiter, Limiter]) -> None:
    await clear_of_minute_boundary()
    key = key_with(rpm=10)
    admitted, refused = await burst(routers, key, 40)
    assert len(admitted) == 10
    assert all(isinstance(e, RateLimited) for e in refused)
    assert all(1 <= e.retry_after_s <= 60 for e in refused if isinstance(e, RateLimited))
    assert "10 requests per minute" in refused[0].args[0]
    # Settling does not give requests back: a request was made.
    for reservation in admitted:
        await routers[0].settle(reservation, 10, Decimal(0))
    with pytest.raises(RateLimited):
        await routers[1].reserve(key, SMALL)


async def test_never_more_than_max_parallel_in_flight(routers: tuple[Limiter, Limiter]) -> None:
    key = key_with(max_parallel=3)
    in_flight, peak, admitted = 0, 0, 0
    release = asyncio.Event()

    async def request(i: int) -> None:
        nonlocal in_flight, peak, admitted
        try:
            reservation = await routers[i % 2].reserve(key, SMALL)
        except RateLimited:
            return
        in_flight += 1
        admitted += 1
        peak = max(peak, in_flight)
        await release.wait()
        in_flight -= 1
        await routers[(i + 1) % 2].settle(reservation, 50, Decimal(0))

    tasks = [asyncio.create_task(request(i)) for i in range(20)]
    await wait_until(lambda: admitted == 3 and sum(t.done() for t in tasks) == 17)
    release.set()
    await asyncio.gather(*tasks)
    assert peak == 3
    # Settled: the slots are free again, whichever router asks.
    again, refused = await burst(routers, key, 6)
    assert len(again) == 3 and len(refused) == 3


async def test_tokens_per_minute_are_never_overshot(routers: tuple[Limiter, Limiter]) -> None:
    await clear_of_minute_boundary()
    key = key_with(tpm=1000)
    admitted, refused = await burst(routers, key, 30)
    assert len(admitted) == 10
    assert "1000 tokens per minute" in refused[0].args[0]
    # The real usage was smaller: settling gives the difference back to this minute.
    for reservation in admitted[:5]:
        await routers[1].settle(reservation, 20, Decimal(0))
    more, _ = await burst(routers, key, 10)
    assert len(more) == 4  # 5 x 20 + 5 x 100 used; 400 left
    with pytest.raises(RateLimited, match="more than"):
        await routers[0].reserve(key_with(tpm=50), SMALL)


async def test_token_budget_is_never_overshot_and_settle_releases(
    routers: tuple[Limiter, Limiter],
) -> None:
    key = key_with(budget_tokens=500)
    admitted, refused = await burst(routers, key, 20)
    assert len(admitted) == 5
    assert all(isinstance(e, BudgetExhausted) for e in refused)
    assert "does not renew" in refused[0].args[0]
    for reservation in admitted:
        await routers[0].settle(reservation, 50, Decimal(0))
    more, _ = await burst(routers, key, 5)
    assert len(more) == 2  # 250 used: room for two estimates of 100


async def test_dollar_budget_is_never_overshot(routers: tuple[Limiter, Limiter]) -> None:
    key = key_with(budget_usd=Decimal("0.001"), budget_period_s=3600)
    admitted, refused = await burst(routers, key, 10)
    assert len(admitted) == 3
    assert all(isinstance(e, BudgetExhausted) for e in refused)
    assert "renews in" in refused[0].args[0]


async def test_a_budget_renews_after_its_period(routers: tuple[Limiter, Limiter]) -> None:
    key = key_with(budget_tokens=100, budget_period_s=1)
    assert await routers[0].reserve(key, SMALL) is not None
    with pytest.raises(BudgetExhausted):
        await routers[1].reserve(key, SMALL)

    async def renewed() -> bool:
        try:
            return await routers[1].reserve(key, SMALL) is not None
        except BudgetExhausted:
            return False

    await wait_until(renewed, timeout=5, interval=0.1)


async def test_abandoned_reservations_expire(db_dsn: str) -> None:
    pool = await asyncpg.create_pool(db_dsn, min_size=0, max_size=2)
    try:
        crashed, survivor = Limiter(pool, hold_s=0.3), Limiter(pool, hold_s=0.3)
        key = key_with(max_parallel=1)
        assert await crashed.reserve(key, SMALL) is not None  # never settled
        with pytest.raises(RateLimited, match="in flight"):
            await survivor.reserve(key, SMALL)

        async def admitted() -> bool:
            try:
                return await survivor.reserve(key, SMALL) is not None
            except RateLimited:
                return False

        await wait_until(admitted, timeout=5, interval=0.05)
    finally:
        await pool.close()


async def test_headers_status_is_published_to_the_request(routers: tuple[Limiter, Limiter]) -> None:
    await clear_of_minute_boundary()
    key = key_with(rpm=5, tpm=1000)
    report = open_report()
    await routers[0].reserve(key, SMALL)
    assert report.status is not None
    assert (report.status.rpm, report.status.remaining_requests) == (5, 4)
    assert (report.status.tpm, report.status.remaining_tokens) == (1000, 900)
    assert 0 < report.status.reset_s <= 60


async def test_no_key_or_no_limits_costs_no_round_trip() -> None:
    limiter = Limiter(None)
    assert await limiter.reserve(None, SMALL) is None
    assert await limiter.reserve(key_with(), SMALL) is None
    with pytest.raises(LimitsUnavailable):
        await limiter.reserve(key_with(rpm=1), SMALL)


async def test_an_unreachable_store_refuses_limited_keys() -> None:
    pool = await asyncpg.create_pool(f"postgresql://nobody@127.0.0.1:{free_port()}/none",
                                     min_size=0, max_size=1)
    try:
        with pytest.raises(LimitsUnavailable):
            await Limiter(pool, timeout_s=2).reserve(key_with(rpm=1), SMALL)
    finally:
        await pool.close()


class RepliesHeldBack:
    """A pool whose reserve replies wait for `reply`: a request cancelled meanwhile is cancelled
    after Postgres committed its reservation, the moment a client hanging up can hit."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.committed = asyncio.Event()
        self.reply = asyncio.Event()

    async def fetchrow(self, *args: object, **kwargs: object) -> asyncpg.Record | None:
        row = await self.pool.fetchrow(*args, **kwargs)
        self.committed.set()
        await self.reply.wait()
        return row

    async def execute(self, *args: object, **kwargs: object) -> str:
        return await self.pool.execute(*args, **kwargs)


async def test_a_reserve_cancelled_after_it_committed_holds_no_parallel_slot(db_dsn: str) -> None:
    pool = await asyncpg.create_pool(db_dsn, min_size=0, max_size=2)
    try:
        held = RepliesHeldBack(pool)
        limiter = Limiter(held)  # type: ignore[arg-type]
        key = key_with(max_parallel=1)
        request = asyncio.create_task(limiter.reserve(key, SMALL))
        await held.committed.wait()
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        held.reply.set()
        # The slot is free at once, not after the reservation's 900 s hold.
        assert await limiter.reserve(key, SMALL) is not None
        with pytest.raises(RateLimited, match="in flight"):
            await Limiter(pool).reserve(key, SMALL)
    finally:
        await pool.close()


class FailsFirstSettles:
    """A pool whose first `failures` settles fail as if Postgres had gone for a moment."""

    def __init__(self, pool: asyncpg.Pool, failures: int) -> None:
        self.pool, self.failures = pool, failures

    async def fetchrow(self, *args: object, **kwargs: object) -> asyncpg.Record | None:
        return await self.pool.fetchrow(*args, **kwargs)

    async def execute(self, *args: object, **kwargs: object) -> str:
        if self.failures:
            self.failures -= 1
            raise ConnectionResetError("connection lost")
        return await self.pool.execute(*args, **kwargs)


async def test_a_settle_that_fails_once_is_retried(db_dsn: str) -> None:
    pool = await asyncpg.create_pool(db_dsn, min_size=0, max_size=2)
    try:
        limiter = Limiter(FailsFirstSettles(pool, failures=1))  # type: ignore[arg-type]
        key = key_with(max_parallel=1)
        reservation = await limiter.reserve(key, SMALL)
        await limiter.settle(reservation, 10, Decimal(0))
        assert await limiter.reserve(key, SMALL) is not None  # the slot came back
    finally:
        await pool.close()
