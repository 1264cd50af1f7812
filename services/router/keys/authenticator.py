"""Key lookup: a presented secret → its `KeyRecord`, or `Unauthenticated`.

Lookups are cached by secret hash for `cache_s` seconds (10 by default), so a busy key costs
one Postgres query per period, not one per request. A revocation does not wait for that:
every router subscribes to `key.revoked` events and drops the key from its cache at once,
and the whole cache when NATS reconnects (events may have been missed meanwhile). Expiry is
checked on every request, cached or not. Unknown secrets are never cached: a flood of
made-up keys would otherwise fill memory.

A lookup that was under way while a revocation arrived may have read the row from before it;
such a result is used for that one request but not cached (`_generation` tells), or the key
would live on for `cache_s` after its revocation event came and went.

While Postgres does not answer (a restart, a failover), a key looked up within the last
`stale_s` seconds (300 by default) is still served from the cache, so known keys keep working
through a short database outage; revocations still reach the cache as events meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from services.common.db.unavailable import database_unavailable
from services.common.errors import Unauthenticated
from services.common.keys import KeyRecord, KeyStore, hash_secret, is_usable
from services.common.keys.tokens import looks_like_secret
from services.router.metrics.spans import step

log = logging.getLogger(__name__)

BEARER = "bearer "
INVALID_KEY = ("Incorrect API key provided. Pass a Roundhouse key (rh-...) as "
               "'Authorization: Bearer <key>' or 'x-api-key: <key>'.")
MISSING_KEY = ("You didn't provide an API key. Pass a Roundhouse key (rh-...) as "
               "'Authorization: Bearer <key>' or 'x-api-key: <key>'.")


def credential_from(authorization: str | None, api_key: str | None) -> str:
    """The secret an HTTP request or gRPC call presents: `Authorization: Bearer <key>` (the
    `Bearer` word may be left out in gRPC metadata), else `x-api-key`. Unauthenticated when
    there is none or the header is malformed."""
    if authorization is not None:
        value = authorization.strip()
        if value.lower().startswith(BEARER):
            value = value[len(BEARER):].strip()
        if not value:
            raise Unauthenticated(MISSING_KEY)
        return value
    if api_key is not None and api_key.strip():
        return api_key.strip()
    raise Unauthenticated(MISSING_KEY)


def credential_from_metadata(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """`credential_from` for a gRPC call: its `authorization` or `x-api-key` metadata."""
    found = {str(k).lower(): v for k, v in (metadata or ())}
    authorization, api_key = found.get("authorization"), found.get("x-api-key")
    return credential_from(authorization if isinstance(authorization, str) else None,
                           api_key if isinstance(api_key, str) else None)


class KeyAuthenticator:
    """Checks presented secrets against the key store, with a short cache."""

    def __init__(self, store: KeyStore, *, cache_s: float = 10.0, stale_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self._cache_s = cache_s
        self._stale_s = stale_s
        self._clock = clock
        self._cache: dict[str, tuple[float, KeyRecord]] = {}
        self._generation = 0
        """Bumped by every `forget`/`forget_all`: a lookup begun before one is not cached."""

    async def authenticate(self, secret: str) -> KeyRecord:
        """The usable key with this secret; Unauthenticated when malformed, unknown, revoked or
        expired (one message for all: a caller learns nothing about which). The check is a
        `key check` span."""
        with step("key check"):
            return await self._authenticate(secret)

    async def _authenticate(self, secret: str) -> KeyRecord:
        if not looks_like_secret(secret):
            raise Unauthenticated(INVALID_KEY)
        digest = hash_secret(secret)
        cached = self._cache.get(digest)
        now = self._clock()
        if cached is not None and cached[0] > now:
            record = cached[1]
        else:
            generation = self._generation
            try:
                found = await self.store.find(digest)
            except Exception as exc:
                if cached is None or now - cached[0] > self._stale_s or not database_unavailable(exc):
                    raise
                log.warning("key store unavailable; serving key %s from a lookup %.0fs past its "
                            "cache period", cached[1].name, now - cached[0])
                return self._usable(cached[1])
            if found is None:
                self._cache.pop(digest, None)
                raise Unauthenticated(INVALID_KEY)
            record = found
            if generation == self._generation:
                self._cache[digest] = (now + self._cache_s, record)
        return self._usable(record)

    @staticmethod
    def _usable(record: KeyRecord) -> KeyRecord:
        if not is_usable(record):
            raise Unauthenticated(INVALID_KEY)
        return record

    def forget(self, name: str) -> None:
        """Drop every cached key of that name (it was revoked), and keep lookups under way
        from caching what they read before the revocation."""
        self._generation += 1
        for digest, (_, record) in list(self._cache.items()):
            if record.name == name:
                del self._cache[digest]
        log.info("API key %s dropped from the key cache", name)

    def forget_all(self) -> None:
        """Drop the whole cache (revocations may have been missed), lookups under way included."""
        self._generation += 1
        self._cache.clear()
