"""API key secrets: how they are made, hashed and shown.

A secret is `rh-` and 43 URL-safe characters: 256 bits from the OS's CSPRNG. Only its
SHA-256 is stored. A slow password hash (bcrypt, argon2) protects low-entropy secrets a
person chose against guessing; a 256-bit random secret cannot be guessed, so one fast
SHA-256 is as safe and lets every request be checked with one indexed lookup by hash.
"""

from __future__ import annotations

import hashlib
import secrets

SECRET_PREFIX = "rh-"
SECRET_BYTES = 32
SHOWN_CHARS = 8
"""How much of a secret may be shown (`rh-` and 5 characters): too little to matter."""
MAX_SECRET_CHARS = 256
"""A presented secret longer than this is refused without hashing it."""


def new_secret() -> str:
    """A fresh secret: `rh-` and 256 random bits, URL-safe base64."""
    return SECRET_PREFIX + secrets.token_urlsafe(SECRET_BYTES)


def hash_secret(secret: str) -> str:
    """The stored form of a secret: its SHA-256, hex."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def shown_prefix(secret: str) -> str:
    """The part of a secret that may be shown to identify it (`rh-abcde`)."""
    return secret[:SHOWN_CHARS]


def looks_like_secret(secret: str) -> bool:
    """Whether `secret` could be one of ours (prefix, length, printable ASCII) at all: anything
    else is refused before a lookup."""
    return (secret.startswith(SECRET_PREFIX) and len(secret) <= MAX_SECRET_CHARS
            and secret.isascii() and secret.isprintable() and " " not in secret)
