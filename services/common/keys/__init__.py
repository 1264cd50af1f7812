"""API keys: who may call Roundhouse, on which models, within which limits."""

from services.common.keys.model import KeyLimits, KeyRecord

__all__ = ["KeyLimits", "KeyRecord"]
