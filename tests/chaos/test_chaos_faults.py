"""Each fault in turn against a whole stack under a steady load: the stack survives it.

Per fault (`chaos_faults.FAULTS`): the stack serves, a steady load runs, the fault strikes and
is lifted, the stack must serve again within a bound, and then every check of `chaos_checks`
must hold for what happened meanwhile. The table of `chaos_report` sums the faults up.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from chaos_checks import (
    StreamRead,
    duplicate_loads,
    leaked_slots,
    lost_events,
    read_stream,
    request_violations,
    restart_violations,
    worker_copies,
    worker_down_violations,
)
from chaos_faults import FAULTS, Fault, Injection, inject
from chaos_load import SteadyLoad
from chaos_probe import RECOVERY_S, Probe, Recovery, missing_parts, wait_recovered
from chaos_report import ROWS, Row
from chaos_stack import ChaosStack, start_chaos_stack, stop_chaos_stack
from polling import wait_until
from stack_harness import TINY_CHAT, TINY_EMBED

FIRST_READY_S = 90.0
"""How long the stack may take to serve the first time (start-up and the first wake)."""
READY_S = 30.0
"""How long it may take before any later fault (the previous one already waited `RECOVERY_S`)."""


@dataclass
class Chaos:
    """The stack under test and what the suite remembers across faults."""

    stack: ChaosStack
    probe: Probe
    stream: StreamRead = field(default_factory=StreamRead)
    """The event stream as read so far."""
    outbox_checked: int = 0
    """Outbox rows up to this id were checked by an earlier fault."""
    worker_deaths: list[datetime] = field(default_factory=list)
    """When a worker process died: a load after that is not a second load."""
    served: bool = False
    """Whether the stack ever served the load."""
    broken: str = ""
    """The fault after which the stack did not serve again, if one did that."""


@pytest.fixture(scope="module")
async def chaos(server_root: Path, sources: Path) -> AsyncIterator[Chaos]:
    """`roundhouse up` with the tiny models on Postgres and NATS of its own."""
    root = Path(tempfile.mkdtemp(prefix="chaos-", dir=server_root))
    stack = await start_chaos_stack(root, sources)
    probe = Probe(stack)
    try:
        yield Chaos(stack, probe)
    finally:
        await probe.close()
        await stop_chaos_stack(stack)


async def serving_before(fault: Fault, chaos: Chaos, load: SteadyLoad) -> None:
    """Fail unless the whole stack serves the load now (at once if it did not after a fault)."""
    if chaos.broken:
        ROWS.append(Row(fault.name, 0, 0, 0.0, None, 1))
        pytest.fail(f"the stack has not served since {chaos.broken}")
    since = time.monotonic()
    missing: list[str] = []

    async def serving() -> bool:
        missing[:] = await missing_parts(chaos.probe, chaos.stack, load, since)
        return not missing

    try:
        await wait_until(serving, timeout=READY_S if chaos.served else FIRST_READY_S, interval=0.25)
    except AssertionError:
        chaos.broken = f"before {fault.name}"
        ROWS.append(Row(fault.name, 0, 0, 0.0, None, 1))
        pytest.fail(f"the stack did not serve before {fault.name}: {missing}")
    chaos.served = True


async def violations_of(chaos: Chaos, injection: Injection, recovery: Recovery, load: SteadyLoad,
                        since: datetime, said_before: int, seq_before: int) -> list[str]:
    """Every check of `chaos_checks` on what happened since the fault's phase began."""
    stack = chaos.stack
    violations: list[str] = []
    if not recovery.at:
        chaos.broken = injection.fault.name
        violations.append(f"not serving {RECOVERY_S:g} s after the fault was lifted: {recovery.missing}")
    violations += request_violations(load.outcomes, injection, recovery.router_back)
    violations += restart_violations(injection, stack.supervisor_lines()[said_before:])
    violations += await leaked_slots(chaos.probe)
    violations += worker_copies(await chaos.probe.worker_info())
    violations += await duplicate_loads(stack.dsn, chaos.worker_deaths, since)
    lost, chaos.outbox_checked = await lost_events(stack.dsn, stack.nats_url, chaos.stream,
                                                   chaos.outbox_checked)
    violations += lost
    violations += worker_down_violations(injection, chaos.stream, seq_before)
    return violations


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.name.split(" (")[0].replace(" ", "-"))
async def test_the_stack_survives(fault: Fault, chaos: Chaos) -> None:
    stack = chaos.stack
    load = SteadyLoad(stack.http_url, stack.admin_key, chat_model=TINY_CHAT, embedding_model=TINY_EMBED)
    try:
        await serving_before(fault, chaos, load)
        since, worker_before = datetime.now(UTC), stack.service_pids()["worker"]
        said_before, logged_before = len(stack.supervisor_lines()), stack.log_size()
        await read_stream(stack.nats_url, chaos.stream)
        seq_before = chaos.stream.last_seq
        if fault.strikes_a_wake:
            await chaos.probe.put_to_sleep(TINY_CHAT)
        injection = await inject(fault, stack)
        recovery = await wait_recovered(chaos.probe, stack, load, injection)
        if recovery.at:
            with contextlib.suppress(TimeoutError):  # more answers after it, if they come
                await load.wait_for_successes(2, recovery.at, timeout=20)
    finally:
        await load.stop()
    if stack.service_pids().get("worker") != worker_before:
        chaos.worker_deaths.append(injection.at)
    violations = await violations_of(chaos, injection, recovery, load, since, said_before, seq_before)

    failed = [o for o in load.outcomes if o.verdict != "ok"]
    ROWS.append(Row(fault.name, len(load.outcomes) - len(failed), len(failed),
                    max((o.latency_s for o in load.outcomes), default=0.0),
                    recovery.at - injection.started if recovery.at else None, len(violations),
                    dict(Counter(f"{o.kind} {o.label}" for o in failed))))
    assert not violations, "\n".join([f"{fault.name}:", *violations, "what the services logged meanwhile:",
                                      *stack.trouble_logged(logged_before)])
