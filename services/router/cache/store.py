"""The response cache's store: a NATS JetStream key-value bucket every router shares.

One bucket (`roundhouse_responses` unless told) holds the cached answers, one per key (see
`keys.cache_key`), as opaque bytes behind a small header that carries the entry's expiry. The
bucket has one `max_age` for all its entries, so each entry's own TTL (its route's `ttl_s`)
is kept in that header and an entry past it reads as a miss; the bucket's `max_age` is the
longest TTL allowed (`MAX_TTL_S`, one day), after which JetStream removes the entry itself.
The bucket's `max_bytes` bounds the total, and it discards the oldest entries first to make
room (a full cache keeps taking new answers).

A cache that cannot be reached is a miss, never a failed request: `get` and `put` wait at most
`timeout_s` for NATS, log the trouble (once per outage) and count it; a bucket that cannot be
opened, or may be gone after a failure, is opened (and created) again in the background, never
on a request's path. Expiry is judged by the wall clock, which the routers share (give `clock`
to judge it otherwise).
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Callable

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StorageType, StreamConfig
from nats.js.client import KV_PRE_TEMPLATE, KV_STREAM_TEMPLATE
from nats.js.kv import KeyValue
from prometheus_client import CollectorRegistry, Counter

from services.common.routespec import MAX_CACHE_TTL_S
from services.common.tasks import cancel_and_wait

log = logging.getLogger(__name__)

DEFAULT_BUCKET = "roundhouse_responses"
DEFAULT_MAX_TOTAL_BYTES = 256 * 1024 * 1024
"""The whole cache's bound (the bucket's `max_bytes`, message overhead included)."""
DEFAULT_MAX_ENTRY_BYTES = 512 * 1024
"""The largest answer kept when the route gives no `max_bytes` of its own."""
MAX_TTL_S = MAX_CACHE_TTL_S
"""The longest an entry is served, whatever its route asks: the bucket's `max_age`."""
DEFAULT_TIMEOUT_S = 0.5
"""How long one lookup or store may wait for NATS before it counts as a miss or an error."""
OPEN_TIMEOUT_S = 5.0
"""How long opening (or creating) the bucket may wait for NATS."""
REOPEN_AFTER_S = 2.0
"""How long after a failed attempt to open the bucket the next one starts."""

_HEADER = struct.Struct(">BQ")
"""Before each value: the layout version and the expiry, in ms since the epoch."""
_VERSION = 1
_NATS_TROUBLE = (nats.errors.Error, TimeoutError, OSError)


class ResponseCache:
    """Cached answers shared by every router: `get` a key's value, `put` one with its TTL.

    Give it the router's NATS connection (a `Client`) to share it, or a URL to open its own.
    Metrics go to `registry` (a private one when None):
    `roundhouse_response_cache_lookups_total{route, result=hit|miss}` and
    `roundhouse_response_cache_stores_total{route, result=stored|too_large|error}`.
    """

    def __init__(
        self,
        nats_connection: Client | str,
        *,
        bucket: str = DEFAULT_BUCKET,
        max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
        registry: CollectorRegistry | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        storage: StorageType = StorageType.FILE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`max_total_bytes`: the bucket's bound when this cache creates it (an existing bucket
        keeps its own). `max_entry_bytes`: the largest value kept when `put` gets no
        `max_bytes`. `storage`: where NATS keeps a bucket this cache creates. `clock`: seconds
        since the epoch, as every router sees them."""
        if max_total_bytes <= 0 or max_entry_bytes <= 0:
            raise ValueError("the cache's bounds must be positive")
        self._url = nats_connection if isinstance(nats_connection, str) else None
        self._nc: Client | None = None if isinstance(nats_connection, str) else nats_connection
        self._js: JetStreamContext | None = None
        """For lookups and stores, which wait `timeout_s` at most."""
        self._admin: JetStreamContext | None = None
        """For opening the bucket, which may take longer (a stream created in a cluster)."""
        self._kv: KeyValue | None = None
        self._reopening: asyncio.Task[None] | None = None
        self.bucket = bucket
        self.max_total_bytes = max_total_bytes
        self.max_entry_bytes = max_entry_bytes
        self._timeout_s = timeout_s
        self._storage = storage
        self._clock = clock
        self._troubled = False
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._lookups = Counter(
            "roundhouse_response_cache_lookups", "Response cache lookups, by route and result (hit, miss).",
            ["route", "result"], registry=self.registry)
        self._stores = Counter(
            "roundhouse_response_cache_stores",
            "Answers offered to the response cache, by route and result (stored, too_large, error).",
            ["route", "result"], registry=self.registry)

    async def start(self) -> None:
        """Open the bucket, creating it if no router has yet (safe when routers race).

        With a URL, connect first (raising if NATS cannot be reached). A bucket that cannot be
        opened now is opened in the background; until then every lookup misses.
        """
        if self._nc is None:
            if self._url is None:
                raise RuntimeError("a closed response cache cannot start again")
            self._nc = await nats.connect(self._url, name="roundhouse-response-cache",
                                          max_reconnect_attempts=-1, reconnect_time_wait=2)
        self._js = self._nc.jetstream(timeout=self._timeout_s)
        self._admin = self._nc.jetstream(timeout=max(self._timeout_s, OPEN_TIMEOUT_S))
        if not (self._nc.is_connected and await self._open()):
            self._reopen_later()

    async def close(self) -> None:
        """Stop using the bucket; close the connection if this cache opened it."""
        if self._reopening is not None:
            task, self._reopening = self._reopening, None
            await cancel_and_wait(task)
        self._kv = self._js = self._admin = None
        nc, self._nc = self._nc, None
        if self._url is not None and nc is not None:
            await nc.close()

    async def get(self, route_id: str, key: str) -> bytes | None:
        """The value stored under `key` while its TTL lasts, else None (a miss: absent,
        expired, or the cache unreachable). Counted under `route_id`."""
        value = await self._lookup(key)
        self._lookups.labels(route_id, "miss" if value is None else "hit").inc()
        return value

    async def put(self, route_id: str, key: str, value: bytes, *, ttl_s: int, max_bytes: int | None) -> bool:
        """Keep `value` under `key` for `ttl_s` seconds (at most `MAX_TTL_S`); whether it was.

        False, counted `too_large`, when `value` is over `max_bytes` (the cache's
        `max_entry_bytes` when None) or could never fit the bucket or a NATS message; False,
        counted `error`, when NATS did not take it. Raises only `ValueError`, for a TTL below 1 s.
        """
        if ttl_s < 1:
            raise ValueError(f"ttl_s must be at least 1, got {ttl_s}")
        bound = self.max_entry_bytes if max_bytes is None else max_bytes
        expires_ms = int((self._clock() + min(ttl_s, MAX_TTL_S)) * 1000)
        framed = _HEADER.pack(_VERSION, expires_ms) + value
        if len(value) > bound or not self._fits(len(framed)):
            self._stores.labels(route_id, "too_large").inc()
            return False
        stored = await self._store(key, framed)
        self._stores.labels(route_id, "stored" if stored else "error").inc()
        return stored

    def _fits(self, size: int) -> bool:
        """Whether a framed value of `size` bytes can be stored at all: within the bucket's
        bound and the server's largest message."""
        limit = self.max_total_bytes
        if self._nc is not None and self._nc.max_payload:
            limit = min(limit, self._nc.max_payload - 1024)  # room for the subject and protocol
        return size <= limit

    async def _lookup(self, key: str) -> bytes | None:
        kv = self._usable()
        if kv is None:
            return None
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            self._fine()
            return None
        except _NATS_TROUBLE as exc:
            self._failed("a lookup missed", exc)
            return None
        self._fine()
        return self._unframe(entry.value or b"")

    async def _store(self, key: str, framed: bytes) -> bool:
        kv = self._usable()
        if kv is None:
            return False
        try:
            await kv.put(key, framed)
        except _NATS_TROUBLE as exc:
            self._failed("an answer was not stored", exc)
            return False
        self._fine()
        return True

    def _unframe(self, data: bytes) -> bytes | None:
        """The value of a stored entry; None when it has expired or is not in this layout."""
        if len(data) < _HEADER.size:
            return None
        version, expires_ms = _HEADER.unpack_from(data)
        if version != _VERSION or self._clock() * 1000 >= expires_ms:
            return None
        return data[_HEADER.size:]

    def _usable(self) -> KeyValue | None:
        """The bucket, if it is open and NATS is connected."""
        if self._nc is None or self._kv is None:
            return None  # not started, closed, or not opened yet
        if not self._nc.is_connected:
            self._trouble("NATS is unreachable", None)
            return None
        return self._kv

    def _failed(self, what: str, exc: Exception) -> None:
        """Log a failed lookup or store, and check the bucket in the background: its stream may
        be gone (a server restarted without its store), and is then created again."""
        self._trouble(what, exc)
        self._reopen_later()

    async def _open(self) -> bool:
        """Open or create the bucket; whether it is open."""
        if self._js is None or self._admin is None:
            return False
        try:
            await _open_bucket(self._admin, self._bucket_config())
            # Lookups and stores go through the context with the short timeout.
            self._kv = await self._js.key_value(self.bucket)
        except _NATS_TROUBLE as exc:
            self._trouble(f"could not open the {self.bucket} bucket", exc)
            return False
        self._fine()
        return True

    def _reopen_later(self) -> None:
        """Open the bucket in the background, trying every `REOPEN_AFTER_S` until it opens (or
        the cache closes); lookups and stores meanwhile use the bucket as it was."""
        if self._reopening is None or self._reopening.done():
            self._reopening = asyncio.create_task(self._reopen_forever(), name="response-cache-open")

    async def _reopen_forever(self) -> None:
        while self._js is not None:
            if self._nc is not None and self._nc.is_connected and await self._open():
                return
            await asyncio.sleep(REOPEN_AFTER_S)

    def _bucket_config(self) -> StreamConfig:
        """The stream behind the bucket: the key-value layout, one value per key, the oldest
        entries discarded once the bucket holds `max_total_bytes`."""
        return StreamConfig(
            name=KV_STREAM_TEMPLATE.format(bucket=self.bucket),
            description="Roundhouse response cache",
            subjects=[f"{KV_PRE_TEMPLATE.format(bucket=self.bucket)}>"],
            max_msgs_per_subject=1,
            max_bytes=self.max_total_bytes,
            max_age=float(MAX_TTL_S),
            discard=DiscardPolicy.OLD,
            storage=self._storage,
            allow_direct=True,
            allow_rollup_hdrs=True,
            deny_delete=True,
            duplicate_window=120.0,
        )

    def _trouble(self, what: str, exc: BaseException | None) -> None:
        """Log a NATS problem: a warning the first time after things worked, then quietly."""
        level = logging.DEBUG if self._troubled else logging.WARNING
        self._troubled = True
        log.log(level, "response cache: %s (%s)", what,
                "not connected to NATS" if exc is None else repr(exc))

    def _fine(self) -> None:
        if self._troubled:
            self._troubled = False
            log.info("response cache reachable again")


async def _open_bucket(js: JetStreamContext, config: StreamConfig) -> None:
    """Make sure the bucket `config` describes exists, created by whichever router needs it
    first; an existing bucket is taken as it is."""
    assert config.name is not None
    try:
        await js.stream_info(config.name)
        return
    except nats.js.errors.NotFoundError:
        pass
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError:
        pass  # created by another router meanwhile
