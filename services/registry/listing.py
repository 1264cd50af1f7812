"""Listing assets: the filters a list call takes, and its pages (opaque tokens, by asset id)."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Select, select

from services.common.db.models import Asset
from services.common.errors import InvalidArgument
from services.common.request_text import shown

CAPABILITY_FILTERS = {"chat", "embeddings", "streaming", "system_role", "tools"}
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000
_TOKEN_PREFIX = "after:"


@dataclass(frozen=True)
class AssetFilter:
    """Filters of a list call; empty values match everything."""

    interface: str = ""
    runtime: str = ""
    state: str = ""
    capability: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    asset_class: str = ""


def page_query(filters: AssetFilter, size: int, page_token: str) -> Select[Asset]:
    """The assets matching `filters` after `page_token`, ordered by id: one more than `size`,
    to tell whether a next page follows. `InvalidArgument` for a bad token or capability."""
    query = select(Asset).order_by(Asset.asset_id).limit(size + 1)
    if page_token:
        query = query.where(Asset.asset_id > _decode_token(page_token))
    if filters.interface:
        query = query.where(Asset.interfaces.contains([filters.interface]))
    if filters.runtime:
        query = query.where(Asset.runtime == filters.runtime)
    if filters.state:
        query = query.where(Asset.state == filters.state)
    if filters.asset_class:
        query = query.where(Asset.asset_class == filters.asset_class)
    if filters.labels:
        query = query.where(Asset.labels.contains(filters.labels))
    if filters.capability:
        query = query.where(_capability_clause(filters.capability))
    return query


def next_page_token(rows: list[Asset], size: int) -> str:
    """The token of the page after `rows` (as `page_query` fetched them); '' at the end."""
    return _encode_token(rows[size - 1].asset_id) if len(rows) > size else ""


def _capability_clause(capability: str) -> Any:
    if capability not in CAPABILITY_FILTERS:
        raise InvalidArgument(
            f"capability: unknown {shown(capability)}; one of {', '.join(sorted(CAPABILITY_FILTERS))}"
        )
    if capability == "chat":
        return Asset.interfaces.contains(["llm-runtime"])
    if capability == "embeddings":
        return Asset.interfaces.contains(["embedding-runtime"])
    name = {"system_role": "supports_system_role", "tools": "supports_tools"}.get(
        capability, capability
    )
    return Asset.capabilities[name].as_boolean().is_(True)


def _encode_token(asset_id: str) -> str:
    """The page token of the page that starts after `asset_id`."""
    return base64.urlsafe_b64encode(f"{_TOKEN_PREFIX}{asset_id}".encode()).decode()


def _decode_token(token: str) -> str:
    try:
        text = base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    # A NUL would reach the query (Postgres refuses it); no token this server issues has one.
    if not text.startswith(_TOKEN_PREFIX) or "\x00" in text:
        raise InvalidArgument("page_token: not a token this server issued")
    return text.removeprefix(_TOKEN_PREFIX)
