"""Key and limit checks: what a request with a limited API key adds to the router's path.

Starts an embedded Postgres (migrated), creates a key with every limit set, and runs, per
request, the steps the router adds before the worker is called: the key lookup
(`KeyAuthenticator.authenticate`, cached as in the router) and the reservation
(`Limiter.reserve`: one statement that checks rpm, tpm, max_parallel and both budgets). The
settle (`Limiter.settle`) runs in the background once the answer is complete, as in the router,
and is finished before the next request starts (as it is while a real response travels back),
so it is not in the timed path. The baseline is the same path with auth disabled (no key: the
same calls, which then do nothing). Both are interleaved and timed one request at a time.

Run: .venv/bin/python -m bench.keys [--calls 3000]
Target: <= 0.3 ms added at p50.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from decimal import Decimal
from pathlib import Path

from bench.results import percentile, record, summary
from bench.stack import print_table
from services.common.db import make_engine, make_sessionmaker
from services.common.db.migrate import upgrade
from services.common.embedded import EmbeddedPostgres
from services.common.keys import KeyRecord, KeyStore, NewKey
from services.router.keys import KeyAuthenticator
from services.router.limits import Estimate, Limiter, create_pool

ESTIMATE = Estimate(tokens=40, usd=Decimal("0.00004"))
BIG = 1_000_000_000


async def one(authenticator: KeyAuthenticator | None, limiter: Limiter, secret: str) -> float:
    """The steps one request adds before its worker call, in ms."""
    start = time.perf_counter()
    key: KeyRecord | None = await authenticator.authenticate(secret) if authenticator else None
    reservation = await limiter.reserve(key, ESTIMATE)
    elapsed = (time.perf_counter() - start) * 1000
    await limiter.settle(reservation, 30, Decimal("0.00003"))
    return elapsed


async def measure(dsn: str, calls: int) -> tuple[list[float], list[float]]:
    """Latencies (ms) with a limited key and with auth disabled, interleaved."""
    engine = make_engine(dsn)
    pool = await create_pool(dsn, max_size=4)
    try:
        store = KeyStore(make_sessionmaker(engine))
        _, secret = await store.create(NewKey(
            name="bench", rpm=BIG // 1000, tpm=BIG, max_parallel=64, budget_tokens=BIG,
            budget_usd=Decimal(1_000_000), budget_period="30d"))
        authenticator = KeyAuthenticator(store, cache_s=600)
        limiter = Limiter(pool)
        for _ in range(200):
            await one(authenticator, limiter, secret)
            await one(None, limiter, secret)
        keyed, open_ = [], []
        for _ in range(calls):
            keyed.append(await one(authenticator, limiter, secret))
            open_.append(await one(None, limiter, secret))
        return keyed, open_
    finally:
        await pool.close()
        await engine.dispose()


def main() -> None:
    """Measure and print p50/p99 of both paths and the difference at p50."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="roundhouse-bench-keys-"))
    os.chmod(root, 0o755)  # embedded Postgres runs as an unprivileged user
    with EmbeddedPostgres(root / "postgres") as postgres:
        upgrade(postgres.dsn)
        keyed, open_ = asyncio.run(measure(postgres.dsn, args.calls))
    rows = [[name, f"{percentile(v, 50):.3f}", f"{percentile(v, 99):.3f}", f"{statistics.mean(v):.3f}"]
            for name, v in (("auth disabled", open_), ("limited key", keyed))]
    print_table("key and limit checks, one request at a time", ["path", "p50 ms", "p99 ms", "mean ms"], rows)
    added = percentile(keyed, 50) - percentile(open_, 50)
    print(f"added by the key and limit checks at p50: {added:.3f} ms (target <= 0.3 ms)")
    record("keys", {"calls": args.calls, "auth_disabled_ms": summary(open_), "limited_key_ms": summary(keyed),
                    "added_p50_ms": added})


if __name__ == "__main__":
    main()
