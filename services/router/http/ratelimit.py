"""The `x-ratelimit-*` headers OpenAI sends, from the limiter's report on the request's key."""

from __future__ import annotations

from services.router.limits import LimitStatus


def duration(seconds: float) -> str:
    """A reset time as OpenAI writes it: `59.2s`, `1m0s`, `350ms`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    rest_text = f"{round(rest, 3):g}s"
    return f"{int(minutes)}m{rest_text}" if minutes else rest_text


def ratelimit_headers(status: LimitStatus) -> list[tuple[bytes, bytes]]:
    """`x-ratelimit-{limit,remaining,reset}-requests` when the key has an rpm, and the same
    `-tokens` trio when it has a tpm."""
    headers: list[tuple[str, str]] = []
    reset = duration(status.reset_s)
    if status.rpm is not None:
        headers += [("x-ratelimit-limit-requests", str(status.rpm)),
                    ("x-ratelimit-remaining-requests", str(status.remaining_requests)),
                    ("x-ratelimit-reset-requests", reset)]
    if status.tpm is not None:
        headers += [("x-ratelimit-limit-tokens", str(status.tpm)),
                    ("x-ratelimit-remaining-tokens", str(status.remaining_tokens)),
                    ("x-ratelimit-reset-tokens", reset)]
    return [(k.encode(), v.encode()) for k, v in headers]
