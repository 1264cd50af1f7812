"""Jobs requests and responses ⇄ domain values."""

from __future__ import annotations

import math

from roundhouse.v1 import events_pb2, jobs_pb2
from services.common.asset_proto import timestamp
from services.common.assetspec_fields import MAX_NAME_CHARS, check_asset_id
from services.common.errors import InvalidArgument
from services.common.operation_names import STATUS_NAMES, STATUSES, TYPE_NAMES, TYPES
from services.jobs.model import NewOperation, OperationFilter, OperationRecord
from services.jobs.storage import StoreUsage

MAX_OPERATION_ID_CHARS = 128
"""Longer is no operation id in any spelling a UUID has."""


def new_operation(request: jobs_pb2.SubmitOperationRequest) -> NewOperation:
    """A submission: a known operation type, a possible asset id, an idempotency key and a
    worker id of at most `MAX_NAME_CHARS` characters."""
    if request.type not in TYPE_NAMES:
        raise InvalidArgument(
            f"type: required, one of {', '.join(f'OPERATION_TYPE_{t.upper()}' for t in TYPES)}"
        )
    check_asset_id(request.asset_id)
    for name in ("idempotency_key", "worker_id"):
        if len(getattr(request, name)) > MAX_NAME_CHARS:
            raise InvalidArgument(f"{name}: at most {MAX_NAME_CHARS} characters")
    return NewOperation(
        type=TYPE_NAMES[request.type],
        asset_id=request.asset_id,
        idempotency_key=request.idempotency_key,
        worker_id=request.worker_id,
        force=request.force,
    )


def operation_filter(request: jobs_pb2.ListOperationsRequest) -> OperationFilter:
    """List filters; unknown enum numbers match nothing rather than everything."""
    return OperationFilter(
        asset_id=check_asset_id(request.asset_id) if request.asset_id else "",
        type=TYPE_NAMES.get(request.type, "?") if request.type else "",
        status=STATUS_NAMES.get(request.status, "?") if request.status else "",
    )


def operation_id(value: str) -> str:
    """`value` when it could be an operation id (unknown ones are not found, not invalid)."""
    if not value:
        raise InvalidArgument("operation_id: required")
    if len(value) > MAX_OPERATION_ID_CHARS:
        raise InvalidArgument(f"operation_id: at most {MAX_OPERATION_ID_CHARS} characters")
    return value


def wait_seconds(value: float) -> float:
    """How long `EnsureLoaded` may wait: a finite, non-negative number of seconds."""
    if not (math.isfinite(value) and value >= 0):
        raise InvalidArgument("wait_s: must be a finite number of seconds, not negative")
    return value


def operation_to_proto(record: OperationRecord) -> jobs_pb2.Operation:
    """Stored operation → `Operation` message."""
    return jobs_pb2.Operation(
        operation_id=record.operation_id,
        type=TYPES.get(record.type, jobs_pb2.OPERATION_TYPE_UNSPECIFIED),
        asset_id=record.asset_id,
        status=STATUSES.get(record.status, jobs_pb2.OPERATION_STATUS_UNSPECIFIED),
        progress=record.progress,
        message=record.message,
        error=record.error,
        attempts=record.attempts,
        idempotency_key=record.idempotency_key,
        worker_id=record.worker_id,
        force=record.force,
        created_at=timestamp(record.created_at),
        started_at=timestamp(record.started_at),
        finished_at=timestamp(record.finished_at),
        updated_at=timestamp(record.updated_at),
    )


def job_event_detail(
    record: OperationRecord, *, bytes_done: int = 0, bytes_total: int = 0
) -> events_pb2.JobEventDetail:
    """The figures a `job.*` event carries for `record`."""
    return events_pb2.JobEventDetail(
        type=TYPES.get(record.type, jobs_pb2.OPERATION_TYPE_UNSPECIFIED),
        progress=record.progress,
        message=record.message,
        error=record.error,
        attempts=record.attempts,
        bytes_done=bytes_done,
        bytes_total=bytes_total,
    )


def storage_to_proto(usage: StoreUsage) -> jobs_pb2.Storage:
    """The store's disk use as `roundhouse.v1.Storage` (quota 0: none)."""
    return jobs_pb2.Storage(
        path=usage.path, used_bytes=usage.used_bytes, quota_bytes=usage.quota_bytes or 0,
        assets=[jobs_pb2.AssetStorage(asset_id=a.asset_id, bytes=a.bytes) for a in usage.assets],
    )
