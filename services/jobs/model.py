"""Domain values of the jobs service: operations, their filters, and which failures are retried."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, get_args

from services.common.errors import DatabaseUnavailable, DeadlineExceeded, ModelNotReady, Overloaded, UpstreamError
from services.common.events import EventPublishError

OperationType = Literal["install", "load", "unload", "delete", "profile"]
Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]
OPERATION_TYPES: tuple[str, ...] = get_args(OperationType)
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    UpstreamError,
    DatabaseUnavailable,
    DeadlineExceeded,
    ModelNotReady,
    Overloaded,
    EventPublishError,
    ConnectionError,
    TimeoutError,
)
"""Failures worth another attempt: a peer (registry, worker, upstream, NATS) that was
unreachable, busy or not ready. Everything else, an `InstallError` or an `InvalidArgument`
for instance, would fail the same way again and fails the operation at once."""


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` is a failure that a later attempt may not meet."""
    return isinstance(exc, TRANSIENT_ERRORS)


@dataclass(frozen=True)
class OperationRecord:
    """A stored operation (the domain side of `roundhouse.v1.Operation`)."""

    operation_id: str
    type: str
    asset_id: str
    status: str
    progress: int
    message: str
    error: str
    attempts: int
    max_attempts: int
    idempotency_key: str
    worker_id: str
    force: bool
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    lease_owner: str = ""
    params: dict[str, Any] | None = None
    trace_context: str = ""
    """`traceparent` of the submitter: the operation runs inside that trace."""
    request_id: str = ""
    """The request that submitted it; empty outside one."""

    @property
    def terminal(self) -> bool:
        """Whether it has finished (succeeded, failed or cancelled) and will not change again."""
        return self.status in TERMINAL

    @property
    def reason(self) -> str:
        """Why it was submitted, when the submitter said (`sleep`, `disabled`, ...)."""
        return str((self.params or {}).get("reason", ""))

    @property
    def cancel_requested(self) -> bool:
        """Whether a caller asked to cancel it while it was running."""
        return bool((self.params or {}).get("cancel_requested"))

    def observable(self) -> tuple[Any, ...]:
        """What a watcher sees; two records with equal tuples need not be sent twice."""
        return (self.status, self.progress, self.message, self.error, self.attempts,
                self.worker_id, self.started_at, self.finished_at)


@dataclass(frozen=True)
class NewOperation:
    """What a caller asks for in `SubmitOperation`."""

    type: str
    asset_id: str
    idempotency_key: str = ""
    worker_id: str = ""
    force: bool = False
    reason: str = ""
    """Why (unloads: `sleep`, `disabled`, `operator`); kept in the operation's params."""

    def same_request(self, record: OperationRecord) -> bool:
        """Whether `record` was created by an identical request (idempotent resubmission)."""
        return (self.type, self.asset_id, self.worker_id, self.force) == (
            record.type, record.asset_id, record.worker_id, record.force
        )


@dataclass(frozen=True)
class OperationFilter:
    """Filters of `ListOperations`; empty values match everything."""

    asset_id: str = ""
    type: str = ""
    status: str = ""


@dataclass(frozen=True)
class ProgressReport:
    """One progress update of a running operation; None leaves the stored percentage alone."""

    message: str
    progress: int | None = None
    bytes_done: int = 0
    bytes_total: int = 0
