"""Cache: exact-match answers shared by every router (keys, cacheable check, the store)."""

from services.router.cache.keys import SHARED_SCOPE, cache_key, canonical_body, chat_cacheable, greedy
from services.router.cache.store import (
    DEFAULT_MAX_ENTRY_BYTES,
    DEFAULT_MAX_TOTAL_BYTES,
    MAX_TTL_S,
    ResponseCache,
)

__all__ = ["DEFAULT_MAX_ENTRY_BYTES", "DEFAULT_MAX_TOTAL_BYTES", "MAX_TTL_S", "SHARED_SCOPE",
           "ResponseCache", "cache_key", "canonical_body", "chat_cacheable", "greedy"]
