"""The admin API under `/admin/v1`: operations on models, and what the workers hold.

Install, load, unload and delete return the operation at once (202); poll
`GET /admin/v1/operations/{id}` for its progress. Errors have the same shape as the
OpenAI API's. Everything here goes through the jobs service; nothing blocks a request to
another model.
"""

from __future__ import annotations

from typing import Any, Literal

import grpc
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from google.protobuf import json_format
from pydantic import BaseModel, ConfigDict

from roundhouse.v1 import jobs_pb2, jobs_pb2_grpc
from services.common.grpc_client import domain_error
from services.common.operation_names import STATUSES, TYPES, status_name, type_name
from services.common.workerpool import WorkerPool
from services.router.http.routes import ERRORS

admin_router = APIRouter(prefix="/admin/v1", tags=["admin"], responses=ERRORS)

OperationType = Literal["install", "load", "unload"]



class OperationOptions(BaseModel):
    """Optional body of install, load and unload."""

    model_config = ConfigDict(extra="forbid")

    worker_id: str = ""
    """Load on (unload from) this worker only."""
    force: bool = False
    """Load: may evict `running` models. Unload: even with requests in flight."""
    idempotency_key: str = ""
    """A second request with the same key returns the first operation."""


def operation_json(operation: jobs_pb2.Operation) -> dict[str, Any]:
    """An operation as JSON: proto field names, enums as lower-case words."""
    body = json_format.MessageToDict(operation, preserving_proto_field_name=True)
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


@admin_router.post("/models/{asset_id}/{kind}", status_code=202)
async def submit_operation(
    asset_id: str, kind: OperationType, request: Request, options: OperationOptions | None = None
) -> JSONResponse:
    """Queue an install, load or unload of the model; returns the operation (202)."""
    return await _submit(request, kind, asset_id, options)


@admin_router.delete("/models/{asset_id}", status_code=202)
async def delete_model(asset_id: str, request: Request) -> JSONResponse:
    """Queue the model's deletion (unload, remove its files, drop it from the registry)."""
    return await _submit(request, "delete", asset_id, None)


@admin_router.get("/operations/{operation_id}")
async def get_operation(operation_id: str, request: Request) -> dict[str, Any]:
    """One operation, with its progress."""
    operation = await _call(_jobs(request).GetOperation(
        jobs_pb2.GetOperationRequest(operation_id=operation_id), timeout=10))
    return operation_json(operation)


@admin_router.post("/operations/{operation_id}/cancel")
async def cancel_operation(operation_id: str, request: Request) -> dict[str, Any]:
    """Cancel a queued operation, or ask a running one to stop."""
    operation = await _call(_jobs(request).CancelOperation(
        jobs_pb2.CancelOperationRequest(operation_id=operation_id), timeout=10))
    return operation_json(operation)


@admin_router.get("/operations")
async def list_operations(
    request: Request,
    asset_id: str = "",
    type: Literal["", "install", "load", "unload", "delete", "profile"] = "",  # noqa: A002 - the API's word
    status: Literal["", "queued", "running", "succeeded", "failed", "cancelled"] = "",
    page_size: int = Query(50, ge=1, le=500),
    page_token: str = "",
) -> dict[str, Any]:
    """Operations, newest first, filtered; `next_page_token` continues the list."""
    reply = await _call(_jobs(request).ListOperations(jobs_pb2.ListOperationsRequest(
        asset_id=asset_id, type=TYPES.get(type, 0),
        status=STATUSES.get(status, 0), page_size=page_size, page_token=page_token), timeout=10))
    return {"operations": [operation_json(o) for o in reply.operations],
            "next_page_token": reply.next_page_token}


@admin_router.get("/workers")
async def list_workers(request: Request) -> dict[str, Any]:
    """The workers this router knows, their memory and the models they hold."""
    pool: WorkerPool = request.app.state.gateway.workers
    workers = []
    for worker in pool.workers:
        info = worker.info or worker.last_info
        body = json_format.MessageToDict(info, preserving_proto_field_name=True) if info else {}
        workers.append({**body, "address": worker.address, "healthy": worker.healthy})
    return {"workers": workers}
