"""The router's core: check → name → asset → admission → a worker that holds it → stream back.

Every request is checked here (`services.common.inference_requests`) before anything else,
so the HTTP shim and the gRPC front refuse the same requests in the same words.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from roundhouse.v1 import inference_pb2
from services.common.asset_proto import AssetRecord
from services.common.errors import AssetNotFound, NotFound
from services.common.grpc_client import domain_error
from services.common.inference_requests import check_chat, check_embed, check_embed_size
from services.common.workerpool import WorkerHandle, WorkerPool
from services.router.admission import Admission
from services.router.catalog import AssetCatalog
from services.router.waking import ModelWaker

log = logging.getLogger(__name__)

LLM = "llm-runtime"
EMBEDDING = "embedding-runtime"
T = TypeVar("T")


class Gateway:
    """Serves chat and embeddings for the HTTP API and the gRPC front alike."""

    def __init__(
        self,
        catalog: AssetCatalog,
        workers: WorkerPool,
        admission: Admission,
        waker: ModelWaker,
    ) -> None:
        self.catalog = catalog
        self.workers = workers
        self.admission = admission
        self.waker = waker

    async def list_models(self) -> list[AssetRecord]:
        """Every asset, as the registry has it. Never wakes a model."""
        return await self.catalog.list()

    async def get_model(self, name: str) -> AssetRecord:
        """One asset by id or alias, whatever its interface or state."""
        for record in await self.catalog.list():
            if name == record.spec.asset_id or name in record.spec.aliases:
                return record
        raise AssetNotFound(f"model '{name}' not found")

    async def chat(
        self, request: inference_pb2.ChatRequest, *, timeout: float | None = None
    ) -> AsyncIterator[inference_pb2.ChatChunk]:
        """Stream a completion from a worker. Closing the iterator cancels the worker's call.

        An invalid request fails on the first iteration, before any model is resolved or woken.
        """
        check_chat(request)
        record = await self.catalog.resolve(request.model, LLM)
        asset_id = record.spec.asset_id
        log.debug("request %s: chat with %s for user %r", request.request_id, asset_id, request.user)
        forwarded = inference_pb2.ChatRequest()
        forwarded.CopyFrom(request)
        forwarded.model = asset_id
        async with self.admission.gate(asset_id, record.spec.policy).slot():
            for attempt in (1, 2):
                worker = await self.waker.place(record)
                call = worker.inference.Chat(forwarded, timeout=timeout)
                worker.in_flight[asset_id] += 1
                started = False
                try:
                    with self.workers.tracking(worker, call):
                        async for chunk in call:
                            started = True
                            yield chunk
                    return
                except grpc.aio.AioRpcError as exc:
                    error = self._worker_error(exc, worker, asset_id)
                    if started or attempt == 2 or not isinstance(error, NotFound):
                        raise error from None
                    await self.workers.refresh(worker)
                finally:
                    call.cancel()
                    worker.in_flight[asset_id] -= 1

    async def embed(
        self, request: inference_pb2.EmbedRequest, *, timeout: float | None = None
    ) -> inference_pb2.EmbedResponse:
        """Embed on a worker holding the model.

        Refused before any model is resolved or woken when invalid, and before a worker is
        asked when the vectors could not come back in one message (the asset's dimension is
        known from its metadata or detected capabilities).
        """
        check_embed(request)
        record = await self.catalog.resolve(request.model, EMBEDDING)
        check_embed_size(len(request.inputs), embedding_dim(record))
        log.debug("request %s: embed %d inputs with %s for user %r", request.request_id,
                  len(request.inputs), record.spec.asset_id, request.user)
        forwarded = inference_pb2.EmbedRequest()
        forwarded.CopyFrom(request)
        forwarded.model = record.spec.asset_id
        async with self.admission.gate(record.spec.asset_id, record.spec.policy).slot():
            return await self._unary(
                record, lambda w: w.inference.Embed(forwarded, timeout=timeout)
            )

    async def ready(self) -> bool:
        """Registry reachable and at least one worker answering."""
        if not self.workers.known():
            return False
        try:
            await self.catalog.list()
        except Exception:  # noqa: BLE001 - readiness only reports
            return False
        return True

    async def _unary(
        self, record: AssetRecord, start: Callable[[WorkerHandle], grpc.aio.UnaryUnaryCall[Any, T]]
    ) -> T:
        asset_id = record.spec.asset_id
        for attempt in (1, 2):
            worker = await self.waker.place(record)
            worker.in_flight[asset_id] += 1
            try:
                call = start(worker)
                with self.workers.tracking(worker, call):
                    return await call
            except grpc.aio.AioRpcError as exc:
                error = self._worker_error(exc, worker, asset_id)
                if attempt == 2 or not isinstance(error, NotFound):
                    raise error from None
                await self.workers.refresh(worker)
            finally:
                worker.in_flight[asset_id] -= 1
        raise AssertionError("unreachable")

    @staticmethod
    def _worker_error(exc: grpc.aio.AioRpcError, worker: WorkerHandle, asset_id: str) -> Exception:
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            worker.info = None  # stop routing there until a refresh reaches it again
        return domain_error(
            exc, unavailable=f"the worker serving '{asset_id}' is unavailable; retry later"
        )


def embedding_dim(record: AssetRecord) -> int:
    """The asset's vector length: declared metadata wins over the detected value; 0 if unknown."""
    detected = (record.capabilities or {}).get("embedding_dim") or 0
    return int(record.spec.metadata.embedding_dim or detected)
