"""API keys in Postgres: create, list, find by secret hash, revoke.

Shared by the router (which checks keys and serves the admin API over them) and the CLI's
`roundhouse up` (which bootstraps the admin key). A revocation writes a `key.revoked` event
through the outbox in the same transaction, so every router drops the key from its cache.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.common.db.models import ApiKey
from services.common.errors import AlreadyExists, InvalidArgument, NotFound
from services.common.events import new_event
from services.common.keys.model import KeyLimits, KeyRecord
from services.common.keys.tokens import hash_secret, new_secret
from services.common.keys.validation import KEY_NAME_RE, CheckedKey, NewKey, check_new_key
from services.common.outbox import add_to_outbox
from services.common.secrets import shown_key_part

log = logging.getLogger(__name__)

ADMIN_KEY_NAME = "admin"
"""The name of the key `roundhouse up` (or `ROUNDHOUSE_ADMIN_KEY`) makes."""
ADMIN_LOCK_ID = 0x52480001
"""`pg_advisory_xact_lock` id that serialises `ensure_admin` across routers and the CLI."""


def record_of(row: ApiKey) -> KeyRecord:
    """The domain record of a stored key."""
    return KeyRecord(
        # Rows made before the one display rule kept a longer prefix: show only what it allows.
        key_id=row.key_id, name=row.name, prefix=shown_key_part(row.prefix), admin=row.admin,
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

    async def create(self, new: NewKey) -> tuple[KeyRecord, str]:
        """Store a new key; returns its record and its secret (the only time it is seen).

        InvalidArgument names the field at fault; AlreadyExists when an unrevoked key has the
        name."""
        checked = check_new_key(new)
        secret = new_secret()
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
        record = record_of(row)
        log.info("API key %s created (%s)", record.name, record.masked)
        return record, secret

    async def list(self, *, include_revoked: bool = False) -> list[KeyRecord]:
        """Keys, oldest first; unrevoked ones only unless `include_revoked`."""
        query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.key_id)
        if not include_revoked:
            query = query.where(ApiKey.revoked_at.is_(None))
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
        if not isinstance(name, str) or not KEY_NAME_RE.fullmatch(name):
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
        revoking any other unrevoked `admin` key (a rotation to a new secret).

        One transaction under an advisory lock, so routers starting at once with the same
        `ROUNDHOUSE_ADMIN_KEY` agree on one row instead of revoking each other's. Revocation is
        final: a secret whose key was revoked (an earlier rotation away from it included), or
        that belongs to a non-admin or expired key, is refused with InvalidArgument and
        nothing changes; the operator sets a fresh secret."""
        digest = hash_secret(secret)
        now = datetime.now(UTC)
        async with self._sessions() as session, session.begin():
            await session.execute(select(func.pg_advisory_xact_lock(ADMIN_LOCK_ID)))
            found = await session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
            if found is not None:
                self._check_admin_secret(record_of(found), now)
                return record_of(found)  # the only unrevoked `admin` row: names are unique
            revoked = (await session.scalars(
                update(ApiKey).where(ApiKey.name == ADMIN_KEY_NAME, ApiKey.revoked_at.is_(None),
                                     ApiKey.key_hash != digest)
                .values(revoked_at=now).returning(ApiKey.key_id))).all()
            if revoked:
                add_to_outbox(session, new_event("key.revoked", self._source, key_name=ADMIN_KEY_NAME))
            row = self._row(check_new_key(NewKey(name=ADMIN_KEY_NAME, admin=True)), secret)
            values = {c.key: getattr(row, c.key) for c in ApiKey.__table__.columns}
            await session.execute(insert(ApiKey).values(values)
                                  .on_conflict_do_nothing(index_elements=[ApiKey.key_hash]))
            stored = await session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
            if stored is None:
                raise RuntimeError("the admin key was neither stored nor found")
            record = record_of(stored)
        if revoked:
            log.info("earlier admin key revoked: the admin key's secret changed")
        log.info("admin key %s ensured", record.masked)
        return record

    @staticmethod
    def _check_admin_secret(record: KeyRecord, now: datetime) -> None:
        """InvalidArgument unless the key `ensure_admin` found by its secret is a usable admin key."""
        if record.revoked_at is not None:
            raise InvalidArgument(
                f"admin key: this secret belongs to the key '{record.name}', revoked at "
                f"{record.revoked_at.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC; revoked keys stay "
                "revoked, so set ROUNDHOUSE_ADMIN_KEY to a new secret")
        if not record.admin or not is_usable(record, now):
            raise InvalidArgument(f"admin key: this secret belongs to the key '{record.name}', "
                                  "which is not an admin key or has expired; choose another")

    @staticmethod
    def _row(checked: CheckedKey, secret: str) -> ApiKey:
        limits = checked.limits
        expires_at = (datetime.now(UTC) + timedelta(seconds=checked.expires_in_s)
                      if checked.expires_in_s else None)
        return ApiKey(
            key_id=uuid.uuid4().hex, name=checked.name, key_hash=hash_secret(secret),
            prefix=shown_key_part(secret), admin=checked.admin, models=list(checked.models),
            rpm=limits.rpm, tpm=limits.tpm, max_parallel=limits.max_parallel,
            budget_tokens=limits.budget_tokens, budget_usd=limits.budget_usd,
            budget_period_s=limits.budget_period_s, expires_at=expires_at,
            created_at=datetime.now(UTC),
        )
