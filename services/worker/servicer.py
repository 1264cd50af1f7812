"""The worker's gRPC servicers: `Inference` (by asset id) and `WorkerControl`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager

import grpc

from roundhouse.v1 import inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.common.asset_proto import record_from_proto
from services.common.assetspec_fields import check_asset_id
from services.common.errors import InvalidArgument
from services.common.grpc_interceptors import QUEUE_TIMEOUT_KEY, SHADOW_COPY_KEY
from services.common.inference_requests import (
    check_chat,
    check_embed,
    check_embed_size,
    check_tools_supported,
    locate,
    subject,
)
from services.worker import converters
from services.worker.holdings import Lease
from services.worker.service import ModelHost

log = logging.getLogger(__name__)


class WorkerInferenceServicer(inference_pb2_grpc.InferenceServicer):
    """Serves the models this worker holds; `model` is the asset id."""

    def __init__(self, host: ModelHost) -> None:
        self._host = host

    def _lease(self, asset_id: str, context: grpc.aio.ServicerContext) -> AbstractAsyncContextManager[Lease]:
        """A lease on the model; the call waits for a slot as long as the router allows and its
        deadline leaves (`Overloaded` after that)."""
        metadata = context.invocation_metadata() or ()
        return self._host.use(asset_id, queue_timeout_s=_queue_timeout(context), deadline_s=context.time_remaining(),
                              counts_as_use=all(k != SHADOW_COPY_KEY for k, _ in metadata))

    async def Chat(
        self, request: inference_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.ChatChunk]:
        """Stream the completion as it is produced; the last chunk has finish reason and usage.

        The request is checked as the router checks it, before the model is touched; what
        the model refuses (a prompt beyond the context...) names `messages` or `prompt`.
        """
        check_chat(request)
        params = converters.chat_params(request)
        log.debug("request %s: chat with %s for user %r", request.request_id, request.model, request.user)
        async with self._lease(request.model, context) as lease:
            try:
                stream = lease.model.chat(params)
            except InvalidArgument as exc:
                raise locate(exc, subject(request)) from None
            try:
                caps = lease.model.capabilities
                check_tools_supported(request, request.model, caps.supports_tools or bool(caps.tool_calling))
                async for delta in stream:
                    lease.check()
                    chunk = converters.chat_chunk(delta, request.model)
                    if delta.usage is not None:  # the last chunk says which revision answered
                        chunk.revision = lease.held.record.revision
                    if delta.usage is not None or delta.finish_reason is not None:
                        lease.meter.chat_ended(delta)
                    yield chunk
            except InvalidArgument as exc:
                raise locate(exc, subject(request)) from None
            finally:
                # Also runs when grpc cancels the handler (client gone): stop generating.
                await stream.aclose()  # type: ignore[attr-defined]

    async def CountTokens(
        self, request: inference_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.TokenCount:
        """The prompt tokens the chat request would use on the held model, counted without
        generating; checked as `Chat` checks it. A model that cannot count (a remote OpenAI
        upstream) answers FAILED_PRECONDITION."""
        check_chat(request)
        params = converters.chat_params(request)
        try:
            count = await self._host.count_tokens(request.model, params)
        except InvalidArgument as exc:
            raise locate(exc, subject(request)) from None
        return converters.token_count(count, request.model)

    async def Embed(
        self, request: inference_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.EmbedResponse:
        """One vector per input, in input order; refused before any work when the request is
        invalid or its vectors would not fit in one response."""
        check_embed(request)
        inputs = converters.embed_inputs(request)
        async with self._lease(request.model, context) as lease:
            check_embed_size(len(inputs), lease.model.capabilities.embedding_dim)
            try:
                result = await lease.model.embed(inputs)
            except InvalidArgument as exc:
                raise locate(exc, "input") from None
            lease.check()
            lease.meter.embedded(len(inputs), result.prompt_tokens)
            revision = lease.held.record.revision
        response = converters.embed_response(result, request.model)
        response.revision = revision
        return response


def _queue_timeout(context: grpc.aio.ServicerContext) -> float | None:
    """The router's budget for the call's wait for a slot (None: the model's policy decides)."""
    sent = (v for k, v in context.invocation_metadata() or () if k == QUEUE_TIMEOUT_KEY)
    return converters.queue_timeout(next(sent, None))


class WorkerControlServicer(worker_pb2_grpc.WorkerControlServicer):
    """Load, unload and report."""

    def __init__(self, host: ModelHost) -> None:
        self._host = host

    async def LoadModel(
        self, request: worker_pb2.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.LoadModelResponse:
        """Load the asset from this worker's model store; returns once it can serve."""
        if not request.HasField("asset"):
            raise InvalidArgument("asset: required")
        loaded = await self._host.load(record_from_proto(request.asset))
        return worker_pb2.LoadModelResponse(model=converters.loaded_model(loaded))

    async def UnloadModel(
        self, request: worker_pb2.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.UnloadModelResponse:
        """Unload; refused while requests are in flight unless forced."""
        check_asset_id(request.asset_id)
        freed = await self._host.unload(request.asset_id, force=request.force, reason=request.reason,
                                        evicted_for=request.evicted_for)
        return worker_pb2.UnloadModelResponse(freed_bytes=freed)

    async def GetWorkerInfo(
        self, request: worker_pb2.GetWorkerInfoRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.WorkerInfo:
        """Identity, memory figures and held models."""
        return converters.worker_info(self._host.info())
