"""Draining before a stop: refuse new work at once, let the work in flight finish in time.

On SIGTERM a service begins its drain: its probes report not ready and new requests are
refused with `ShuttingDown` (HTTP 503 `shutting_down` with Retry-After, gRPC UNAVAILABLE), so
clients retry on another replica. The listener stays open `delay_s` after the signal (a load
balancer notices the failing probe before connections are refused), then closes; what is in
flight has until `timeout_s` after the signal to finish, then it is cut and the process exits.
"""

from __future__ import annotations

import asyncio
import time

from services.common.errors import ShuttingDown
from services.common.settings import CommonSettings


class Drain:
    """The drain of one process: whether it has begun, and how long is left of it."""

    def __init__(self, *, delay_s: float = 0.0, timeout_s: float = 60.0, retry_after_s: float = 1.0) -> None:
        self.delay_s = delay_s
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self._began_at: float | None = None
        self._begun = asyncio.Event()

    @classmethod
    def from_settings(cls, settings: CommonSettings) -> Drain:
        """The drain `drain_delay_s` and `drain_timeout_s` describe."""
        return cls(delay_s=settings.drain_delay_s, timeout_s=settings.drain_timeout_s)

    @property
    def draining(self) -> bool:
        """Whether the drain has begun: new work is refused from then on."""
        return self._began_at is not None

    def begin(self) -> None:
        """Begin the drain now (later calls change nothing)."""
        if self._began_at is None:
            self._began_at = time.monotonic()
            self._begun.set()

    async def wait_begun(self) -> None:
        """Return once the drain has begun (streams that never end by themselves, like event
        feeds, wait on this to close)."""
        await self._begun.wait()

    def remaining_s(self) -> float:
        """Seconds left for the work in flight: all of `timeout_s` before the drain begins."""
        if self._began_at is None:
            return self.timeout_s
        return max(0.0, self._began_at + self.timeout_s - time.monotonic())

    def refuse_new_work(self) -> None:
        """Raise `ShuttingDown` once the drain has begun; nothing before."""
        if self._began_at is not None:
            raise ShuttingDown("the service is shutting down; retry the request (on another replica)",
                               retry_after_s=self.retry_after_s)

    async def hold_listener(self) -> None:
        """Return once `delay_s` has passed since the drain began (at once if it has not)."""
        if self._began_at is not None:
            left = self._began_at + self.delay_s - time.monotonic()
            if left > 0:
                await asyncio.sleep(left)
