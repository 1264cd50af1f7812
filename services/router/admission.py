"""Admission per asset at this router: a bounded FIFO queue in front of the workers' slots.

The workers hold `max_concurrency`: each runs at most that many requests of a model at once,
however many routers send them, and queues the rest for as long as each request's queue budget
allows (`x-roundhouse-queue-timeout-s`). A router sends at most as many requests of an asset at
once as its holders have slots together (the gate's `capacity`); the others wait here, FIFO, at
most `max_queue` of them. A request waits for a slot `queue_timeout_s` in all: what it spent
here is taken from the budget it carries to the worker (`QueueBudget`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

from services.common.assetspec import Policy
from services.common.errors import Overloaded
from services.common.grpc_interceptors import QUEUE_TIMEOUT_KEY, SHADOW_COPY_KEY
from services.router.deadlines import Deadline
from services.router.metrics.spans import step

GateWait = Callable[["AssetGate", float], None]
"""Told of a request that left a gate without a slot, and how many seconds it waited there."""


@dataclass
class GateStats:
    """What a gate is doing now."""

    in_flight: int
    waiting: int


class QueueBudget:
    """How much longer one request may wait for a slot, here and at a worker together."""

    __slots__ = ("_until", "_copy", "waited_s")

    def __init__(self, seconds: float, *, shadow_copy: bool = False) -> None:
        """`shadow_copy`: the request is a route's shadow copy, which the worker does not count
        as use of the model."""
        self._until = asyncio.get_running_loop().time() + seconds
        self._copy = shadow_copy
        self.waited_s = 0.0
        """How long the request waited in this router's queue for its slot."""

    def left(self) -> float:
        """Seconds of waiting left; 0 once spent."""
        return max(0.0, self._until - asyncio.get_running_loop().time())

    def postpone(self, seconds: float) -> None:
        """Give back time the request spent on something else than waiting (a wake)."""
        self._until += seconds

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The gRPC metadata that hands what is left of the budget to the worker (and says a
        shadow copy is one)."""
        budget = (QUEUE_TIMEOUT_KEY, f"{self.left():.3f}")
        return (budget, (SHADOW_COPY_KEY, "1")) if self._copy else (budget,)


class AssetGate:
    """The requests of one asset this router sends now, and those waiting to be sent. FIFO: a
    freed slot goes straight to the longest waiter."""

    def __init__(self, asset_id: str, policy: Policy, *, interface: str = "",
                 model_type: str = "", on_wait: GateWait | None = None) -> None:
        """`interface` and `model_type`: how the gate's gauges name the asset's interfaces and
        runtime; `on_wait`: told of every request's wait here (see `Admission.on_wait`)."""
        self.asset_id = asset_id
        self.policy = policy
        self.interface = interface
        self.model_type = model_type
        self.capacity = policy.max_concurrency
        """Requests sent at once: the slots of the asset's holders together."""
        self._in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._on_wait = on_wait

    @property
    def stats(self) -> GateStats:
        """Requests in flight and waiting."""
        return GateStats(self._in_flight, len(self._waiters))

    def resize(self, capacity: int) -> None:
        """Send up to `capacity` requests at once from now on (at least one); waiters that now
        fit are let through at once."""
        self.capacity = max(1, capacity)
        self._admit()

    @asynccontextmanager
    async def slot(self, deadline: Deadline | None = None) -> AsyncIterator[QueueBudget]:
        """Hold one slot for the body, which gets what is left of the request's queue budget.
        Raises `Overloaded` when the queue is full or the budget runs out first, and
        `DeadlineExceeded` when the request's deadline does. The wait is an `admission` span."""
        budget = QueueBudget(self.policy.queue_timeout_s)
        began = asyncio.get_running_loop().time()
        with step("admission", {"roundhouse.asset_id": self.asset_id}):
            try:
                await self._acquire(budget, deadline)
            except BaseException:
                if self._on_wait is not None:
                    self._on_wait(self, asyncio.get_running_loop().time() - began)
                raise
        if self._on_wait is not None:
            self._on_wait(self, budget.waited_s)
        try:
            yield budget
        finally:
            self._release()

    @contextmanager
    def try_slot(self) -> Iterator[bool]:
        """Hold a slot for the body if one is free now, never queueing: yields whether it got
        one (for work that must never wait nor take a slot from a waiting request)."""
        if self._in_flight >= self.capacity or self._waiters:
            yield False
            return
        self._in_flight += 1
        try:
            yield True
        finally:
            self._release()

    async def _acquire(self, budget: QueueBudget, deadline: Deadline | None) -> None:
        if self._in_flight < self.capacity and not self._waiters:
            self._in_flight += 1
            return
        if len(self._waiters) >= self.policy.max_queue:
            raise Overloaded(
                f"model '{self.asset_id}' is at capacity ({self._in_flight} in flight, "
                f"{len(self._waiters)} queued); retry later",
                retry_after_s=1.0,
            )
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        wait_s = budget.left() if deadline is None else min(budget.left(), deadline.remaining())
        began = loop.time()
        try:
            await asyncio.wait_for(asyncio.shield(waiter), wait_s)
            budget.waited_s = loop.time() - began
        except (TimeoutError, asyncio.CancelledError) as exc:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed over as we gave up: pass it on.
                self._release()
            else:
                waiter.cancel()
                self._waiters.remove(waiter)
            if not isinstance(exc, TimeoutError):
                raise
            if deadline is not None and deadline.expired:
                raise deadline.exceeded("queued for a slot") from None
            raise Overloaded(
                f"model '{self.asset_id}' stayed at capacity for "
                f"{self.policy.queue_timeout_s:g}s; retry later",
                retry_after_s=max(1.0, self.policy.queue_timeout_s / 4),
            ) from None

    def _release(self) -> None:
        self._in_flight -= 1
        self._admit()

    def _admit(self) -> None:
        while self._waiters and self._in_flight < self.capacity:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._in_flight += 1


class Admission:
    """One gate per asset; limits follow the asset's policy as it changes."""

    def __init__(self) -> None:
        self._gates: dict[str, AssetGate] = {}
        self._waits: list[GateWait] = []

    def on_wait(self, observer: GateWait) -> None:
        """Tell `observer` of every request's wait at a gate, with the seconds it waited (0
        when it got a slot, or was refused, at once): whether it got its slot or left without
        one (its queue was full, its queue budget or deadline ran out, or it gave up)."""
        self._waits.append(observer)

    def gate(self, asset_id: str, policy: Policy, *, interface: str = "",
             model_type: str = "") -> AssetGate:
        """The gate of an asset, with `policy` applied to requests from now on (`interface`
        and `model_type`: see `AssetGate`)."""
        gate = self._gates.get(asset_id)
        if gate is None:
            gate = self._gates[asset_id] = AssetGate(asset_id, policy, interface=interface,
                                                     model_type=model_type, on_wait=self._waited)
        gate.policy = policy
        if interface:
            gate.interface, gate.model_type = interface, model_type
        return gate

    def _waited(self, gate: AssetGate, seconds: float) -> None:
        for observer in self._waits:
            observer(gate, seconds)

    def gates(self) -> Iterable[AssetGate]:
        """Every gate (a snapshot: gates added meanwhile are not in it)."""
        return list(self._gates.values())

    def stats(self, asset_id: str) -> GateStats:
        """In flight and waiting for one asset (zeros when it has no gate yet)."""
        gate = self._gates.get(asset_id)
        return gate.stats if gate else GateStats(0, 0)
