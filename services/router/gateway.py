"""The router's core: check → name → asset → admission → a worker that holds it → stream back.

Every request is checked here (`services.common.inference_requests`) before anything else,
so the HTTP shim and the gRPC front refuse the same requests in the same words. Every request
has a deadline (see `deadlines`); admission queues it here in front of the workers' own slots
(see `admission`), and `dispatch` sends it to a worker. A chat for a remote (`runtime: openai`)
asset is placed like any other, then sent to its upstream by the router itself (see `remote`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager

from roundhouse.v1 import inference_pb2
from services.common.asset_proto import AssetRecord
from services.common.assetspec_fields import ASSET_ID_RE
from services.common.errors import AssetNotFound
from services.common.inference_requests import check_chat, check_embed, check_embed_size
from services.common.keys import KeyRecord
from services.common.workerpool import WorkerPool
from services.router.admission import Admission, AssetGate
from services.router.catalog import AssetCatalog
from services.router.deadlines import DEFAULT_REQUEST_TIMEOUT_S, DEFAULT_STREAM_IDLE_TIMEOUT_S, Deadline
from services.router.dispatch import Dispatcher
from services.router.keys import allowed_models, check_model
from services.router.limits import Limiter, estimate_chat, estimate_embed
from services.router.remote import RemoteUpstreams
from services.router.usage import UsageLedger, UsageTicket
from services.router.waking import ModelWaker

log = logging.getLogger(__name__)

LLM = "llm-runtime"
EMBEDDING = "embedding-runtime"


class Gateway:
    """Serves chat and embeddings for the HTTP API and the gRPC front alike."""

    def __init__(
        self,
        catalog: AssetCatalog,
        workers: WorkerPool,
        admission: Admission,
        waker: ModelWaker,
        *,
        limits: Limiter | None = None,
        usage: UsageLedger | None = None,
        remote: RemoteUpstreams | None = None,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
        stream_idle_timeout_s: float = DEFAULT_STREAM_IDLE_TIMEOUT_S,
    ) -> None:
        """`request_timeout_s`: the longest a request may take in all; `stream_idle_timeout_s`:
        the longest a worker or upstream may stay silent between two chunks of a stream."""
        self.catalog = catalog
        self.workers = workers
        self.admission = admission
        self.waker = waker
        self.limits = limits or Limiter(None)
        self.usage = usage or UsageLedger(None)
        self.remote = remote or RemoteUpstreams()
        self.request_timeout_s = request_timeout_s
        self.dispatcher = Dispatcher(workers, waker, self.remote, stream_idle_timeout_s=stream_idle_timeout_s)

    async def list_models(self, *, key: KeyRecord | None = None) -> list[AssetRecord]:
        """Every asset `key` may use (all without a key), as the registry has it. Never wakes
        a model. The key's limit status is published (see `Limiter.report`)."""
        await self.limits.report(key)
        return allowed_models(key, await self.catalog.list())

    async def get_model(self, name: str, *, key: KeyRecord | None = None) -> AssetRecord:
        """One asset by id or alias, whatever its interface or state, if `key` may use it. The
        key's limit status is published (see `Limiter.report`).

        Looked up in the catalog's snapshot (a second old at most, see `AssetCatalog.snapshot`),
        and in a fresh listing when the snapshot has no such name; a name no asset id or alias
        could have is not found at once."""
        await self.limits.report(key)
        if ASSET_ID_RE.fullmatch(name):
            for listing in (self.catalog.snapshot, self.catalog.list):
                for record in await listing():
                    if name == record.spec.asset_id or name in record.spec.aliases:
                        check_model(key, record, name)
                        return record
        raise AssetNotFound(f"model '{name}' not found")

    async def chat(
        self, request: inference_pb2.ChatRequest, *, timeout: float | None = None,
        key: KeyRecord | None = None, stream: bool = True,
    ) -> AsyncIterator[inference_pb2.ChatChunk]:
        """Stream a completion from a worker. Closing the iterator cancels the worker's call.
        `stream=False` says the caller wants only the whole text: a remote upstream is then
        asked for it whole, and it comes as one chunk.

        An invalid request fails on the first iteration, before any model is resolved or woken;
        one for a model outside `key`'s scope (None: auth is off) right after the name is
        resolved, before admission or a wake. Then `key`'s limits are reserved (a refusal never
        reaches a worker nor wakes a model), and settled with the real usage when the stream
        ends; every request is recorded in the usage ledger.

        The whole request, queue wait and wake included, ends by its deadline: the request
        timeout, or `timeout` (seconds) when shorter; past it, or when the worker stays silent
        longer than the idle timeout between two chunks, `DeadlineExceeded` is raised.
        """
        async with self._accounted(key, request.model, LLM, request.request_id) as ticket:
            deadline = Deadline.within(self.request_timeout_s, timeout)
            async with deadline.bounding("its model was looked up"):
                check_chat(request)
                record = await self.catalog.resolve(request.model, LLM)
                check_model(key, record, request.model)
                ticket.asset = record
                ticket.estimate = estimate_chat(request, record, self.limits.default_completion_tokens)
                ticket.reservation = await self.limits.reserve(key, ticket.estimate)
            asset_id = record.spec.asset_id
            log.debug("request %s: chat with %s for user %r", request.request_id, asset_id, request.user)
            forwarded = inference_pb2.ChatRequest()
            forwarded.CopyFrom(request)
            forwarded.model = asset_id
            async with self._gate(record).slot(deadline) as queue, aclosing(self.dispatcher.chat(
                    record, forwarded, deadline=deadline, queue=queue, ticket=ticket, stream=stream,
            )) as chunks:
                async for chunk in chunks:
                    ticket.chunk(chunk)
                    yield chunk

    @asynccontextmanager
    async def _accounted(self, key: KeyRecord | None, model: str, interface: str,
                         request_id: str) -> AsyncIterator[UsageTicket]:
        """A usage ticket for the request's life; at its end the ledger records it and the
        limits settle its reservation, both with what it used (see `UsageTicket.finish`)."""
        ticket = self.usage.open(key, model, interface, request_id)
        try:
            yield ticket
        except BaseException as exc:
            ticket.failed(exc)
            raise
        finally:
            ticket.finish()
            self.usage.record(ticket)
            self.limits.settle(ticket.reservation, ticket.tokens, ticket.cost_usd)

    def _gate(self, record: AssetRecord) -> AssetGate:
        """The asset's admission gate, sized to the slots its holders have together."""
        policy = record.spec.policy
        gate = self.admission.gate(record.spec.asset_id, policy)
        gate.resize(self.workers.capacity(record.spec.asset_id, policy.max_concurrency))
        return gate

    async def embed(
        self, request: inference_pb2.EmbedRequest, *, timeout: float | None = None,
        key: KeyRecord | None = None,
    ) -> inference_pb2.EmbedResponse:
        """Embed on a worker holding the model.

        Refused before any model is resolved or woken when invalid, right after the name is
        resolved when outside `key`'s scope, and before a worker is asked when the vectors
        could not come back in one message (the asset's dimension is known from its metadata
        or detected capabilities). `key`'s limits are reserved and settled, and the deadline
        kept, as for `chat`.
        """
        async with self._accounted(key, request.model, EMBEDDING, request.request_id) as ticket:
            deadline = Deadline.within(self.request_timeout_s, timeout)
            async with deadline.bounding("its model was looked up"):
                check_embed(request)
                record = await self.catalog.resolve(request.model, EMBEDDING)
                check_model(key, record, request.model)
                check_embed_size(len(request.inputs), embedding_dim(record))
                ticket.asset = record
                ticket.estimate = estimate_embed(request, record)
                ticket.reservation = await self.limits.reserve(key, ticket.estimate)
            log.debug("request %s: embed %d inputs with %s for user %r", request.request_id,
                      len(request.inputs), record.spec.asset_id, request.user)
            forwarded = inference_pb2.EmbedRequest()
            forwarded.CopyFrom(request)
            forwarded.model = record.spec.asset_id
            async with self._gate(record).slot(deadline) as queue:
                result = await self.dispatcher.embed(record, forwarded, deadline=deadline, queue=queue,
                                                     ticket=ticket)
            ticket.used(result.usage)
            return result

    async def ready(self) -> bool:
        """Registry reachable (it answered within the catalog's snapshot period) and at least one
        worker answering."""
        if not self.workers.known():
            return False
        try:
            await self.catalog.snapshot()
        except Exception:  # noqa: BLE001 - readiness only reports
            return False
        return True


def embedding_dim(record: AssetRecord) -> int:
    """The asset's vector length: declared metadata wins over the detected value; 0 if unknown."""
    detected = (record.capabilities or {}).get("embedding_dim") or 0
    return int(record.spec.metadata.embedding_dim or detected)
