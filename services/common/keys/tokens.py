"""API key secrets: how they are made, hashed, recognised and shown.

A secret is `rh-` and 43 URL-safe characters: 256 bits from the OS's CSPRNG. Only its
SHA-256 is stored. A slow password hash (bcrypt, argon2) protects low-entropy secrets a
person chose against guessing; a 256-bit random secret cannot be guessed, so one fast
SHA-256 is as safe and lets every request be checked with one indexed lookup by hash.
What may be shown of one (`rh-abcd…`) is `services.common.secrets`' single rule.
"""

from __future__ import annotations

import hashlib
import secrets

from services.common.secrets import KEY_PREFIX

SECRET_BYTES = 32
MAX_SECRET_CHARS = 256
"""A presented secret longer than this is refused without hashing it."""
SECRET_FORMAT = (f"'{KEY_PREFIX}' followed by printable ASCII characters without spaces "
                 f"({MAX_SECRET_CHARS} characters at most)")


def new_secret() -> str:
    """A fresh secret: `rh-` and 256 random bits, URL-safe base64."""
    return KEY_PREFIX + secrets.token_urlsafe(SECRET_BYTES)


def hash_secret(secret: str) -> str:
    """The stored form of a secret: its SHA-256, hex."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def looks_like_secret(secret: str) -> bool:
    """Whether `secret` could be one of ours (prefix, length, printable ASCII) at all: anything
    else is refused before a lookup."""
    return (secret.startswith(KEY_PREFIX) and len(secret) <= MAX_SECRET_CHARS
            and secret.isascii() and secret.isprintable() and " " not in secret)


def operator_secret(raw: str, source: str) -> str:
    """An admin key an operator supplied (`ROUNDHOUSE_ADMIN_KEY`, the `admin.key` file), as the
    router stores it and the CLI sends it: surrounding whitespace (a secret mounted from a file
    ends in a newline) stripped. ValueError naming `source`, never the value, when it is not a
    Roundhouse key."""
    secret = raw.strip()
    if not looks_like_secret(secret):
        raise ValueError(f"{source} is not a Roundhouse key: it must be {SECRET_FORMAT}, such as "
                         "one `roundhouse up` writes to $ROUNDHOUSE_HOME/admin.key")
    return secret
