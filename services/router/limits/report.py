"""Where a request's rate-limit state goes once the limiter has checked it.

The HTTP front opens a `LimitReport` for each request (`open_report`); the limiter fills it
in (`publish`) wherever the check happens down the call chain, and the front turns it into
`x-ratelimit-*` headers when the response starts, whether the request was served or refused.
A context variable carries it, so no step between the two has to pass it along.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True)
class LimitStatus:
    """A key's per-minute limits after its latest check (None: that limit is not set)."""

    rpm: int | None
    remaining_requests: int
    tpm: int | None
    remaining_tokens: int
    reset_s: float
    """Seconds until the current minute window (requests and tokens alike) ends."""


@dataclass
class LimitReport:
    """The status of the request being served, once the limiter has set it."""

    status: LimitStatus | None = None


_current: ContextVar[LimitReport | None] = ContextVar("roundhouse_limit_report", default=None)


def open_report() -> LimitReport:
    """A fresh report for the request running in this context (and the tasks it starts)."""
    report = LimitReport()
    _current.set(report)
    return report


def is_reported() -> bool:
    """Whether the request running in this context has a report to fill in."""
    return _current.get() is not None


def publish(status: LimitStatus) -> None:
    """Record `status` in the current request's report, if its front opened one."""
    report = _current.get()
    if report is not None:
        report.status = status
