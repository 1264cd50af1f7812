"""The admin key: made by `roundhouse up` on first start, found by every CLI command.

`roundhouse up` stores only the key's hash in Postgres and writes the key itself to
`$ROUNDHOUSE_HOME/admin.key` (mode 0600), printing the file's path, never the key. With
`ROUNDHOUSE_ADMIN_KEY` set (compose, Kubernetes) that key is ensured as the admin key
instead and no file is written. CLI commands read the key from `ROUNDHOUSE_ADMIN_KEY`, else
from the file.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from services.cli.private_files import write_private
from services.common.db import make_engine, make_sessionmaker
from services.common.keys import KeyStore, new_secret
from services.common.keys.tokens import operator_secret
from services.router.settings import RouterSettings

ADMIN_KEY_FILE = "admin.key"


def admin_key_path(home: Path) -> Path:
    """Where `roundhouse up` writes the admin key."""
    return home / ADMIN_KEY_FILE


def read_admin_key(settings: RouterSettings | None = None) -> str | None:
    """The admin key the CLI sends: `ROUNDHOUSE_ADMIN_KEY`, else `$ROUNDHOUSE_HOME/admin.key`;
    None when neither exists (or the file is empty). Both are read as the router reads the
    setting (`tokens.operator_secret`): stripped, and ValueError when not a Roundhouse key."""
    settings = settings or RouterSettings()
    if settings.admin_key is not None:
        return settings.admin_key.get_secret_value()  # checked by the setting's validator
    path = admin_key_path(settings.home)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return operator_secret(text, str(path)) if text.strip() else None


def bootstrap_admin_key(dsn: str, settings: RouterSettings | None = None) -> Path | None:
    """Ensure an admin key exists for `roundhouse up`; the file holding it, or None when it
    came from `ROUNDHOUSE_ADMIN_KEY` (nothing written then).

    The key in the file is reused across restarts; a new one is made (and written, mode 0600,
    before its hash is stored) when there is no file yet."""
    settings = settings or RouterSettings()
    path = admin_key_path(settings.home)
    if settings.admin_key is not None:
        asyncio.run(_ensure(dsn, settings.admin_key.get_secret_value()))
        return None
    secret = read_admin_key(settings.model_copy(update={"admin_key": None}))
    if secret is None:
        secret = new_secret()
        write_private(path, secret)
    asyncio.run(_ensure(dsn, secret))
    return path


def admin_key_line(path: Path | None) -> str:
    """What `roundhouse up` says about the admin key: where it is, never what it is."""
    if path is None:
        return "admin key: the one in ROUNDHOUSE_ADMIN_KEY"
    return f"admin key in {path} (send it as 'Authorization: Bearer <key>')"


async def _ensure(dsn: str, secret: str) -> None:
    engine = make_engine(dsn)
    try:
        await KeyStore(make_sessionmaker(engine), source="cli").ensure_admin(secret)
    finally:
        await engine.dispose()
