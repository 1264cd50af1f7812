"""Operations in Postgres: the durable queue, its leases, and the `job.*` events of every change.

Every change commits together with its event in the outbox. A queued row is claimable when
`lease_expires_at` is empty or past (for a queued row it is the earliest time a retry may
start); a running row is claimable once its lease has expired, which is how a dead instance's
work is taken over. Claims use `FOR UPDATE SKIP LOCKED`, so two claimers never get the same
row, and every later write of a runner is guarded by `lease_owner`, so a runner that lost its
lease can no longer change the operation.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any, overload

from sqlalchemy import and_, func, or_, select, tuple_, update
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.common import tracing
from services.common.db.models import Operation
from services.common.errors import Conflict, FailedPrecondition, OperationNotFound
from services.common.events import new_event
from services.common.outbox import add_to_outbox
from services.jobs.converters import job_event_detail
from services.jobs.model import NewOperation, OperationFilter, OperationRecord, ProgressReport
from services.jobs.paging import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, decode_token, encode_token


class OperationRepository:
    """Reads and writes operations; `on_change(operation_id, record)` runs after every commit
    that changed one, with the operation as that commit left it."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        on_change: Callable[[str, OperationRecord], None] = lambda *_: None,
    ) -> None:
        self._sessions = sessions
        self._on_change = on_change

    async def by_key(self, key: str) -> OperationRecord | None:
        """The operation submitted with idempotency key `key`, if any."""
        async with self._sessions() as session:
            row = await session.scalar(select(Operation).where(Operation.idempotency_key == key))
        return _record(row) if row else None

    async def create(
        self, new: NewOperation, *, max_attempts: int, claim: tuple[str, float] | None = None
    ) -> OperationRecord:
        """Queue `new` (event `job.queued`) and return it, keeping the caller's trace context
        and request id for the run.

        With a key already used, returns the first operation submitted with it. A load of an
        asset that already has a load queued or running joins that one instead (one load per
        asset at a time, across every jobs instance). With `claim` (owner, lease seconds), a
        new operation is also claimed for that owner in the same transaction, as `claim` would.
        """
        for _ in range(3):
            async with self._sessions() as session, session.begin():
                row = await session.scalar(
                    insert(Operation)
                    .values(operation_id=uuid.uuid4(), type=new.type, asset_id=new.asset_id,
                            idempotency_key=new.idempotency_key or None,
                            worker_id=new.worker_id or None, force=new.force,
                            max_attempts=max_attempts, message="queued",
                            params={"reason": new.reason} if new.reason else {},
                            trace_context=tracing.traceparent(),
                            request_id=tracing.current_request_id())
                    .on_conflict_do_nothing()
                    .returning(Operation)
                )
                if row is not None:
                    _emit(session, "queued", row)
                    if claim is not None:
                        owner, lease_s = claim
                        row = await _update(session, row.operation_id, status="running", lease_owner=owner,
                                            lease_expires_at=_lease(lease_s), attempts=Operation.attempts + 1,
                                            started_at=func.now(), message="starting")
            if row is not None:
                return self._changed(row)
            existing = await self.by_key(new.idempotency_key) if new.idempotency_key else None
            if existing is not None:
                if not new.same_request(existing):
                    raise Conflict(f"idempotency key '{new.idempotency_key}' was used for "
                                   f"another request (operation {existing.operation_id})")
                return existing
            if new.type == "load" and (active := await self.active(new.asset_id, "load")):
                return active
            # The conflicting operation finished (or its key was released) meanwhile: again.
        raise Conflict("the operation conflicted with others three times; submit again")

    async def active(self, asset_id: str, type_: str) -> OperationRecord | None:
        """The oldest operation of that type on `asset_id` that is queued or running, if any."""
        async with self._sessions() as session:
            row = await session.scalar(select(Operation).where(
                Operation.asset_id == asset_id, Operation.type == type_,
                Operation.status.in_(("queued", "running"))).order_by(Operation.created_at).limit(1))
        return _record(row) if row else None

    async def unfinished_by_type(self) -> dict[str, int]:
        """How many operations of each type are queued or running, across every instance."""
        async with self._sessions() as session:
            rows = await session.execute(select(Operation.type, func.count()).where(
                Operation.status.in_(("queued", "running"))).group_by(Operation.type))
        return {str(type_): int(count) for type_, count in rows}

    async def get(self, operation_id: str) -> OperationRecord:
        """The operation with that id; `OperationNotFound` otherwise."""
        async with self._sessions() as session:
            row = await session.get(Operation, _uuid(operation_id))
        if row is None:
            raise OperationNotFound(f"operation '{operation_id}' not found")
        return _record(row)

    async def list(
        self, filters: OperationFilter, *, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[OperationRecord], str]:
        """One page, newest first, and the token of the next page ('' at the end)."""
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        query = (select(Operation)
                 .order_by(Operation.created_at.desc(), Operation.operation_id.desc())
                 .limit(size + 1))
        if page_token:
            created_at, operation_id = decode_token(page_token)
            query = query.where(tuple_(Operation.created_at, Operation.operation_id)
                                < tuple_(created_at, operation_id))
        for column, value in ((Operation.asset_id, filters.asset_id),
                              (Operation.type, filters.type), (Operation.status, filters.status)):
            if value:
                query = query.where(column == value)
        async with self._sessions() as session:
            rows = list(await session.scalars(query))
        token = encode_token(rows[size - 1].created_at, rows[size - 1].operation_id) if len(rows) > size else ""
        return [_record(r) for r in rows[:size]], token

    async def request_cancel(self, operation_id: str) -> OperationRecord:
        """Cancel a queued operation now; flag a running one for its runner to stop."""
        op_id = _uuid(operation_id)
        async with self._sessions() as session, session.begin():
            status = await session.scalar(
                select(Operation.status).where(Operation.operation_id == op_id).with_for_update()
            )
            if status is None:
                raise OperationNotFound(f"operation '{operation_id}' not found")
            if status in ("succeeded", "failed"):
                raise FailedPrecondition(f"operation '{operation_id}' already {status}")
            if status == "cancelled":
                return await self.get(operation_id)
            if status == "queued":
                row = await _update(session, op_id, status="cancelled", finished_at=func.now(),
                                    lease_owner=None, lease_expires_at=None,
                                    message="cancelled before it started")
                assert row is not None  # locked above
                _emit(session, "cancelled", row)
            else:
                flag = func.jsonb_build_object("cancel_requested", True)
                row = await _update(session, op_id, message="cancelling",
                                    params=Operation.params.op("||", return_type=JSONB)(flag))
        assert row is not None  # locked above
        return self._changed(row)

    async def claim(self, owner: str, lease_s: float) -> OperationRecord | None:
        """Atomically take the oldest claimable operation for `owner`; None when there is none."""
        async with self._sessions() as session, session.begin():
            found = (await session.execute(
                select(Operation.operation_id, Operation.status, Operation.lease_owner)
                .where(Operation.status.in_(("queued", "running")),
                       or_(Operation.lease_expires_at.is_(None),
                           Operation.lease_expires_at < func.now()))
                .order_by(Operation.created_at)
                .limit(1)
                .with_for_update(skip_locked=True)
            )).first()
            if found is None:
                return None
            op_id, status, previous = found
            message = (f"taken over from {previous} after its lease expired"
                       if status == "running" else "starting")
            row = await _update(session, op_id, status="running", lease_owner=owner,
                                lease_expires_at=_lease(lease_s), attempts=Operation.attempts + 1,
                                started_at=func.coalesce(Operation.started_at, func.now()),
                                message=message)
        assert row is not None  # locked above
        return self._changed(row)

    async def renew(self, operation_id: str, owner: str, lease_s: float) -> OperationRecord | None:
        """Extend `owner`'s lease; None when it no longer holds the operation."""
        async with self._sessions() as session, session.begin():
            row = await _update(session, _uuid(operation_id), *_held(owner),
                                lease_expires_at=_lease(lease_s), touch=False)
        return _record(row) if row else None

    async def report(
        self, operation_id: str, owner: str, report: ProgressReport
    ) -> OperationRecord | None:
        """Record progress (event `job.progress`); None when `owner` lost the operation."""
        values: dict[str, Any] = {"message": report.message}
        if report.progress is not None:
            values["progress"] = max(0, min(100, report.progress))
        async with self._sessions() as session, session.begin():
            row = await _update(session, _uuid(operation_id), *_held(owner), **values)
            if row is not None:
                _emit(session, "progress", row, report.bytes_done, report.bytes_total)
        return self._changed(row)

    async def finish(
        self, operation_id: str, owner: str, status: str, *, message: str, error: str = ""
    ) -> OperationRecord | None:
        """End the operation as succeeded, failed or cancelled (event `job.<status>`)."""
        extra: dict[str, Any] = {"progress": 100} if status == "succeeded" else {}
        async with self._sessions() as session, session.begin():
            row = await _update(session, _uuid(operation_id), *_held(owner), status=status,
                                message=message, error=error or None, finished_at=func.now(),
                                lease_owner=None, lease_expires_at=None, **extra)
            if row is not None:
                _emit(session, status, row)
        return self._changed(row)

    async def requeue(
        self, operation_id: str, owner: str, *, delay_s: float, message: str, error: str = "",
        refund_attempt: bool = False,
    ) -> OperationRecord | None:
        """Put a running operation back in the queue, claimable after `delay_s` (`job.queued`)."""
        attempts = Operation.attempts - 1 if refund_attempt else Operation.attempts
        async with self._sessions() as session, session.begin():
            row = await _update(session, _uuid(operation_id), *_held(owner), status="queued",
                                lease_owner=None, lease_expires_at=_lease(delay_s),
                                attempts=attempts, message=message, error=error or None)
            if row is not None:
                _emit(session, "queued", row)
        return self._changed(row)

    @overload
    def _changed(self, row: Operation) -> OperationRecord: ...

    @overload
    def _changed(self, row: Operation | None) -> OperationRecord | None: ...

    def _changed(self, row: Operation | None) -> OperationRecord | None:
        if row is None:
            return None
        record = _record(row)
        self._on_change(record.operation_id, record)
        return record


def _held(owner: str) -> tuple[Any, ...]:
    return (Operation.status == "running", Operation.lease_owner == owner)


def _lease(seconds: float) -> Any:
    return func.now() + timedelta(seconds=seconds)


async def _update(
    session: AsyncSession, op_id: uuid.UUID, *conditions: Any, touch: bool = True, **values: Any
) -> Operation | None:
    if touch:
        values["updated_at"] = func.now()
    return await session.scalar(
        update(Operation)
        .where(and_(Operation.operation_id == op_id, *conditions))
        .values(**values)
        .returning(Operation)
        .execution_options(populate_existing=True)
    )


def _emit(
    session: AsyncSession, kind: str, row: Operation, bytes_done: int = 0, bytes_total: int = 0
) -> None:
    detail = job_event_detail(_record(row), bytes_done=bytes_done, bytes_total=bytes_total)
    add_to_outbox(session, new_event(
        f"job.{kind}", "jobs", job_id=str(row.operation_id), asset_id=row.asset_id,
        worker_id=row.worker_id or "", job=detail,
    ))


def _record(row: Operation) -> OperationRecord:
    return OperationRecord(
        operation_id=str(row.operation_id), type=row.type, asset_id=row.asset_id,
        status=row.status, progress=row.progress, message=row.message, error=row.error or "",
        attempts=row.attempts, max_attempts=row.max_attempts,
        idempotency_key=row.idempotency_key or "", worker_id=row.worker_id or "",
        force=row.force, created_at=row.created_at, updated_at=row.updated_at,
        started_at=row.started_at, finished_at=row.finished_at,
        lease_owner=row.lease_owner or "", params=dict(row.params or {}),
        trace_context=row.trace_context, request_id=row.request_id,
    )


def _uuid(operation_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(operation_id)
    except ValueError:
        raise OperationNotFound(f"operation '{operation_id}' not found") from None
