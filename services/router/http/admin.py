"""The admin API under `/admin/v1`: operations on models, and what the workers hold.

Install, load, unload and delete return the operation at once (202); poll
`GET /admin/v1/operations/{id}` for its progress. Errors have the same shape as the
OpenAI API's. Everything here goes through the jobs service; nothing blocks a request to
another model.

Every input is declared as exactly as the server checks it (asset ids, page tokens, the
option fields), and every route documents each status it answers with: a request its
schema allows is never refused as invalid, and one it does not allow is a 400 naming the
field (Postgres, behind the jobs service, would refuse a NUL byte with a server error).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import grpc
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse
from google.protobuf import json_format
from pydantic import BaseModel, ConfigDict, Field

from roundhouse.v1 import jobs_pb2, jobs_pb2_grpc
from services.common.assetspec_fields import ASSET_ID_RE
from services.common.grpc_client import domain_error
from services.common.operation_names import STATUSES, TYPES, status_name, type_name
from services.common.workerpool import WorkerPool
from services.router.http.protocol import ErrorResponse

PAGE_TOKEN_PATTERN = r"^([0-9]{1,17}\.[0-9a-f]{32})?$"
"""A cursor as the jobs service writes it (see `services/jobs/repository.py`): the last
row's creation time in microseconds since the epoch, a dot, its operation id in hex. Any
token of this form is accepted: one this server never issued continues from that point."""
NO_NUL_PATTERN = r"^[^\x00]*$"
"""Free text stored in Postgres, which refuses NUL bytes."""
ASSET_FILTER_PATTERN = f"^({ASSET_ID_RE.pattern[1:-1]})?$"

OperationType = Literal["install", "load", "unload"]
OperationTypeFilter = Literal["", "install", "load", "unload", "delete", "profile"]
OperationStatusFilter = Literal["", "queued", "running", "succeeded", "failed", "cancelled"]
AssetId = Annotated[str, Path(
    pattern=ASSET_ID_RE.pattern, description="The model's asset id (no aliases here).")]
OperationId = Annotated[str, Path(description="The operation's id, as returned when it was queued.")]


Responses = dict[int | str, dict[str, Any]]


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


INVALID: Responses = {400: _error("The request is invalid; `error.param` names the field.")}
NO_MODEL: Responses = {404: _error("No model has that asset id.")}
NO_OPERATION: Responses = {404: _error("No operation has that id.")}
JOBS_DOWN: Responses = {503: _error("The jobs service is unavailable; see Retry-After.")}
TOO_LARGE: Responses = {413: _error("The body is too large.")}
LOCATION = {"Location": {"description": "Where to poll the operation.", "schema": {"type": "string"}}}


class OperationOptions(BaseModel):
    """Optional body of install, load and unload; each value only in its JSON type (no `0`
    for false), as the schema says."""

    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)

    worker_id: str = Field(default="", max_length=256, pattern=NO_NUL_PATTERN)
    """Load on (unload from) this worker only."""
    force: bool = False
    """Load: may evict `running` models. Unload: even with requests in flight."""
    idempotency_key: str = Field(default="", max_length=256, pattern=NO_NUL_PATTERN)
    """A second request with the same key returns the first operation."""


class OperationView(BaseModel):
    """An operation as the admin API shows it (`roundhouse.v1.Operation`, type and status as
    words, times in RFC 3339)."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    operation_id: str
    type: Literal["unspecified", "install", "load", "unload", "delete", "profile"]
    asset_id: str
    status: Literal["unspecified", "queued", "running", "succeeded", "failed", "cancelled"]
    progress: int = Field(ge=0, le=100)
    """Percent done."""
    message: str
    """What it is doing now, for operators."""
    error: str
    """Why it failed; empty otherwise."""
    attempts: int = Field(ge=0)
    idempotency_key: str
    worker_id: str
    force: bool
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    updated_at: str | None = None


class OperationPage(BaseModel):
    """One page of `GET /admin/v1/operations`."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    operations: list[OperationView]
    next_page_token: str
    """Pass as `page_token` for the next page; empty on the last one."""


class WorkerView(BaseModel):
    """A worker as this router knows it: its `roundhouse.v1.WorkerInfo` in proto3 JSON (when it
    has reported one), with the address the router calls and whether it answers."""

    model_config = ConfigDict(extra="allow")

    address: str
    healthy: bool


class WorkerList(BaseModel):
    """`GET /admin/v1/workers`."""

    workers: list[WorkerView]


admin_router = APIRouter(prefix="/admin/v1", tags=["admin"])


def operation_json(operation: jobs_pb2.Operation) -> dict[str, Any]:
    """An operation as JSON: proto field names, every field present, enums as lower-case words."""
    body = json_format.MessageToDict(operation, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)
    return {**body, "type": type_name(operation.type), "status": status_name(operation.status)}


def _jobs(request: Request) -> jobs_pb2_grpc.JobsStub:
    stub: jobs_pb2_grpc.JobsStub = request.app.state.jobs
    return stub


async def _call(call: Any) -> Any:
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        raise domain_error(exc, unavailable="the jobs service is unavailable; retry later") from None


async def _submit(request: Request, kind: str, asset_id: str, options: OperationOptions | None) -> JSONResponse:
    options = options or OperationOptions()
    operation = await _call(_jobs(request).SubmitOperation(jobs_pb2.SubmitOperationRequest(
        type=TYPES[kind], asset_id=asset_id, worker_id=options.worker_id, force=options.force,
        idempotency_key=options.idempotency_key), timeout=30))
    return JSONResponse(operation_json(operation), status_code=202,
                        headers={"Location": f"/admin/v1/operations/{operation.operation_id}"})


QUEUED: Responses = {202: {"model": OperationView, "description": "The operation, queued.", "headers": LOCATION}}


@admin_router.post(
    "/models/{asset_id}/{kind}", status_code=202, response_class=JSONResponse,
    responses={**QUEUED, **INVALID, **NO_MODEL, **TOO_LARGE, **JOBS_DOWN,
               409: _error("The idempotency key was used for another request.")},
)
async def submit_operation(
    asset_id: AssetId, kind: OperationType, request: Request, options: OperationOptions | None = None
) -> JSONResponse:
    """Queue an install, load or unload of the model; returns the operation (202)."""
    return await _submit(request, kind, asset_id, options)


@admin_router.delete(
    "/models/{asset_id}", status_code=202, response_class=JSONResponse,
    responses={**QUEUED, **INVALID, **NO_MODEL, **JOBS_DOWN},
)
async def delete_model(asset_id: AssetId, request: Request) -> JSONResponse:
    """Queue the model's deletion (unload, remove its files, drop it from the registry)."""
    return await _submit(request, "delete", asset_id, None)


@admin_router.get("/operations/{operation_id}", response_model=OperationView,
                  responses={**NO_OPERATION, **JOBS_DOWN})
async def get_operation(operation_id: OperationId, request: Request) -> dict[str, Any]:
    """One operation, with its progress."""
    operation = await _call(_jobs(request).GetOperation(
        jobs_pb2.GetOperationRequest(operation_id=operation_id), timeout=10))
    return operation_json(operation)


@admin_router.post(
    "/operations/{operation_id}/cancel", response_model=OperationView,
    responses={**NO_OPERATION, **JOBS_DOWN, 409: _error("The operation has already finished.")},
)
async def cancel_operation(operation_id: OperationId, request: Request) -> dict[str, Any]:
    """Cancel a queued operation, or ask a running one to stop."""
    operation = await _call(_jobs(request).CancelOperation(
        jobs_pb2.CancelOperationRequest(operation_id=operation_id), timeout=10))
    return operation_json(operation)


@admin_router.get("/operations", response_model=OperationPage, responses={**INVALID, **JOBS_DOWN})
async def list_operations(
    request: Request,
    asset_id: Annotated[str, Query(
        pattern=ASSET_FILTER_PATTERN, description="Only this model's operations.")] = "",
    type: Annotated[OperationTypeFilter, Query(  # noqa: A002 - the API's word
        description="Only operations of this type.")] = "",
    status: Annotated[OperationStatusFilter, Query(description="Only operations in this status.")] = "",
    page_size: Annotated[int, Query(ge=1, le=500)] = 50,
    page_token: Annotated[str, Query(
        pattern=PAGE_TOKEN_PATTERN,
        description="`next_page_token` of the previous page; empty for the first.")] = "",
) -> dict[str, Any]:
    """Operations, newest first, filtered; `next_page_token` continues the list."""
    reply = await _call(_jobs(request).ListOperations(jobs_pb2.ListOperationsRequest(
        asset_id=asset_id, type=TYPES.get(type, 0),
        status=STATUSES.get(status, 0), page_size=page_size, page_token=page_token), timeout=10))
    return {"operations": [operation_json(o) for o in reply.operations],
            "next_page_token": reply.next_page_token}


@admin_router.get("/workers", response_model=WorkerList)
async def list_workers(request: Request) -> dict[str, Any]:
    """The workers this router knows, their memory and the models they hold."""
    pool: WorkerPool = request.app.state.gateway.workers
    workers = []
    for worker in pool.workers:
        info = worker.info or worker.last_info
        body = json_format.MessageToDict(info, preserving_proto_field_name=True) if info else {}
        workers.append({**body, "address": worker.address, "healthy": worker.healthy})
    return {"workers": workers}
