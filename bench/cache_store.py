"""Response cache store: NATS JetStream key-value (the cache as built) vs a Postgres table.

Times, one call at a time, a lookup that hits and a store of a ~2 KiB answer through
`ResponseCache` on a scratch bucket, and the same two operations on a scratch Postgres table
(`key` primary key, `value`, `expires_at`): an upsert, and a select by key that checks the
expiry. Postgres is reached as the router reaches it for its limits (`create_pool`:
`synchronous_commit=off`, no reset query); `--unlogged` makes the table UNLOGGED, the most a
cache table could ask of Postgres. Calls are interleaved so both stores share the machine's
conditions; the scratch bucket and table are removed at the end.

Against the servers `ROUNDHOUSE_NATS_URL` / `ROUNDHOUSE_DATABASE_URL` (or `--nats-url`,
`--database-url`) name; embedded ones on free ports where neither is given.

Run: .venv/bin/python -m bench.cache_store [--calls 3000] [--value-bytes 2048] [--keys 1000]
     [--storage file|memory] [--unlogged]
Target: none (it decides the store: the ratio is NATS over Postgres at p50).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import time
import uuid
from collections.abc import Awaitable, Iterator
from pathlib import Path

import asyncpg
import nats
from nats.js.api import StorageType
from prometheus_client import CollectorRegistry

from bench.results import percentile, record, summary
from bench.stack import print_table
from services.common.embedded import EmbeddedNats, EmbeddedPostgres
from services.router.cache import ResponseCache
from services.router.limits import create_pool

WARMUP = 200
ROUTE = "bench"


class PostgresStore:
    """The alternative: one scratch table, upsert and select by key."""

    def __init__(self, pool: asyncpg.Pool, table: str) -> None:
        self._pool = pool
        self._table = table
        self._upsert = (f"INSERT INTO {table} (key, value, expires_at) "
                        "VALUES ($1, $2, now() + make_interval(secs => $3)) "
                        "ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at")
        self._select = f"SELECT value FROM {table} WHERE key = $1 AND expires_at > now()"

    async def create(self, unlogged: bool) -> None:
        """Create the scratch table."""
        async with self._pool.acquire() as conn:
            await conn.execute(f"CREATE {'UNLOGGED ' if unlogged else ''}TABLE {self._table} "
                               "(key text PRIMARY KEY, value bytea NOT NULL, expires_at timestamptz NOT NULL)")

    async def drop(self) -> None:
        """Remove the scratch table."""
        async with self._pool.acquire() as conn:
            await conn.execute(f"DROP TABLE IF EXISTS {self._table}")

    async def get(self, key: str) -> bytes | None:
        """The value under `key` while it lasts."""
        async with self._pool.acquire() as conn:
            value: bytes | None = await conn.fetchval(self._select, key)
            return value

    async def put(self, key: str, value: bytes, ttl_s: int) -> None:
        """Keep `value` under `key` for `ttl_s` seconds."""
        async with self._pool.acquire() as conn:
            await conn.execute(self._upsert, key, value, float(ttl_s))


async def _timed(call: Awaitable[object], into: list[float]) -> object:
    """Await `call` (nothing of it runs before), appending its time in ms to `into`."""
    start = time.perf_counter()
    result = await call
    into.append((time.perf_counter() - start) * 1000)
    return result


async def measure(nats_url: str, dsn: str, args: argparse.Namespace) -> dict[str, list[float]]:
    """Latencies in ms of each store's get (a hit) and put, interleaved."""
    suffix = uuid.uuid4().hex[:10]
    nc = await nats.connect(nats_url)
    cache = ResponseCache(nc, bucket=f"bench_responses_{suffix}", registry=CollectorRegistry(),
                          storage=StorageType(args.storage))
    pool = await create_pool(dsn, max_size=2)
    table = PostgresStore(pool, f"bench_responses_{suffix}")
    await cache.start()
    await table.create(args.unlogged)
    value = os.urandom(args.value_bytes)
    keys = [f"r1.{uuid.uuid4().hex}{uuid.uuid4().hex}" for _ in range(args.keys)]
    times: dict[str, list[float]] = {"nats_get": [], "nats_put": [], "pg_get": [], "pg_put": []}
    try:
        for i in range(WARMUP + args.calls):
            key = keys[i % len(keys)]
            got: dict[str, list[float]] = times if i >= WARMUP else {k: [] for k in times}
            stored = await _timed(cache.put(ROUTE, key, value, ttl_s=600, max_bytes=None), got["nats_put"])
            await _timed(table.put(key, value, 600), got["pg_put"])
            hit = await _timed(cache.get(ROUTE, key), got["nats_get"])
            row = await _timed(table.get(key), got["pg_get"])
            if not stored or hit != value or row != value:
                raise RuntimeError(f"call {i}: a store lost the value (nats stored={stored}, "
                                   f"nats hit={hit == value}, postgres hit={row == value})")
    finally:
        await table.drop()
        await pool.close()
        await nc.jetstream().delete_stream(f"KV_{cache.bucket}")
        await cache.close()
        await nc.close()
    return times


@contextlib.contextmanager
def servers(nats_url: str | None, dsn: str | None) -> Iterator[tuple[str, str]]:
    """The NATS URL and Postgres DSN to measure against, starting embedded servers for those
    not given."""
    with contextlib.ExitStack() as stack:
        root: Path | None = None
        if nats_url is None or dsn is None:
            root = Path(tempfile.mkdtemp(prefix="roundhouse-bench-cache-"))
            os.chmod(root, 0o755)  # embedded Postgres runs as an unprivileged user
        if nats_url is None:
            assert root is not None
            nats_server = EmbeddedNats(root / "nats")
            nats_url = nats_server.start()
            stack.callback(nats_server.stop)
        if dsn is None:
            assert root is not None
            dsn = stack.enter_context(EmbeddedPostgres(root / "postgres")).dsn
        yield nats_url, dsn


def main() -> None:
    """Measure and print p50/p99 of both stores and the ratios at p50."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--value-bytes", type=int, default=2048)
    parser.add_argument("--keys", type=int, default=1000, help="distinct keys, cycled")
    parser.add_argument("--storage", choices=["file", "memory"], default="file", help="the bucket's")
    parser.add_argument("--unlogged", action="store_true", help="an UNLOGGED Postgres table")
    parser.add_argument("--nats-url", default=os.environ.get("ROUNDHOUSE_NATS_URL"))
    parser.add_argument("--database-url", default=os.environ.get("ROUNDHOUSE_DATABASE_URL"))
    args = parser.parse_args()
    with servers(args.nats_url, args.database_url) as (nats_url, dsn):
        times = asyncio.run(measure(nats_url, dsn, args))
    pg = f"postgres ({'unlogged' if args.unlogged else 'logged'} table)"
    rows = [[f"{store}, {op}", f"{percentile(times[k], 50):.3f}", f"{percentile(times[k], 99):.3f}"]
            for store, prefix in ((f"nats kv ({args.storage})", "nats"), (pg, "pg"))
            for op, k in (("get (hit)", f"{prefix}_get"), ("put", f"{prefix}_put"))]
    print_table(f"response cache store, {args.value_bytes} B values, one call at a time",
                ["store, operation", "p50 ms", "p99 ms"], rows)
    ratios = {op: percentile(times[f"nats_{op}"], 50) / percentile(times[f"pg_{op}"], 50) for op in ("get", "put")}
    print(f"nats kv / postgres at p50: get {ratios['get']:.2f}, put {ratios['put']:.2f} (below 1: nats is faster)")
    record("cache_store", {
        "calls": args.calls, "value_bytes": args.value_bytes, "keys": args.keys, "storage": args.storage,
        "postgres_table": "unlogged" if args.unlogged else "logged",
        **{f"{k}_ms": summary(v) for k, v in times.items()},
        "ratio_get_p50": ratios["get"], "ratio_put_p50": ratios["put"]})


if __name__ == "__main__":
    main()
