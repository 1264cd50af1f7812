"""The executor: claims operations from Postgres and runs them, at most `workers` at a time.

Durability comes from the lease. A claim (see `OperationRepository.claim`) is atomic and
gives this instance the operation until `lease_expires_at`; a heartbeat renews it while the
runner works, and every write is guarded by the owner, so two runners never act on one
operation. When an instance dies its leases run out and any instance takes the work over,
counting a new attempt. A cancel asked of another instance reaches the runner through the
`cancel_requested` flag the heartbeat reads.

Progress is bookkeeping, not work (see `run.OperationRun`): all of a runner's reports are in
before the operation's outcome is. An operation whose caller waits for it (a load a request is
waiting on) can be queued and claimed in one transaction and started at once
(`create_and_run`), without waiting for the claim loop.

Each run is an `operation <type>` span inside the trace of the request that submitted it, as
part of that request (its id in the log lines), so the calls it makes (a worker's LoadModel)
join that trace too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping

from opentelemetry.trace import Status, StatusCode, get_current_span

from services.common import tracing
from services.common.errors import Cancelled, RoundhouseError
from services.jobs.model import NewOperation, OperationRecord, ProgressReport, is_transient
from services.jobs.repository import OperationRepository
from services.jobs.run import OperationRun
from services.jobs.runners import Runner, not_supported

log = logging.getLogger(__name__)
_tracer = tracing.tracer(__name__)


SHUTDOWN_CANCEL_GRACE_S = 2.0
"""At shutdown, a runner that does not stop when asked is abandoned after this long (instead of
`cancel_grace_s`), so the process keeps to its drain timeout; its operation goes back to the
queue either way."""


class Executor:
    """Claims, runs, retries and finishes operations for one jobs instance."""

    def __init__(
        self,
        repository: OperationRepository,
        runners: Mapping[str, Runner],
        *,
        instance_id: str,
        workers: int = 2,
        lease_s: float = 30.0,
        poll_interval_s: float = 1.0,
        timeouts: Mapping[str, float] | None = None,
        backoff_s: float = 2.0,
        backoff_max_s: float = 60.0,
        cancel_grace_s: float = 30.0,
    ) -> None:
        self.instance_id = instance_id
        self._repo = repository
        self._runners = dict(runners)
        self._workers = workers
        self._lease_s = lease_s
        self._poll_s = poll_interval_s
        self._timeouts = dict(timeouts or {})
        self._backoff_s, self._backoff_max_s = backoff_s, backoff_max_s
        self._grace_s = cancel_grace_s
        self._runs: dict[str, OperationRun] = {}
        self._starting = 0
        """Slots held by `create_and_run` calls between their check and their launch."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        """Start claiming work in the background."""
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._claim_loop())

    def wake(self) -> None:
        """Look for work now (an operation was queued here)."""
        self._wake.set()

    def _has_room(self) -> bool:
        return len(self._runs) + self._starting < self._workers and not self._stopping

    async def create_and_run(self, new: NewOperation, *, max_attempts: int) -> OperationRecord:
        """Queue `new` and, when this instance has a free slot, claim it in the same transaction
        and start it now; otherwise it waits in the queue like any other. Returns the operation
        as created, or the one it joined (see `OperationRepository.create`)."""
        if not self._has_room():
            record = await self._repo.create(new, max_attempts=max_attempts)
            self.wake()
            return record
        self._starting += 1
        try:
            record = await self._repo.create(new, max_attempts=max_attempts,
                                             claim=(self.instance_id, self._lease_s))
        finally:
            self._starting -= 1
        if record.lease_owner != self.instance_id or record.operation_id in self._runs:
            if record.status == "queued":
                self.wake()  # joined one still waiting in the queue
            return record
        if self._stopping:
            requeued = await self._repo.requeue(
                record.operation_id, self.instance_id, delay_s=0, refund_attempt=True,
                message=f"{self.instance_id} is shutting down; queued again")
            return requeued or record
        self._launch(record)
        return record

    def cancel(self, operation_id: str) -> bool:
        """Stop the operation at once if this instance runs it; False otherwise."""
        run = self._runs.get(operation_id)
        if run is not None:
            run.stop("cancelled")
        return run is not None

    async def stop(self, grace_s: float = 0.0) -> None:
        """Stop claiming; let the running operations finish for up to `grace_s` seconds, then
        stop the rest and put them back in the queue, their lease released (any instance may
        claim them at once) and their attempt not counted."""
        self._stopping = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self._tasks and grace_s > 0:
            log.info("waiting up to %g s for %d running operation(s)", grace_s, len(self._runs))
            await asyncio.wait(set(self._tasks), timeout=grace_s)
        self._grace_s = min(self._grace_s, SHUTDOWN_CANCEL_GRACE_S)
        for run in list(self._runs.values()):
            log.info("operation %s still runs; handing it back to the queue", run.operation_id)
            run.stop("shutdown")
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _claim_loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                while self._has_room():
                    record = await self._repo.claim(self.instance_id, self._lease_s)
                    if record is None:
                        break
                    self._launch(record)
            except Exception:  # noqa: BLE001 - the database may be back on the next poll
                log.exception("claiming operations failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_s)

    def _launch(self, record: OperationRecord) -> None:
        run = OperationRun(record, self._report)
        self._runs[run.operation_id] = run
        task = asyncio.get_running_loop().create_task(self._supervise(run))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _supervise(self, run: OperationRun) -> None:
        op = run.ctx.operation
        attributes = {"roundhouse.operation.id": op.operation_id,
                      "roundhouse.operation.type": op.type, "roundhouse.asset_id": op.asset_id}
        with (tracing.joined(op.trace_context, op.request_id),
              _tracer.start_as_current_span(f"operation {op.type}", attributes=attributes)):
            await self._supervised(run)

    async def _supervised(self, run: OperationRun) -> None:
        op = run.ctx.operation
        log.info("running %s %s on %s (attempt %d)", op.type, op.operation_id, op.asset_id,
                 op.attempts)
        try:
            await self._execute(run)
        except Exception:  # noqa: BLE001 - the lease expires and another attempt follows
            log.exception("operation %s: recording its outcome failed", run.operation_id)
        finally:
            await run.reported()
            del self._runs[run.operation_id]
            self._wake.set()

    async def _execute(self, run: OperationRun) -> None:
        op = run.ctx.operation
        if op.attempts > op.max_attempts:
            await self._repo.finish(
                op.operation_id, self.instance_id, "failed", message="gave up",
                error=f"interrupted {op.attempts - 1} times (the jobs instance running it "
                      "stopped); not trying again")
            return
        if op.cancel_requested:
            await self._repo.finish(op.operation_id, self.instance_id, "cancelled",
                                    message="cancelled")
            return
        await run.ctx.report(ProgressReport(f"running (attempt {op.attempts} of {op.max_attempts})"))
        runner = self._runners.get(op.type) or not_supported(op.type)
        heartbeat = asyncio.create_task(self._heartbeat(run))
        task = asyncio.create_task(runner(run.ctx))
        stopped = asyncio.create_task(run.stopped.wait())
        try:
            done, _ = await asyncio.wait({task, stopped}, timeout=self._timeouts.get(op.type),
                                         return_when=asyncio.FIRST_COMPLETED)
            if task not in done:
                run.stop("timeout")
                await run.ctx.report(ProgressReport(f"stopping ({run.ctx.stop_reason})"))
                done, _ = await asyncio.wait({task}, timeout=self._grace_s)
            if task not in done:
                log.warning("operation %s did not stop within %g s; abandoning it",
                            op.operation_id, self._grace_s)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        finally:
            heartbeat.cancel()
            stopped.cancel()
        await run.reported()  # its progress is in before its outcome
        await asyncio.gather(self._conclude(run, task), self._bookkept(run))

    async def _conclude(self, run: OperationRun, task: asyncio.Task[str]) -> None:
        op, owner, reason = run.ctx.operation, self.instance_id, run.ctx.stop_reason
        exc = Cancelled("abandoned") if task.cancelled() else task.exception()
        if exc is None:
            await self._repo.finish(op.operation_id, owner, "succeeded", message=task.result())
        elif reason == "lease_lost":
            log.warning("operation %s: lease lost to another instance; its outcome is theirs",
                        op.operation_id)
        elif reason == "shutdown":
            await self._repo.requeue(op.operation_id, owner, delay_s=0, refund_attempt=True,
                                     message=f"interrupted by the shutdown of {owner}; queued again")
        elif reason == "cancelled":
            await self._repo.finish(op.operation_id, owner, "cancelled", message="cancelled")
        elif reason == "timeout":
            limit = self._timeouts.get(op.type, 0)
            await self._repo.finish(op.operation_id, owner, "failed", message="timed out",
                                    error=f"{op.type} timed out after {limit:g} s")
        elif is_transient(exc) and op.attempts < op.max_attempts:
            delay = min(self._backoff_s * 2 ** (op.attempts - 1), self._backoff_max_s)
            error = _describe(exc)
            await self._repo.requeue(
                op.operation_id, owner, delay_s=delay, error=error,
                message=f"attempt {op.attempts} failed: {error}; retrying in {delay:g} s")
        else:
            if not isinstance(exc, RoundhouseError | ConnectionError | TimeoutError):
                log.error("operation %s failed", op.operation_id, exc_info=exc)
            get_current_span().set_status(Status(StatusCode.ERROR, _describe(exc)))
            await self._repo.finish(op.operation_id, owner, "failed", message="failed",
                                    error=_describe(exc))

    async def _bookkept(self, run: OperationRun) -> None:
        """Wait for the records the runner left to be written alongside the outcome."""
        for result in await asyncio.gather(*run.ctx.bookkeeping, return_exceptions=True):
            if isinstance(result, BaseException):
                log.warning("operation %s: a record written alongside it failed: %s",
                            run.operation_id, _describe(result))

    async def _heartbeat(self, run: OperationRun) -> None:
        interval = min(self._lease_s / 3, 5.0)
        while True:
            await asyncio.sleep(interval)
            try:
                record = await self._repo.renew(run.operation_id, self.instance_id, self._lease_s)
            except Exception as exc:  # noqa: BLE001 - keep trying until the lease is gone
                log.warning("operation %s: renewing the lease failed: %s", run.operation_id, exc)
                continue
            if record is None:
                run.stop("lease_lost")
                return
            if record.cancel_requested:
                run.stop("cancelled")

    async def _report(self, run: OperationRun, report: ProgressReport) -> None:
        try:
            record = await self._repo.report(run.operation_id, self.instance_id, report)
        except Exception as exc:  # noqa: BLE001 - progress is best effort; the work goes on
            log.warning("operation %s: recording progress failed: %s", run.operation_id, exc)
            return
        if record is None:
            run.stop("lease_lost")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, RoundhouseError):
        return exc.message
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
