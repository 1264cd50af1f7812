"""The router's `Inference` gRPC front for internal services."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from roundhouse.v1 import inference_pb2, inference_pb2_grpc
from services.common.keys import KeyRecord
from services.common.tracing import accept_request_id, current_request_id, request_id_scope
from services.router.gateway import Gateway
from services.router.keys import KeyAuthenticator, credential_from_metadata


class InferenceFrontServicer(inference_pb2_grpc.InferenceServicer):
    """`roundhouse.v1.Inference` by model name or alias: chat (every sampling, format and tool
    field passed on as sent), embeddings and token counts. A caller's gRPC deadline, when
    shorter than the router's request timeout, is the request's deadline (see `Gateway.chat`).

    Callers present an API key in `authorization` metadata (`Bearer rh-...`, or `x-api-key`),
    checked like the HTTP API's: UNAUTHENTICATED without a valid one, PERMISSION_DENIED for a
    model outside its scope. No authenticator: auth is off.

    A call runs as part of the request its `request_id` names (else the `x-request-id` its
    metadata carries, see `ErrorMappingInterceptor`): log records name it, calls made for it carry it.
    """

    def __init__(self, gateway: Gateway, authenticator: KeyAuthenticator | None = None) -> None:
        self._gateway = gateway
        self._authenticator = authenticator

    async def _key(self, context: grpc.aio.ServicerContext) -> KeyRecord | None:
        if self._authenticator is None:
            return None
        secret = credential_from_metadata(context.invocation_metadata())
        return await self._authenticator.authenticate(secret)

    async def Chat(
        self, request: inference_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.ChatChunk]:
        with request_id_scope(accept_request_id(request.request_id or current_request_id())):
            key = await self._key(context)
            stream = self._gateway.chat(request, timeout=context.time_remaining(), key=key)
            try:
                async for chunk in stream:
                    yield chunk
            finally:
                await stream.aclose()  # type: ignore[attr-defined]

    async def CountTokens(
        self, request: inference_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.TokenCount:
        with request_id_scope(accept_request_id(request.request_id or current_request_id())):
            key = await self._key(context)
            return await self._gateway.count_tokens(request, timeout=context.time_remaining(), key=key)

    async def Embed(
        self, request: inference_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.EmbedResponse:
        with request_id_scope(accept_request_id(request.request_id or current_request_id())):
            key = await self._key(context)
            return await self._gateway.embed(request, timeout=context.time_remaining(), key=key)
