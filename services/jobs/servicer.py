"""Jobs gRPC servicer: convert, await the domain, convert back."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from roundhouse.v1 import jobs_pb2, jobs_pb2_grpc
from services.common.assetspec_fields import check_asset_id
from services.common.request_text import check_message_text
from services.jobs.converters import (
    new_operation,
    operation_filter,
    operation_id,
    operation_to_proto,
    storage_to_proto,
    wait_seconds,
)
from services.jobs.service import JobService
from services.jobs.storage import StorageReport


class JobsServicer(jobs_pb2_grpc.JobsServicer):
    """Implements `roundhouse.v1.Jobs` over a `JobService`.

    Every request is first swept for NUL characters, which Postgres cannot store or compare:
    an id, key or filter holding one is INVALID_ARGUMENT, never a failed query; then its
    fields are checked (see `converters`), each refusal naming its field.
    """

    def __init__(self, jobs: JobService, storage: StorageReport) -> None:
        self._jobs = jobs
        self._storage = storage

    async def SubmitOperation(
        self, request: jobs_pb2.SubmitOperationRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.Operation:
        check_message_text(request)
        return operation_to_proto(await self._jobs.submit(new_operation(request)))

    async def GetOperation(
        self, request: jobs_pb2.GetOperationRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.Operation:
        check_message_text(request)
        return operation_to_proto(await self._jobs.get(operation_id(request.operation_id)))

    async def ListOperations(
        self, request: jobs_pb2.ListOperationsRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.ListOperationsResponse:
        check_message_text(request)
        records, token = await self._jobs.list(
            operation_filter(request), page_size=request.page_size, page_token=request.page_token
        )
        return jobs_pb2.ListOperationsResponse(
            operations=[operation_to_proto(r) for r in records], next_page_token=token
        )

    async def CancelOperation(
        self, request: jobs_pb2.CancelOperationRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.Operation:
        check_message_text(request)
        return operation_to_proto(await self._jobs.cancel(operation_id(request.operation_id)))

    async def WatchOperation(
        self, request: jobs_pb2.GetOperationRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[jobs_pb2.Operation]:
        check_message_text(request)
        async for record in self._jobs.watch(operation_id(request.operation_id)):
            yield operation_to_proto(record)

    async def EnsureLoaded(
        self, request: jobs_pb2.EnsureLoadedRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.EnsureLoadedResponse:
        check_message_text(request)
        loaded = await self._jobs.ensure_loaded(check_asset_id(request.asset_id), wait_seconds(request.wait_s))
        reply = jobs_pb2.EnsureLoadedResponse(loaded=loaded.loaded, worker_ids=loaded.worker_ids)
        if loaded.operation is not None:
            reply.operation.CopyFrom(operation_to_proto(loaded.operation))
        return reply

    async def GetStorage(
        self, request: jobs_pb2.GetStorageRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.Storage:
        return storage_to_proto(await self._storage.usage())
