"""Keeping secrets out of what Roundhouse shows: logs, CLI output, events and errors.

`mask_url` and `mask_key` mask one value the code knows to be sensitive; `redact` scrubs free
text (a log message, a line of a child's output) of every secret it can recognise: URL
passwords and tokens, `password=` parameters, Roundhouse keys (`rh-...`), `Bearer` values,
and the values of the upstream key variables, of `ROUNDHOUSE_INTERNAL_TOKEN` and of the
credentials in `ROUNDHOUSE_DATABASE_URL` / `ROUNDHOUSE_NATS_URL` as currently set. `SecretFilter` applies
`redact` to every log record; `setup_telemetry` installs it in every service.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from urllib.parse import unquote, urlsplit

MASK = "***"
ELLIPSIS = "…"
KEY_PREFIX = "rh-"
"""How every Roundhouse API key starts."""
KEY_SHOWN = 4
"""How many characters of a Roundhouse key after `rh-` may be shown (`rh-abcd…`)."""

DEFAULT_UPSTREAM_KEY_ENVS = (
    "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "MISTRAL_API_KEY", "GROQ_API_KEY",
)
"""Environment variables an asset's `source.api_key_env` may name unless
`ROUNDHOUSE_UPSTREAM_KEY_ENVS` says otherwise."""

CREDENTIAL_URL_ENVS = ("ROUNDHOUSE_DATABASE_URL", "ROUNDHOUSE_NATS_URL")
"""Settings whose URLs may carry a password or token."""

SECRET_ENVS = ("ROUNDHOUSE_INTERNAL_TOKEN",)
"""Settings whose whole value is a secret."""

MIN_SECRET_LEN = 6
"""Shorter values are not scrubbed verbatim: masking every `x` in a log helps nobody."""

# A user name alone is no secret in a Postgres DSN; in any other URL it is a token (nats://T@h).
_USER_IS_NOT_SECRET = frozenset({"postgres", "postgresql", "postgresql+asyncpg"})
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*)://(?P<userinfo>[^\s/@'\"<>]+)@")
_PASSWORD_PARAM = re.compile(r"(?P<name>\b(?:password|passwd|pwd|token|api_key)=)(?P<value>[^&\s'\"]+)",
                             re.IGNORECASE)
_ROUNDHOUSE_KEY = re.compile(r"\brh-[A-Za-z0-9_-]{12,}")
_BEARER = re.compile(r"(?P<word>\bBearer\s+)(?P<value>[^\s'\",]+)", re.IGNORECASE)


def shown_key_part(key: str) -> str:
    """The part of a Roundhouse key that may be shown: `rh-` and 4 characters (`rh-abcd`)."""
    return key[: len(KEY_PREFIX) + KEY_SHOWN]


def mask_key(key: str) -> str:
    """A key as it may be shown: `rh-abcd…` for a Roundhouse key, `***` for anything else."""
    if key.startswith(KEY_PREFIX) and len(key) > len(KEY_PREFIX) + KEY_SHOWN:
        return shown_key_part(key) + ELLIPSIS
    return MASK


def mask_url(url: str) -> str:
    """A URL with its password (or token) masked: `postgresql://user:***@host/db`,
    `nats://user:***@host`, `nats://***@host`; `password=` query parameters too.

    A URL without credentials comes back unchanged.
    """
    return _PASSWORD_PARAM.sub(_mask_param, _URL_USERINFO.sub(_mask_userinfo, url))


def _mask_userinfo(match: re.Match[str]) -> str:
    scheme, userinfo = match["scheme"], match["userinfo"]
    if ":" in userinfo:
        user = userinfo.split(":", 1)[0]
        return f"{scheme}://{user}:{MASK}@"
    if scheme.lower() in _USER_IS_NOT_SECRET:
        return match[0]
    return f"{scheme}://{MASK}@"


def _mask_param(match: re.Match[str]) -> str:
    return f"{match['name']}{MASK}"


def _mask_bearer(match: re.Match[str]) -> str:
    return f"{match['word']}{mask_key(match['value'])}"


def url_secrets(url: str) -> list[str]:
    """The password or token a URL carries (raw and percent-decoded), for verbatim scrubbing."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return []
    userinfo = parts.netloc.rpartition("@")[0]
    if not userinfo:
        return []
    user, colon, password = userinfo.partition(":")
    secret = password if colon else ("" if parts.scheme.lower() in _USER_IS_NOT_SECRET else user)
    return [s for s in {secret, unquote(secret)} if s]


def known_secrets(
    key_envs: Iterable[str] = DEFAULT_UPSTREAM_KEY_ENVS, environ: Mapping[str, str] | None = None
) -> list[str]:
    """Secret values set in the environment now: upstream keys, the internal token,
    credentials in our URLs."""
    env = os.environ if environ is None else environ
    values = [env.get(name, "") for name in (*key_envs, *SECRET_ENVS)]
    for name in CREDENTIAL_URL_ENVS:
        values += url_secrets(env.get(name, ""))
    # Longest first, so a secret that contains another is masked whole.
    return sorted({v for v in values if len(v) >= MIN_SECRET_LEN}, key=len, reverse=True)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every recognisable secret masked, and each of `secrets` replaced verbatim."""
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    text = mask_url(text)
    text = _BEARER.sub(_mask_bearer, text)
    return _ROUNDHOUSE_KEY.sub(lambda m: mask_key(m[0]), text)


class SecretFilter(logging.Filter):
    """Redacts every record's final message (arguments merged in) and its traceback text.

    The upstream key variables are looked up on each record, so a key set after start-up is
    still scrubbed. Never drops a record.
    """

    def __init__(self, key_envs: Iterable[str] = DEFAULT_UPSTREAM_KEY_ENVS) -> None:
        super().__init__()
        self.key_envs = tuple(key_envs)

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite `record` in place; always True."""
        secrets = known_secrets(self.key_envs)
        try:
            message = record.getMessage()
        except Exception:  # a record whose arguments do not fit its format still gets logged
            message = f"{record.msg!r} % {record.args!r}"
        record.msg, record.args = redact(message, secrets), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, secrets)
        return True
