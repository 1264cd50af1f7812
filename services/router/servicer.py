"""The router's `Inference` gRPC front for internal services."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from roundhouse.v1 import inference_pb2, inference_pb2_grpc
from services.router.gateway import Gateway


class InferenceFrontServicer(inference_pb2_grpc.InferenceServicer):
    """`roundhouse.v1.Inference` by model name or alias; the caller's deadline goes downstream."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    async def Chat(
        self, request: inference_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.ChatChunk]:
        stream = self._gateway.chat(request, timeout=context.time_remaining())
        try:
            async for chunk in stream:
                yield chunk
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    async def Embed(
        self, request: inference_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.EmbedResponse:
        return await self._gateway.embed(request, timeout=context.time_remaining())
