"""API keys in Postgres: create, list, find by secret hash, revoke.

Shared by the router (which checks keys and serves the admin API over them) and the CLI's
`roundhouse up` (which bootstraps the admin key). A revocation writes a `key.revoked` event
through the outbox in the same transaction, so every router drops the key from its cache.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.common.db.models import ApiKey
from services.common.errors import AlreadyExists, InvalidArgument, NotFound
from services.common.events import new_event
from services.common.keys.model import KeyLimits, KeyRecord
from services.common.keys.secrets import hash_secret, new_secret, shown_prefix
from services.common.keys.validation import KEY_NAME_RE, CheckedKey, NewKey, check_new_key
from services.common.outbox import add_to_outbox

log = logging.getLogger(__name__)

ADMIN_KEY_NAME = "admin"
"""The name of the key `roundhouse up` (or `ROUNDHOUSE_ADMIN_KEY`) makes."""


def record_of(row: ApiKey) -> KeyRecord:
    """The domain record of a stored key."""
    return KeyRecord(
        key_id=row.key_id, name=row.name, prefix=row.prefix, admin=row.admin,
        models=tuple(row.models or ()),
        limits=KeyLimits(rpm=row.rpm, tpm=row.tpm, max_parallel=row.max_parallel,
                         budget_tokens=row.budget_tokens, budget_usd=row.budget_usd,
                         budget_period_s=row.budget_period_s),
        created_at=row.created_at, expires_at=row.expires_at, revoked_at=row.revoked_at,
    )


def is_usable(record: KeyRecord, now: datetime | None = None) -> bool:
    """Neither revoked nor expired."""
    now = now or datetime.now(UTC)
    return record.revoked_at is None and (record.expires_at is None or record.expires_at > now)


class KeyStore:
    """The `api_keys` table, behind the domain's `KeyRecord`."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], *, source: str = "router") -> None:
        self._sessions = sessions
        self._source = source

    async def create(self, new: NewKey, *, secret: str | None = None) -> tuple[KeyRecord, str]:
        """Store a new key; returns its record and its secret (the only time it is seen).

        InvalidArgument names the field at fault; AlreadyExists when an unrevoked key has the
        name. `secret` is for the bootstrap admin key, whose secret the operator chose."""
        checked = check_new_key(new)
        secret = secret or new_secret()
        row = self._row(checked, secret)
        async with self._sessions() as session:
            try:
                async with session.begin():
                    session.add(row)
            except IntegrityError as exc:
                if "uq_api_keys_active_name" in str(exc.orig):
                    raise AlreadyExists(f"a key named '{new.name}' already exists; revoke it first "
                                        "or choose another name") from None
                raise
        log.info("API key %s created (%s)", row.name, row.prefix)
        return record_of(row), secret

    async def list(self, *, name: str | None = None, admin: bool | None = None,
                   include_revoked: bool = False, include_expired: bool = True) -> list[KeyRecord]:
        """Keys, oldest first, filtered by name, admin flag, revoked and expired."""
        query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.key_id)
        if name is not None:
            query = query.where(ApiKey.name == name)
        if admin is not None:
            query = query.where(ApiKey.admin.is_(admin))
        if not include_revoked:
            query = query.where(ApiKey.revoked_at.is_(None))
        if not include_expired:
            now = datetime.now(UTC)
            query = query.where((ApiKey.expires_at.is_(None)) | (ApiKey.expires_at > now))
        async with self._sessions() as session:
            return [record_of(row) for row in (await session.scalars(query)).all()]

    async def find(self, key_hash: str) -> KeyRecord | None:
        """The key with this secret hash, revoked or not; None when there is none."""
        async with self._sessions() as session:
            row = await session.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash))
            return record_of(row) if row is not None else None

    async def revoke(self, name: str) -> KeyRecord:
        """Revoke the unrevoked key of that name, and tell every router (`key.revoked`).

        NotFound when no unrevoked key has that name; nothing is changed then."""
        if not isinstance(name, str) or not KEY_NAME_RE.match(name):
            raise NotFound(f"no key named {name!r}")
        async with self._sessions() as session, session.begin():
            row = await session.scalar(
                update(ApiKey).where(ApiKey.name == name, ApiKey.revoked_at.is_(None))
                .values(revoked_at=datetime.now(UTC)).returning(ApiKey))
            if row is None:
                raise NotFound(f"no key named '{name}'")
            add_to_outbox(session, new_event("key.revoked", self._source, key_name=name))
        log.info("API key %s revoked", name)
        return record_of(row)

    async def ensure_admin(self, secret: str) -> KeyRecord:
        """Make `secret` the admin key (name `admin`): kept if already stored, else stored,
        revoking an earlier `admin` key made from another secret."""
        found = await self.find(hash_secret(secret))
        if found is not None and found.admin and is_usable(found):
            return found
        if found is not None:
            raise InvalidArgument("admin key: this secret belongs to a revoked, expired or "
                                  "non-admin key; choose another")
        try:
            await self.revoke(ADMIN_KEY_NAME)
        except NotFound:
            pass
        try:
            record, _ = await self.create(NewKey(name=ADMIN_KEY_NAME, admin=True), secret=secret)
        except AlreadyExists:
            # Another router, started at the same time with the same setting, stored it first.
            found = await self.find(hash_secret(secret))
            if found is None:
                raise
            return found
        return record

    @staticmethod
    def _row(checked: CheckedKey, secret: str) -> ApiKey:
        limits = checked.limits
        expires_at = (datetime.now(UTC) + timedelta(seconds=checked.expires_in_s)
                      if checked.expires_in_s else None)
        return ApiKey(
            key_id=uuid.uuid4().hex, name=checked.name, key_hash=hash_secret(secret),
            prefix=shown_prefix(secret), admin=checked.admin, models=list(checked.models),
            rpm=limits.rpm, tpm=limits.tpm, max_parallel=limits.max_parallel,
            budget_tokens=limits.budget_tokens, budget_usd=limits.budget_usd,
            budget_period_s=limits.budget_period_s, expires_at=expires_at,
            created_at=datetime.now(UTC),
        )
