"""Operation types and statuses as operators write them (`load`, `succeeded`) ⇄ `roundhouse.v1` enums.

One table for every side that speaks both: the jobs service's converters, the router's
admin API and the CLI.
"""

from __future__ import annotations

from roundhouse.v1 import jobs_pb2

TYPES: dict[str, int] = {
    "install": jobs_pb2.OPERATION_TYPE_INSTALL,
    "load": jobs_pb2.OPERATION_TYPE_LOAD,
    "unload": jobs_pb2.OPERATION_TYPE_UNLOAD,
    "delete": jobs_pb2.OPERATION_TYPE_DELETE,
    "profile": jobs_pb2.OPERATION_TYPE_PROFILE,
}
STATUSES: dict[str, int] = {
    "queued": jobs_pb2.OPERATION_STATUS_QUEUED,
    "running": jobs_pb2.OPERATION_STATUS_RUNNING,
    "succeeded": jobs_pb2.OPERATION_STATUS_SUCCEEDED,
    "failed": jobs_pb2.OPERATION_STATUS_FAILED,
    "cancelled": jobs_pb2.OPERATION_STATUS_CANCELLED,
}
TYPE_NAMES = {v: k for k, v in TYPES.items()}
STATUS_NAMES = {v: k for k, v in STATUSES.items()}


def type_name(value: int) -> str:
    """`install`, `load`...: an operation type as operators write it."""
    return jobs_pb2.OperationType.Name(value).removeprefix("OPERATION_TYPE_").lower()


def status_name(value: int) -> str:
    """`queued`, `running`...: an operation status as operators write it."""
    return jobs_pb2.OperationStatus.Name(value).removeprefix("OPERATION_STATUS_").lower()
