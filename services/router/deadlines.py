"""Deadlines of router requests: the whole request's, and how long a stream may stay silent.

Every request gets a `Deadline` when it reaches the gateway: `request_timeout_s`, or the
client's own when shorter (HTTP `x-request-timeout`, a gRPC deadline). Queue waits, wakes and
worker calls all end by it. Between two streamed chunks, a worker or upstream may stay silent
for at most the idle timeout (`next_chunk`). Running past either ends the request with
`DeadlineExceeded` (504 over HTTP, DEADLINE_EXCEEDED over gRPC).
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeVar

from services.common.errors import DeadlineExceeded, FieldProblem, InvalidArgument

T = TypeVar("T")

DEFAULT_REQUEST_TIMEOUT_S = 600.0
"""How long a request may take in all, unless set otherwise (`ROUNDHOUSE_REQUEST_TIMEOUT_S`)."""

DEFAULT_STREAM_IDLE_TIMEOUT_S = 60.0
"""How long a stream may stay silent, unless set otherwise (`ROUNDHOUSE_STREAM_IDLE_TIMEOUT_S`)."""

REQUEST_TIMEOUT_HEADER = "x-request-timeout"
"""The HTTP header in which a client asks for a shorter deadline (seconds, decimal)."""

_DECIMAL = re.compile(r"^(?:\d+(?:\.\d*)?|\.\d+)$")


class Deadline:
    """When one request must be over, on the event loop's clock."""

    __slots__ = ("timeout_s", "when")

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.when = asyncio.get_running_loop().time() + timeout_s

    @classmethod
    def within(cls, limit_s: float, requested_s: float | None) -> Deadline:
        """`limit_s` from now, or `requested_s` when the caller asked for less."""
        return cls(limit_s if requested_s is None else min(limit_s, max(requested_s, 0.0)))

    def remaining(self) -> float:
        """Seconds left; 0 once past."""
        return max(0.0, self.when - asyncio.get_running_loop().time())

    @property
    def expired(self) -> bool:
        """Whether the deadline has passed."""
        return asyncio.get_running_loop().time() >= self.when

    def exceeded(self, what: str) -> DeadlineExceeded:
        """The error of a request that ran past this deadline while `what` was going on."""
        return DeadlineExceeded(f"the request ran past its deadline of {self.timeout_s:g}s "
                                f"while {what}")

    @asynccontextmanager
    async def bounding(self, what: str) -> AsyncIterator[None]:
        """Run the body within the deadline: past it, the body is cancelled and
        `DeadlineExceeded` raised. Inside a generator, the body must not `yield`: the deadline
        would then run on while the consumer has the value."""
        scope = asyncio.timeout_at(self.when)
        try:
            async with scope:
                yield
        except TimeoutError:
            if scope.expired():
                raise self.exceeded(what) from None
            raise

    async def next_chunk(self, chunks: AsyncIterator[T], wait_s: float, source: str) -> T | None:
        """The next item of `chunks` (None at their end), waited for at most `wait_s` and never
        past the deadline. `source` names who stayed silent, for the error."""
        loop = asyncio.get_running_loop()
        idle_until = loop.time() + wait_s if math.isfinite(wait_s) else math.inf
        scope = asyncio.timeout_at(min(self.when, idle_until))
        try:
            async with scope:
                return await anext(chunks, None)
        except TimeoutError:
            if not scope.expired():
                raise
            if idle_until < self.when:
                raise DeadlineExceeded(f"{source} sent nothing for {wait_s:g}s; the request was "
                                       "ended") from None
            raise self.exceeded(f"waiting for {source}") from None


def header_seconds(name: str, value: str | None) -> float | None:
    """A positive number of seconds given in a header (`1.5`), None when absent; anything else
    is refused with `InvalidArgument` naming the header."""
    if value is None:
        return None
    seconds = float(value) if _DECIMAL.match(value.strip()) else 0.0
    if not 0 < seconds < math.inf:
        raise InvalidArgument.from_problems([FieldProblem(
            name, "must be a positive number of seconds, such as 30 or 2.5")])
    return seconds
