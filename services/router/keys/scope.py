"""Scopes: which models a key may use, and whether it may use the admin API."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from services.common.errors import ModelNotAllowed, PermissionDenied
from services.common.keys import KeyRecord
from services.common.route_proto import Stored

S = TypeVar("S", bound=Stored)


def may_use(key: KeyRecord | None, record: Stored) -> bool:
    """Whether `key` may use the asset (a model or a route): no key (auth off), a key for
    every model, or one whose `models` name the asset by id or by one of its aliases. A key
    that may use a route may use it whatever its targets are."""
    if key is None or not key.models:
        return True
    names = {record.spec.asset_id, *record.spec.aliases}
    return not names.isdisjoint(key.models)


def check_model(key: KeyRecord | None, record: Stored, requested: str) -> None:
    """ModelNotAllowed unless `key` may use the asset `requested` resolved to."""
    if not may_use(key, record):
        raise ModelNotAllowed(f"this API key may not use the model '{requested}'")


def allowed_models(key: KeyRecord | None, records: Sequence[S]) -> list[S]:
    """The assets `key` may use, in order."""
    return [r for r in records if may_use(key, r)]


def check_admin(key: KeyRecord | None) -> None:
    """PermissionDenied unless `key` is an admin key (or auth is off)."""
    if key is not None and not key.admin:
        raise PermissionDenied("this API key may not use the admin API; use an admin key")
