"""Admission per asset: `max_concurrency` in flight, `max_queue` waiting `queue_timeout_s`."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from services.common.assetspec import Policy
from services.common.errors import Overloaded


@dataclass
class GateStats:
    """What a gate is doing now."""

    in_flight: int
    waiting: int


class AssetGate:
    """Slots for one asset. FIFO: a freed slot goes straight to the longest waiter."""

    def __init__(self, asset_id: str, policy: Policy) -> None:
        self.asset_id = asset_id
        self.policy = policy
        self._in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def stats(self) -> GateStats:
        """Requests in flight and waiting."""
        return GateStats(self._in_flight, len(self._waiters))

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one slot for the body; raises `Overloaded` when it cannot get one in time."""
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    async def _acquire(self) -> None:
        if self._in_flight < self.policy.max_concurrency and not self._waiters:
            self._in_flight += 1
            return
        if len(self._waiters) >= self.policy.max_queue:
            raise Overloaded(
                f"model '{self.asset_id}' is at capacity ({self.policy.max_concurrency} in flight, "
                f"{len(self._waiters)} queued); retry later",
                retry_after_s=1.0,
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.policy.queue_timeout_s)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed over as we gave up: pass it on.
                self._release()
            else:
                waiter.cancel()
                self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise Overloaded(
                    f"model '{self.asset_id}' stayed at capacity for "
                    f"{self.policy.queue_timeout_s:g}s; retry later",
                    retry_after_s=max(1.0, self.policy.queue_timeout_s / 4),
                ) from None
            raise

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves to the waiter; in_flight unchanged
                return
        self._in_flight -= 1


class Admission:
    """One gate per asset; limits follow the asset's policy as it changes."""

    def __init__(self) -> None:
        self._gates: dict[str, AssetGate] = {}

    def gate(self, asset_id: str, policy: Policy) -> AssetGate:
        """The gate of an asset, with `policy` applied to requests from now on."""
        gate = self._gates.get(asset_id)
        if gate is None:
            gate = self._gates[asset_id] = AssetGate(asset_id, policy)
        gate.policy = policy
        return gate

    def stats(self, asset_id: str) -> GateStats:
        """In flight and waiting for one asset (zeros when it has no gate yet)."""
        gate = self._gates.get(asset_id)
        return gate.stats if gate else GateStats(0, 0)
