"""The faults the suite injects, one at a time, and how each is injected and lifted."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from chaos_stack import REQUEST_TIMEOUT_S, ChaosStack

WORKER_FREEZE_S = REQUEST_TIMEOUT_S + 6.0
"""A frozen worker stays frozen past every deadline (and the slack `chaos_checks` allows): the
router must end the requests it holds."""
FREEZE_S = 4.0
"""How long any other service stays frozen."""
OUTAGE_S = 3.0
"""How long nats-server or Postgres stays down when restarted."""


WAKE_PATH = frozenset({"jobs", "registry", "postgres"})
"""Parts a wake goes through: before they are struck the chat model is put to sleep, so that
the steady load has to wake it while they are down."""


@dataclass(frozen=True)
class Fault:
    """One fault: `sigkill`, or `sigstop` (SIGCONT after `hold_s`) of a service; `restart` of
    nats-server or Postgres (down for `hold_s`)."""

    target: str
    action: str
    hold_s: float = 0.0

    @property
    def strikes_a_wake(self) -> bool:
        """Whether the chat model sleeps when it strikes (see `WAKE_PATH`)."""
        return self.target in WAKE_PATH

    @property
    def name(self) -> str:
        """How the table names it."""
        if self.action == "sigkill":
            return f"SIGKILL {self.target}"
        if self.action == "sigstop":
            return f"SIGSTOP {self.target} {self.hold_s:g}s"
        return f"restart {self.target} ({self.hold_s:g}s down)"


FAULTS = [
    fault
    for service in ("router", "worker", "jobs", "registry")
    for fault in (Fault(service, "sigkill"),
                  Fault(service, "sigstop", WORKER_FREEZE_S if service == "worker" else FREEZE_S))
] + [Fault("nats-server", "restart", OUTAGE_S), Fault("postgres", "restart", OUTAGE_S)]


@dataclass
class Injection:
    """A fault as it happened."""

    fault: Fault
    started: float
    """`time.monotonic()` when it struck."""
    lifted: float
    """When it was lifted: the kill itself, SIGCONT, or the server started again."""
    at: datetime
    """Wall-clock time it struck (to compare with database timestamps)."""
    old_pid: int | None = None
    """The process it struck (services)."""


async def inject(fault: Fault, stack: ChaosStack) -> Injection:
    """Strike `fault` at the stack and lift it; return when it has been lifted."""
    at = datetime.now(UTC)
    if fault.target in ("nats-server", "postgres"):
        server = stack.servers.nats if fault.target == "nats-server" else stack.servers.postgres
        started = time.monotonic()
        await stack.servers.call(server.stop)
        try:
            await asyncio.sleep(fault.hold_s)  # the outage itself, not a wait for anything
        finally:
            await stack.servers.call(server.start)
        return Injection(fault, started, time.monotonic(), at)
    pid = stack.service_pids()[fault.target]
    if fault.action == "sigkill":
        os.kill(pid, signal.SIGKILL)
        now = time.monotonic()
        return Injection(fault, now, now, at, pid)
    started = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(fault.hold_s)  # the freeze itself, not a wait for anything
    finally:
        os.kill(pid, signal.SIGCONT)
    return Injection(fault, started, time.monotonic(), at, pid)
