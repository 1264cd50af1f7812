"""Admission at the worker: slots per held model, and the worker-wide count a drain waits on.

Every router sends its requests here, so holding `max_concurrency` at the worker holds it
for any number of routers together.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from services.common.assetspec import Policy
from services.common.errors import Overloaded, RoundhouseError, ShuttingDown

log = logging.getLogger(__name__)


class ModelSlots:
    """One model's slots: `policy.max_concurrency` requests run, up to `policy.max_queue` wait.

    FIFO: a freed slot goes straight to the longest waiter. The slots outlive a revision
    change (requests on the old revision still hold theirs); `apply` brings the new policy.
    """

    def __init__(self, asset_id: str, policy: Policy) -> None:
        self.asset_id = asset_id
        self.policy = policy
        self._running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def running(self) -> int:
        """Requests holding a slot."""
        return self._running

    @property
    def waiting(self) -> int:
        """Requests queued for a slot."""
        return len(self._waiters)

    def apply(self, policy: Policy) -> None:
        """Use `policy` from now on; more slots go to waiters at once, fewer as requests end."""
        self.policy = policy
        while self._running < policy.max_concurrency and self._waiters:
            self._hand_over()

    async def acquire(self, wait_s: float) -> None:
        """Take a slot, waiting for one at most `wait_s` seconds.

        Raises `Overloaded` at once when the queue is full, or when no slot is free and the
        request may not wait; after `wait_s` when none came free. A waiter that is cancelled
        leaves the queue.
        """
        limit = self.policy.max_concurrency
        if self._running < limit and not self._waiters:
            self._running += 1
            return
        if wait_s <= 0:
            raise Overloaded(
                f"model '{self.asset_id}' has no free slot ({self._running} of {limit} running) "
                "and the request may not wait; retry later",
                retry_after_s=1.0,
            )
        if len(self._waiters) >= self.policy.max_queue:
            raise Overloaded(
                f"model '{self.asset_id}' is at capacity: {self._running} running and its queue "
                f"is full ({len(self._waiters)} waiting); retry later",
                retry_after_s=1.0,
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(wait_s):
                await asyncio.shield(waiter)
        except TimeoutError:
            if self._granted(waiter):
                return  # the slot came as the wait ran out: use it
            self._leave(waiter)
            refused = None if waiter.cancelled() else waiter.exception()
            if refused is not None:
                raise refused from None  # refused as the wait ran out
            raise Overloaded(
                f"model '{self.asset_id}' stayed at capacity for {wait_s:.3g}s, as long as the "
                "request could wait for a slot; retry later",
                retry_after_s=max(1.0, self.policy.queue_timeout_s / 4),
            ) from None
        except asyncio.CancelledError:
            if self._granted(waiter):
                self.release()  # handed over as the caller gave up: pass it on
            else:
                self._leave(waiter)
            raise

    def release(self) -> None:
        """Free a slot: it goes to the longest waiter, unless the policy now allows fewer."""
        if self._running <= self.policy.max_concurrency and self._waiters:
            self._hand_over(counted=True)
        else:
            self._running -= 1

    def refuse_waiters(self, error: Callable[[], RoundhouseError]) -> None:
        """Fail every queued request with a new `error()` (the worker drains, the model is
        gone)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error())

    def _hand_over(self, counted: bool = False) -> None:
        """Give a slot to the longest waiter; `counted`: the slot is already in `running`."""
        waiter = self._waiters.popleft()
        waiter.set_result(None)
        if not counted:
            self._running += 1

    @staticmethod
    def _granted(waiter: asyncio.Future[None]) -> bool:
        return waiter.done() and not waiter.cancelled() and waiter.exception() is None

    def _leave(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.cancel()
        if waiter in self._waiters:
            self._waiters.remove(waiter)


class Intake:
    """The worker's door: counts the requests inside (running or queued) and closes on drain."""

    def __init__(self) -> None:
        self.draining = False
        self._inside = 0
        self._empty = asyncio.Event()
        self._empty.set()

    def refuse_if_draining(self, worker_id: str) -> None:
        """Raise `ShuttingDown` once the worker drains."""
        if self.draining:
            raise shutting_down(worker_id)

    def enter(self, worker_id: str) -> None:
        """Count one request in; refused with `ShuttingDown` once the worker drains."""
        self.refuse_if_draining(worker_id)
        self._inside += 1
        self._empty.clear()

    def leave(self) -> None:
        """Count one request out."""
        self._inside -= 1
        if self._inside == 0:
            self._empty.set()

    @contextmanager
    def entered(self, worker_id: str) -> Iterator[None]:
        """Count one request in (`enter`) while the body runs."""
        self.enter(worker_id)
        try:
            yield
        finally:
            self.leave()

    def close(self) -> None:
        """Refuse every request from now on (the worker drains)."""
        self.draining = True

    async def emptied(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for the requests inside to end; returns whether they all did."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._empty.wait()
        except TimeoutError:
            log.warning("drain: %d request(s) still running after %gs", self._inside, timeout_s)
            return False
        return True


def wait_s(policy: Policy, queue_timeout_s: float | None, deadline_s: float | None) -> float:
    """How long a request may wait for a slot: its queue budget (None: the model's
    `policy.queue_timeout_s`), within its deadline (None: none)."""
    wait = policy.queue_timeout_s if queue_timeout_s is None else queue_timeout_s
    return wait if deadline_s is None else min(wait, deadline_s)


def shutting_down(worker_id: str) -> ShuttingDown:
    """The refusal of a request (or a load) that reaches a draining worker."""
    return ShuttingDown(f"worker {worker_id} is shutting down and takes no new work; retry elsewhere")
