"""Page tokens of `ListOperations`: a cursor on (created_at, operation id), newest first."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta

from services.common.errors import InvalidArgument

DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 50, 500
PAGE_TOKEN_RE = re.compile(r"([0-9]{1,17})\.([0-9a-f]{32})")
"""A page token: the last row's `created_at` in microseconds since the epoch, a dot, its
operation id in hex. Every token of this form is a cursor: one this server never issued simply
continues from that point (17 digits stay within the years datetime and Postgres hold); only a
malformed token is refused. The router's admin API declares the same pattern."""
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def encode_token(created_at: datetime, operation_id: uuid.UUID) -> str:
    """The token of the page that follows the operation created at `created_at`."""
    return f"{(created_at - _EPOCH) // _MICROSECOND}.{operation_id.hex}"


def decode_token(token: str) -> tuple[datetime, uuid.UUID]:
    """The (created_at, operation id) cursor a token names; `InvalidArgument` when malformed."""
    parsed = PAGE_TOKEN_RE.fullmatch(token)
    if parsed is None:
        raise InvalidArgument("page_token: not a page token (microseconds.operation id in hex), "
                              "as returned in next_page_token")
    return _EPOCH + int(parsed[1]) * _MICROSECOND, uuid.UUID(parsed[2])
