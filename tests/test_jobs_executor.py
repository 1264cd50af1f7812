"""The executor and the operations queue against real Postgres: claims, leases, retries, timeouts.

The runners here are small operation types of the tests' own, plugged into the runner table
the way the service's install and delete runners are.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import aclosing, asynccontextmanager
from typing import Any

import asyncpg
import pytest
from jobs_harness import clear_operations

from services.common.db.engine import make_engine, make_sessionmaker
from services.common.errors import Cancelled, InvalidArgument, UpstreamError
from services.jobs.executor import Executor
from services.jobs.model import NewOperation, OperationRecord, ProgressReport
from services.jobs.repository import OperationRepository
from services.jobs.runners import RunContext, Runner
from services.jobs.watch import ChangeNotifier, watch_operation

NOTIFIER = ChangeNotifier()


@pytest.fixture(autouse=True)
async def no_leftover_operations(db_dsn: str) -> None:
    await clear_operations(db_dsn)


@asynccontextmanager
async def repository(db_dsn: str) -> AsyncIterator[OperationRepository]:
    """A repository on an engine of its own, like a separate jobs process would have."""
    engine = make_engine(db_dsn)
    try:
        yield OperationRepository(make_sessionmaker(engine), on_change=NOTIFIER.notify)
    finally:
        await engine.dispose()


@asynccontextmanager
async def executor(db_dsn: str, runners: Mapping[str, Runner], instance_id: str = "exec-a",
                   **options: Any) -> AsyncIterator[Executor]:
    """A started executor; stopped (running operations handed back) on exit."""
    async with repository(db_dsn) as repo:
        running = Executor(repo, runners, instance_id=instance_id,
                           **{"poll_interval_s": 0.2, "backoff_s": 0.05, **options})
        running.start()
        try:
            yield running
        finally:
            await running.stop()


async def queue(repo: OperationRepository, count: int = 1, max_attempts: int = 3) -> list[str]:
    ops = [await repo.create(NewOperation("install", f"asset-{n}"), max_attempts=max_attempts)
           for n in range(count)]
    return [op.operation_id for op in ops]


async def reached(repo: OperationRepository, operation_id: str,
                  condition: Callable[[OperationRecord], bool]) -> OperationRecord:
    """The operation once `condition` holds (fails the test after 30 s)."""
    async def first() -> OperationRecord:
        async with aclosing(watch_operation(repo, NOTIFIER, operation_id, poll_s=0.1)) as states:
            async for record in states:
                if condition(record):
                    return record
        raise AssertionError(f"operation {operation_id} finished as {record.status}")

    return await asyncio.wait_for(first(), 30)


async def finished(repo: OperationRepository, operation_id: str) -> OperationRecord:
    """The operation once it is terminal."""
    return await reached(repo, operation_id, lambda r: r.terminal)


async def test_concurrent_claims_never_hand_out_one_operation_twice(db_dsn: str) -> None:
    async with repository(db_dsn) as first, repository(db_dsn) as second:
        ids = await queue(first, 40)

        async def claim_all(repo: OperationRepository, owner: str) -> list[str]:
            claimed = []
            while (record := await repo.claim(owner, lease_s=60)) is not None:
                claimed.append(record.operation_id)
            return claimed

        results = await asyncio.gather(*(claim_all(repo, f"{name}-{n}") for n in range(4)
                                         for name, repo in (("a", first), ("b", second))))
        claimed = [op for result in results for op in result]
        assert sorted(claimed) == sorted(ids)
        records = [await first.get(op) for op in ids]
    assert {r.attempts for r in records} == {1}
    assert {r.status for r in records} == {"running"}


async def test_two_executors_run_every_operation_exactly_once(db_dsn: str) -> None:
    runs: Counter[str] = Counter()

    async def counted(ctx: RunContext) -> str:
        runs[ctx.operation.operation_id] += 1
        await ctx.report(ProgressReport("working", progress=50))
        return "done"

    async with repository(db_dsn) as repo:
        ids = await queue(repo, 24)
        async with executor(db_dsn, {"install": counted}, "exec-a", workers=3), \
                executor(db_dsn, {"install": counted}, "exec-b", workers=3):
            records = [await finished(repo, op) for op in ids]
    assert {r.status for r in records} == {"succeeded"}
    assert {r.attempts for r in records} == {1}
    assert runs == Counter(dict.fromkeys(ids, 1))


async def test_transient_failures_are_retried_with_growing_backoff(db_dsn: str) -> None:
    started: list[float] = []

    async def flaky(ctx: RunContext) -> str:
        started.append(time.monotonic())
        if ctx.operation.attempts < 3:
            raise UpstreamError(f"worker unreachable (attempt {ctx.operation.attempts})")
        return "done at last"

    async with repository(db_dsn) as repo, executor(db_dsn, {"install": flaky}):
        [op] = await queue(repo)
        record = await finished(repo, op)
    assert (record.status, record.attempts, record.message) == ("succeeded", 3, "done at last")
    gaps = [b - a for a, b in zip(started, started[1:], strict=False)]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1, gaps


async def test_transient_failures_end_after_max_attempts(db_dsn: str) -> None:
    async def down(ctx: RunContext) -> str:
        raise UpstreamError("upstream keeps refusing")

    async with repository(db_dsn) as repo, executor(db_dsn, {"install": down}):
        [op] = await queue(repo, max_attempts=2)
        record = await finished(repo, op)
    assert (record.status, record.attempts, record.error) == ("failed", 2, "upstream keeps refusing")


async def test_permanent_failures_are_not_retried(db_dsn: str) -> None:
    async def broken(ctx: RunContext) -> str:
        raise InvalidArgument("source.file: no such file in the package")

    async with repository(db_dsn) as repo, executor(db_dsn, {"install": broken}):
        [op] = await queue(repo)
        record = await finished(repo, op)
    assert (record.status, record.attempts) == ("failed", 1)
    assert record.error == "source.file: no such file in the package"


async def until_cancelled(ctx: RunContext) -> str:
    """Works until told to stop, like an install blocked on a slow download."""
    await asyncio.to_thread(ctx.cancel.wait)
    raise Cancelled(f"stopped: {ctx.stop_reason}")


async def test_an_operation_past_its_timeout_is_stopped_and_fails(db_dsn: str) -> None:
    async with repository(db_dsn) as repo, \
            executor(db_dsn, {"install": until_cancelled}, timeouts={"install": 0.3}):
        [op] = await queue(repo)
        record = await finished(repo, op)
    assert (record.status, record.attempts) == ("failed", 1)
    assert record.error == "install timed out after 0.3 s"


async def test_shutdown_hands_running_operations_back_to_the_queue(db_dsn: str) -> None:
    async def quick(ctx: RunContext) -> str:
        return f"run by attempt {ctx.operation.attempts}"

    async with repository(db_dsn) as repo:
        [op] = await queue(repo)
        async with executor(db_dsn, {"install": until_cancelled}, "exec-stopping"):
            await reached(repo, op, lambda r: r.status == "running")
        requeued = await repo.get(op)
        assert (requeued.status, requeued.attempts, requeued.lease_owner) == ("queued", 0, "")
        assert "shutdown of exec-stopping" in requeued.message
        async with executor(db_dsn, {"install": quick}, "exec-next"):
            record = await finished(repo, op)
    assert (record.status, record.message) == ("succeeded", "run by attempt 1")


async def test_a_runner_that_lost_its_lease_stops_and_writes_nothing(db_dsn: str) -> None:
    reasons: asyncio.Queue[str | None] = asyncio.Queue()

    async def watched(ctx: RunContext) -> str:
        await ctx.report(ProgressReport("started"))
        await asyncio.to_thread(ctx.cancel.wait)
        reasons.put_nowait(ctx.stop_reason)
        raise Cancelled("stopped")

    async with repository(db_dsn) as repo:
        [op] = await queue(repo)
        async with executor(db_dsn, {"install": watched}, lease_s=0.6):
            await reached(repo, op, lambda r: r.message == "started")
            conn = await asyncpg.connect(db_dsn)
            try:  # another instance takes it over (here, as if this one had been too slow)
                await conn.execute("UPDATE operations SET lease_owner = 'thief', lease_expires_at "
                                   "= now() + interval '1 hour' WHERE operation_id = $1", uuid.UUID(op))
            finally:
                await conn.close()
            assert await asyncio.wait_for(reasons.get(), 10) == "lease_lost"
        after = await repo.get(op)
    assert (after.status, after.lease_owner, after.message) == ("running", "thief", "started")


async def test_progress_is_written_in_order_and_all_of_it_before_the_outcome(db_dsn: str) -> None:
    committed: list[tuple[str, str]] = []

    def seen(operation_id: str, record: OperationRecord) -> None:
        NOTIFIER.notify(operation_id, record)
        committed.append((record.status, record.message))

    async def chatty(ctx: RunContext) -> str:
        for step in range(20):  # the runner does not wait for these to be written
            await ctx.report(ProgressReport(f"step {step}", progress=step * 5))
        return "done"

    engine = make_engine(db_dsn)
    try:
        repo = OperationRepository(make_sessionmaker(engine), on_change=seen)
        running = Executor(repo, {"install": chatty}, instance_id="exec-chatty", poll_interval_s=0.2)
        running.start()
        try:
            [op] = await queue(repo)
            record = await finished(repo, op)
        finally:
            await running.stop()
    finally:
        await engine.dispose()
    assert (record.status, record.message, record.progress) == ("succeeded", "done", 100)
    steps = [message for status, message in committed if message.startswith("step ")]
    assert steps == [f"step {n}" for n in range(20)]
    assert committed[-1] == ("succeeded", "done")


async def test_a_record_written_alongside_that_fails_leaves_the_outcome_alone(db_dsn: str) -> None:
    written: list[str] = []

    async def registry_down() -> None:
        raise UpstreamError("the registry is unavailable")

    async def registry_up() -> None:
        written.append("loaded")

    async def loads(ctx: RunContext) -> str:
        ctx.alongside(registry_down())
        ctx.alongside(registry_up())
        return "loaded on w1"

    async with repository(db_dsn) as repo, executor(db_dsn, {"install": loads}):
        [op] = await queue(repo)
        record = await finished(repo, op)
    assert (record.status, record.message, record.attempts) == ("succeeded", "loaded on w1", 1)
    assert written == ["loaded"]


async def test_an_operation_started_at_once_is_claimed_by_its_creator(db_dsn: str) -> None:
    release = asyncio.Event()
    runs: Counter[str] = Counter()

    async def held(ctx: RunContext) -> str:
        runs[ctx.operation.operation_id] += 1
        await release.wait()
        return "loaded"

    # The claim loop polls rarely here: only `create_and_run` can start the load soon.
    async with repository(db_dsn) as repo, \
            executor(db_dsn, {"load": held}, "exec-now", poll_interval_s=3600) as running:
        first, second = await asyncio.gather(
            running.create_and_run(NewOperation("load", "asset-now"), max_attempts=3),
            running.create_and_run(NewOperation("load", "asset-now"), max_attempts=3))
        assert first.operation_id == second.operation_id  # one load per asset, however many ask
        started = await reached(repo, first.operation_id, lambda r: r.status == "running")
        assert (started.lease_owner, started.attempts) == ("exec-now", 1)
        release.set()
        record = await finished(repo, first.operation_id)
    assert record.status == "succeeded" and runs == Counter({first.operation_id: 1})


async def test_an_operation_started_when_every_slot_is_taken_waits_its_turn(db_dsn: str) -> None:
    release = asyncio.Event()

    async def held(ctx: RunContext) -> str:
        await release.wait()
        return f"ran {ctx.operation.asset_id}"

    async with repository(db_dsn) as repo, \
            executor(db_dsn, {"load": held}, "exec-full", workers=1) as running:
        busy = await running.create_and_run(NewOperation("load", "asset-busy"), max_attempts=3)
        waiting = await running.create_and_run(NewOperation("load", "asset-waiting"), max_attempts=3)
        assert (busy.status, waiting.status) == ("running", "queued")
        release.set()
        records = [await finished(repo, op.operation_id) for op in (busy, waiting)]
    assert [(r.status, r.message) for r in records] == [
        ("succeeded", "ran asset-busy"), ("succeeded", "ran asset-waiting")]


async def test_shutdown_abandons_a_runner_that_ignores_its_stop_request(db_dsn: str) -> None:
    """A runner deaf to `ctx.cancel` does not hold a draining jobs instance past its drain: it
    is abandoned after a short grace, not the 30 s `cancel_grace_s`, and its operation goes back
    to the queue."""
    release = asyncio.Event()

    async def deaf(ctx: RunContext) -> str:
        await release.wait()  # never set, and `ctx.cancel` unheeded: only abandoning ends it
        return "never"

    async with repository(db_dsn) as repo:
        [op] = await queue(repo)
        running = Executor(repo, {"install": deaf}, instance_id="exec-deaf", poll_interval_s=0.2,
                           cancel_grace_s=600)
        running.start()
        await reached(repo, op, lambda r: r.status == "running")
        await asyncio.wait_for(running.stop(grace_s=0), timeout=30)  # not 600
        requeued = await repo.get(op)
        assert (requeued.status, requeued.lease_owner) == ("queued", "")
