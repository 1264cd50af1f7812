"""Jobs gRPC servicer: convert, await the domain, convert back."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from roundhouse.v1 import jobs_pb2, jobs_pb2_grpc
from services.common.errors import InvalidArgument
from services.common.request_text import check_message_text
from services.jobs.converters import new_operation, operation_filter, operation_to_proto
from services.jobs.service import JobService


class JobsServicer(jobs_pb2_grpc.JobsServicer):
    """Implements `roundhouse.v1.Jobs` over a `JobService`.

    Every request is first swept for NUL characters, which Postgres cannot store or compare:
    an id, key or filter holding one is INVALID_ARGUMENT, never a failed query.
    """

    def __init__(self, jobs: JobService) -> None:
        self._jobs = jobs

    async def SubmitOperation(
        self, request: jobs_pb2.SubmitOperationRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.Operation:
        check_message_text(request)
        return operation_to_proto(await self._jobs.submit(new_operation(request)))

    async def GetOperation(
        self, request: jobs_pb2.GetOperationRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.Operation:
        check_message_text(request)
        return operation_to_proto(await self._jobs.get(_operation_id(request.operation_id)))

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
        return operation_to_proto(await self._jobs.cancel(_operation_id(request.operation_id)))

    async def WatchOperation(
        self, request: jobs_pb2.GetOperationRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[jobs_pb2.Operation]:
        check_message_text(request)
        async for record in self._jobs.watch(_operation_id(request.operation_id)):
            yield operation_to_proto(record)

    async def EnsureLoaded(
        self, request: jobs_pb2.EnsureLoadedRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.EnsureLoadedResponse:
        check_message_text(request)
        if not request.asset_id:
            raise InvalidArgument("asset_id: required")
        if request.wait_s < 0:
            raise InvalidArgument("wait_s: must not be negative")
        loaded = await self._jobs.ensure_loaded(request.asset_id, request.wait_s)
        reply = jobs_pb2.EnsureLoadedResponse(loaded=loaded.loaded, worker_ids=loaded.worker_ids)
        if loaded.operation is not None:
            reply.operation.CopyFrom(operation_to_proto(loaded.operation))
        return reply


def _operation_id(value: str) -> str:
    if not value:
        raise InvalidArgument("operation_id: required")
    return value
