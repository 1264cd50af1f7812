"""API keys: who may call Roundhouse, on which models, within which limits."""

from services.common.keys.model import KeyLimits, KeyRecord
from services.common.keys.store import ADMIN_KEY_NAME, KeyStore, is_usable
from services.common.keys.tokens import hash_secret, new_secret
from services.common.keys.validation import NewKey, parse_duration

__all__ = ["ADMIN_KEY_NAME", "KeyLimits", "KeyRecord", "KeyStore", "NewKey", "hash_secret",
           "is_usable", "new_secret", "parse_duration"]
