"""The router's core: check → name → asset → admission → a worker that holds it → stream back.

Every request is checked here (`services.common.inference_requests`) before anything else,
so the HTTP shim and the gRPC front refuse the same requests in the same words. Every request
has a deadline (see `deadlines`); admission queues it here in front of the workers' own slots
(see `admission`), and `dispatch` sends it to a worker. A chat for a remote (`runtime: openai`)
asset is placed like any other, then sent to its upstream by the router itself (see `remote`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import aclosing, asynccontextmanager, contextmanager
from decimal import Decimal
from typing import Any, TypeVar

from google.protobuf.message import Message
from opentelemetry import trace

from roundhouse.v1 import inference_pb2
from services.common.asset_proto import AssetRecord
from services.common.assetspec_fields import ASSET_ID_RE
from services.common.errors import (
    AssetNotFound,
    FailedPrecondition,
    NotFound,
    Overloaded,
    RoundhouseError,
    UpstreamError,
    status_of,
)
from services.common.inference_requests import check_chat, check_embed, check_embed_size
from services.common.keys import KeyRecord
from services.common.route_proto import RouteRecord, Stored
from services.common.workerpool import WorkerPool
from services.router.admission import Admission, AssetGate, QueueBudget
from services.router.cache import ResponseCache
from services.router.catalog import AssetCatalog
from services.router.deadlines import DEFAULT_REQUEST_TIMEOUT_S, DEFAULT_STREAM_IDLE_TIMEOUT_S, Deadline
from services.router.dispatch import Dispatcher
from services.router.keys import allowed_models, check_model
from services.router.limits import Limiter, estimate_chat, estimate_embed
from services.router.limits.estimate import Estimate, chat_prompt_tokens
from services.router.metrics import RequestMetrics, model_labels
from services.router.metrics.genai import Operation, annotate
from services.router.remote import RemoteUpstreams
from services.router.routes.caching import RouteCaching, decodes_greedily, whole_chat
from services.router.routes.mirror import Mirror
from services.router.routes.plan import Candidate, Plan, Routed, RoutePlanner, fallback_reason
from services.router.routes.shadow import ShadowTraffic, SideOutcome
from services.router.usage import UsageLedger, UsageTicket
from services.router.waking import ModelWaker

log = logging.getLogger(__name__)

LLM = "llm-runtime"
EMBEDDING = "embedding-runtime"
NO_TOKENS = Estimate(0, Decimal(0))
"""What a request that generates nothing reserves of its key's limits (one request, no tokens)."""
R = TypeVar("R", bound=Message)
Q = TypeVar("Q", inference_pb2.ChatRequest, inference_pb2.EmbedRequest)


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
        cache: ResponseCache | None = None,
        shadow: ShadowTraffic | None = None,
        rng: random.Random | None = None,
        metrics: RequestMetrics | None = None,
    ) -> None:
        """`request_timeout_s`: the longest a request may take in all; `stream_idle_timeout_s`:
        the longest a worker or upstream may stay silent between two chunks of a stream.
        `cache`: where routes keep answers (None: no route caches); `shadow`: the bookkeeping
        of routes' shadow copies; `rng`: the draws of unsticky splits; `metrics`: where every
        request, wake and queue wait is counted (None: a registry of the gateway's own)."""
        self.catalog = catalog
        self.workers = workers
        self.admission = admission
        self.waker = waker
        self.limits = limits or Limiter(None)
        self.usage = usage or UsageLedger(None)
        self.remote = remote or RemoteUpstreams()
        self.request_timeout_s = request_timeout_s
        self.metrics = metrics or RequestMetrics()
        self.metrics.watch(admission)
        self.dispatcher = Dispatcher(workers, waker, self.remote, stream_idle_timeout_s=stream_idle_timeout_s,
                                     metrics=self.metrics)
        self.planner = RoutePlanner(self._target, self._loaded, rng)
        self.caching = RouteCaching(cache)
        self.mirror = Mirror(shadow or ShadowTraffic(), self._target, self._loaded)

    async def _target(self, name: str) -> AssetRecord:
        """The model a route names by id or alias (`AssetNotFound` for a route: routes do not
        nest, and one applied since under a name the route uses is not followed)."""
        stored = await self.catalog.resolve(name, "")
        if not isinstance(stored, AssetRecord):
            raise AssetNotFound(f"model '{name}' is a route; routes do not nest")
        return stored

    async def is_route(self, route_id: str) -> bool:
        """Whether `route_id` is the id of a route."""
        try:
            stored = await self.catalog.resolve(route_id, "")
        except (NotFound, FailedPrecondition):
            return False
        return isinstance(stored, RouteRecord) and stored.spec.asset_id == route_id

    def _loaded(self, asset_id: str) -> bool:
        """Whether a worker holds the asset now (a request would not wake it)."""
        return self.workers.pick(asset_id) is not None

    async def list_models(self, *, key: KeyRecord | None = None) -> list[Stored]:
        """Every asset `key` may use (all without a key), as the registry has it. Never wakes
        a model. The key's limit status is published (see `Limiter.report`)."""
        await self.limits.report(key)
        return allowed_models(key, await self.catalog.list())

    async def get_model(self, name: str, *, key: KeyRecord | None = None) -> Stored:
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
        key: KeyRecord | None = None, stream: bool = True, routed: Routed | None = None,
    ) -> AsyncIterator[inference_pb2.ChatChunk]:
        """Stream a completion from a worker. Closing the iterator cancels the worker's call.
        `stream=False` says the caller wants only the whole text: a remote upstream is then
        asked for it whole, and it comes as one chunk.

        An invalid request fails on the first iteration, before any model is resolved or woken;
        one for a model outside `key`'s scope (None: auth is off) right after the name is
        resolved, before admission or a wake. Then `key`'s limits are reserved once (a refusal
        never reaches a worker nor wakes a model), and settled with the real usage when the
        stream ends; every request is recorded in the usage ledger.

        A route's request goes to its plan's candidates in turn (see `routes.plan`) until one
        answers a first chunk (with `stream=False`, its whole answer); after that a failure
        ends the stream (with the usage so far in the error's `partial_usage`). `routed` gets
        the answering asset, the attempts and the cache outcome; the answer may come from the
        route's cache, and a sample of requests is copied to its shadows (see `routes.mirror`).

        The whole request, queue wait and wake included, ends by its deadline: the request
        timeout, or `timeout` (seconds) when shorter; past it, or when the worker stays silent
        longer than the idle timeout between two chunks, `DeadlineExceeded` is raised.
        """
        routed = routed if routed is not None else Routed()
        async with self._accounted(key, request, LLM, routed) as ticket:
            deadline = Deadline.within(self.request_timeout_s, timeout)
            async with deadline.bounding("its model was looked up"):
                check_chat(request)
                plan = await self._plan(request.model, LLM, key, request.user, routed, ticket,
                                        chat_prompt_tokens(request))
                ticket.asset = plan.usable[0]  # until a candidate is reached
                ticket.estimate = max((estimate_chat(request, r, self.limits.default_completion_tokens)
                                       for r in plan.usable), key=_dearest)
                ticket.reservation = await self.limits.reserve(key, ticket.estimate)
            log.debug("request %s: chat with %s for user %r", request.request_id,
                      ticket.asset.spec.asset_id, request.user)
            failure: RoundhouseError | None = None
            for tried, candidate in enumerate(plan.candidates, start=1):
                if (record := self._reached(candidate, ticket, routed)) is None:
                    continue
                forwarded, entry, hit = await self._prepare(plan, record, request, key, ticket, routed,
                                                            inference_pb2.ChatChunk)
                if hit is not None:
                    yield hit
                    return
                attempt = self._attempt_chat(record, forwarded, deadline, ticket, stream)
                try:
                    first = await anext(attempt, None)
                    if first is None:
                        raise UpstreamError("The model returned no output.")
                except RoundhouseError as exc:  # the attempt has ended: its slot is free again
                    if self._falls_back(plan, record, exc, tried, routed):
                        failure = exc
                        continue
                    raise
                relay = self._relay(plan, record, forwarded, first, attempt, entry, ticket, routed)
                if stream or plan.route is None:
                    self._answered(record, ticket, routed)
                    async with aclosing(relay) as chunks:
                        async for chunk in chunks:
                            yield chunk
                    return
                # A whole answer reaches the client once complete: until then a failure may still
                # move a route's request on.
                try:
                    whole = [chunk async for chunk in relay]
                except RoundhouseError as exc:
                    if self._falls_back(plan, record, exc, tried, routed):
                        failure = exc
                        continue
                    raise
                self._answered(record, ticket, routed)
                for chunk in whole:
                    yield chunk
                return
            # Only a usable candidate's failure moves a request on, and a plan has one: the last
            # such failure is the answer (not why a later candidate was left out).
            assert failure is not None
            raise failure

    async def count_tokens(
        self, request: inference_pb2.ChatRequest, *, key: KeyRecord | None = None,
        timeout: float | None = None,
    ) -> inference_pb2.TokenCount:
        """The prompt tokens `request` would use on its model (chat template, tools and their
        description included), counted by a worker holding it, without generating.

        Checked like a chat (an invalid request is refused before any model is resolved) and
        resolved the same way: by name or alias, a route by the first candidate it would try
        now. `key` must be allowed the model, as for a chat, and it is one request of the key's
        limits, using no tokens (see `tokenless`); the count takes no admission slot. A model
        that sleeps is woken (the tokenizer and template are the loaded model's). Ends by the
        request timeout, or `timeout` when shorter (`DeadlineExceeded`).
        """
        deadline = Deadline.within(self.request_timeout_s, timeout)
        async with self.tokenless(key, request.model, LLM, request.request_id) as ticket:
            async with deadline.bounding("its model was looked up"):
                check_chat(request)
                plan = await self._plan(request.model, LLM, key, request.user, Routed(), ticket,
                                        chat_prompt_tokens(request))
                record = plan.usable[0]
                await self.admit_tokenless(ticket, key, record)
            return await self.dispatcher.count_tokens(
                record, _forwarded(request, record), deadline=deadline, ticket=ticket,
                queue=QueueBudget(record.spec.policy.queue_timeout_s))

    @asynccontextmanager
    async def tokenless(self, key: KeyRecord | None, model: str, interface: str,
                        request_id: str) -> AsyncIterator[UsageTicket]:
        """The usage ticket of a request that generates nothing (a token count, a model load or
        unload): once its model is resolved and allowed, the caller reserves one request of
        `key`'s limits on it, no tokens (`admit_tokenless`); at its end the reservation is
        settled and the ledger records the request with zero tokens."""
        async with self._ticket(key, model, interface, request_id) as ticket:
            yield ticket

    @asynccontextmanager
    async def _ticket(self, key: KeyRecord | None, model: str, interface: str,
                      request_id: str) -> AsyncIterator[UsageTicket]:
        """A usage ticket for a request's life; at its end the ledger records it and the limits
        settle its reservation, both with what it used (see `UsageTicket.finish`)."""
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

    async def admit_tokenless(self, ticket: UsageTicket, key: KeyRecord | None, record: AssetRecord) -> None:
        """The request of a `tokenless` ticket goes to `record` (resolved, and allowed to
        `key`): one request of `key`'s limits is reserved for it, no tokens (`RateLimited`,
        `BudgetExhausted` or `LimitsUnavailable` as for any request)."""
        ticket.asset, ticket.reached = record, True
        ticket.reservation = await self.limits.reserve(key, NO_TOKENS)

    async def _plan(self, name: str, interface: str, key: KeyRecord | None, user: str,
                    routed: Routed, ticket: UsageTicket, prompt_tokens: int) -> Plan:
        """The assets to try for a request naming `name`: the model it names, or the route's
        candidates (sticky by `user` or `key` when the route says so). The targets a route
        leaves out up front are the first attempts reported."""
        stored = await self.catalog.resolve(name, interface)
        check_model(key, stored, name)
        sticky = key.key_id if key is not None else None
        if isinstance(stored, RouteRecord):
            routed.route = True
            ticket.route_id = stored.spec.asset_id
            if stored.spec.sticky == "user":
                sticky = user or None
        plan = await self.planner.plan(stored, sticky_key=sticky, prompt_tokens=prompt_tokens)
        routed.attempts += [(c.name, c.outcome) for c in plan.left_out]
        return plan

    @staticmethod
    def _reached(candidate: Candidate, ticket: UsageTicket, routed: Routed) -> AssetRecord | None:
        """The candidate's record as the request reaches it; None for one left out up front,
        reported then."""
        if candidate.record is None:
            routed.attempts.append((candidate.name, candidate.outcome))
            return None
        ticket.asset = candidate.record
        ticket.reached = True
        return candidate.record

    async def _prepare(self, plan: Plan, record: AssetRecord, request: Q, key: KeyRecord | None,
                       ticket: UsageTicket, routed: Routed, reply: type[R]) -> tuple[Q, str | None, R | None]:
        """`request` as the candidate `record` gets it, its entry in the route's cache (None
        when not cached) and the cached answer there, recorded as a hit (None: none). A route
        with a cache reports `miss` for whatever it does not answer from there."""
        forwarded = _forwarded(request, record)
        if plan.route is None or plan.route.cache is None:
            return forwarded, None, None
        routed.cache, ticket.cache = "miss", ""
        entry = self.caching.key(plan.route, record, forwarded, key)
        if entry is None:
            return forwarded, None, None
        ticket.cache = "miss"
        found = None if routed.no_cache else await self.caching.lookup(plan.route, entry, reply)
        if found is None:
            return forwarded, None if routed.no_store else entry, None
        routed.cache = ticket.cache = "hit"
        ticket.mark_cached()
        routed.attempts.append((record.spec.asset_id, "cache"))
        self._answered(record, ticket, routed, attempt=False)
        assert isinstance(found, reply)
        return forwarded, entry, found

    @staticmethod
    def _falls_back(plan: Plan, record: AssetRecord, exc: RoundhouseError, tried: int,
                    routed: Routed) -> bool:
        """Record a candidate's refusal; whether the request moves on to the next one."""
        reason = fallback_reason(exc)
        routed.attempts.append((record.spec.asset_id, reason or status_of(exc)))
        moves_on = plan.falls_back(reason, tried)
        if moves_on:
            log.info("route %s: %s refused (%s), trying the next candidate",
                     plan.route.asset_id if plan.route else "", record.spec.asset_id, reason)
        return moves_on

    @staticmethod
    def _answered(record: AssetRecord, ticket: UsageTicket, routed: Routed, *,
                  attempt: bool = True) -> None:
        ticket.asset = record
        routed.target = record.spec.asset_id
        if attempt:
            routed.attempts.append((record.spec.asset_id, "ok"))

    async def _attempt_chat(self, record: AssetRecord, forwarded: inference_pb2.ChatRequest,
                            deadline: Deadline, ticket: UsageTicket, stream: bool,
                            ) -> AsyncGenerator[inference_pb2.ChatChunk, None]:
        """One candidate's answer: admitted by its gate, placed and relayed by the dispatcher."""
        async with self._gate(record).slot(deadline) as queue, aclosing(self.dispatcher.chat(
                record, forwarded, deadline=deadline, queue=queue, ticket=ticket, stream=stream,
        )) as chunks:
            async for chunk in chunks:
                ticket.chunk(chunk)
                yield chunk

    async def _relay(self, plan: Plan, record: AssetRecord, forwarded: inference_pb2.ChatRequest,
                     first: inference_pb2.ChatChunk,
                     chunks: AsyncGenerator[inference_pb2.ChatChunk, None], entry: str | None,
                     ticket: UsageTicket, routed: Routed) -> AsyncGenerator[inference_pb2.ChatChunk, None]:
        """The answering candidate's chunks, from its first: fed to the route's shadow copies,
        kept in its cache when whole and answered by the revision the cache entry is for. A
        failure from here on ends the stream, carrying the usage so far."""
        kept: list[inference_pb2.ChatChunk] = []  # only for the cache
        chunk: inference_pb2.ChatChunk | None = first
        primary = None
        try:
            async with aclosing(chunks):
                primary = self.mirror.copy(plan.route, forwarded, self._copy_chat, started=ticket.started,
                                           answering=record.spec.asset_id, greedy=decodes_greedily(forwarded, record))
                while chunk is not None:
                    last = chunk
                    if primary is not None:
                        primary.chunk(chunk)
                    if entry is not None:
                        kept.append(chunk)
                    yield chunk
                    chunk = await anext(chunks, None)
        except RoundhouseError as exc:
            exc.partial_usage = ticket.used_so_far()
            raise
        finally:
            if primary is not None:
                primary.ended()
        if (entry is not None and plan.route is not None and last.finish_reason
                and last.revision == record.revision):
            self.caching.keep(plan.route, entry, whole_chat(record.spec.asset_id, kept))

    @asynccontextmanager
    async def _accounted(self, key: KeyRecord | None, request: Q, interface: str,
                         routed: Routed) -> AsyncIterator[UsageTicket]:
        """A usage ticket for the request's life; at its end the ledger records it and the
        limits settle its reservation, both with what it used (see `UsageTicket.finish`), and
        it is counted in the metrics and described on the request's front span (the HTTP
        API's or the gRPC front's)."""
        front = trace.get_current_span()
        ticket: UsageTicket | None = None
        try:
            async with self._ticket(key, request.model, interface, request.request_id) as ticket:
                yield ticket
        finally:
            assert ticket is not None
            operation: Operation = "chat" if interface == LLM else "embeddings"
            self.metrics.finished(ticket, operation, routed.attempts)
            if isinstance(request, inference_pb2.ChatRequest):
                annotate(front, ticket, operation,
                         max_tokens=request.max_tokens if request.HasField("max_tokens") else None,
                         temperature=request.temperature if request.HasField("temperature") else None)
            else:
                annotate(front, ticket, operation)

    def _gate(self, record: AssetRecord) -> AssetGate:
        """The asset's admission gate, sized to the slots its holders have together."""
        policy = record.spec.policy
        _, interface, model_type = model_labels(record)
        gate = self.admission.gate(record.spec.asset_id, policy, interface=interface,
                                   model_type=model_type)
        gate.resize(self.workers.capacity(record.spec.asset_id, policy.max_concurrency))
        return gate

    async def embed(
        self, request: inference_pb2.EmbedRequest, *, timeout: float | None = None,
        key: KeyRecord | None = None, routed: Routed | None = None,
    ) -> inference_pb2.EmbedResponse:
        """Embed on a worker holding the model.

        Refused before any model is resolved or woken when invalid, right after the name is
        resolved when outside `key`'s scope, and before a worker is asked when the vectors
        could not come back in one message (the asset's dimension is known from its metadata
        or detected capabilities). `key`'s limits are reserved and settled, the deadline kept,
        and a route's candidates, cache and shadows used, as for `chat`.
        """
        routed = routed if routed is not None else Routed()
        async with self._accounted(key, request, EMBEDDING, routed) as ticket:
            ticket.inputs = len(request.inputs)
            deadline = Deadline.within(self.request_timeout_s, timeout)
            async with deadline.bounding("its model was looked up"):
                check_embed(request)
                plan = await self._plan(request.model, EMBEDDING, key, request.user, routed, ticket, 0)
                for usable in plan.usable:
                    check_embed_size(len(request.inputs), embedding_dim(usable))
                ticket.asset = plan.usable[0]  # until a candidate is reached
                ticket.estimate = max((estimate_embed(request, r) for r in plan.usable), key=_dearest)
                ticket.reservation = await self.limits.reserve(key, ticket.estimate)
            log.debug("request %s: embed %d inputs for user %r", request.request_id,
                      len(request.inputs), request.user)
            failure: RoundhouseError | None = None
            for tried, candidate in enumerate(plan.candidates, start=1):
                if (record := self._reached(candidate, ticket, routed)) is None:
                    continue
                forwarded, entry, hit = await self._prepare(plan, record, request, key, ticket, routed,
                                                            inference_pb2.EmbedResponse)
                if hit is not None:
                    return hit
                try:
                    async with self._gate(record).slot(deadline) as queue:
                        result = await self.dispatcher.embed(record, forwarded, deadline=deadline,
                                                             queue=queue, ticket=ticket)
                except RoundhouseError as exc:
                    if self._falls_back(plan, record, exc, tried, routed):
                        failure = exc
                        continue
                    raise
                self._answered(record, ticket, routed)
                ticket.used(result.usage)
                if (primary := self.mirror.copy(plan.route, forwarded, self._copy_embed, started=ticket.started,
                                                answering=record.spec.asset_id)) is not None:
                    primary.embedded(result)
                if entry is not None and plan.route is not None and result.revision == record.revision:
                    self.caching.keep(plan.route, entry, result)
                return result
            # Only a usable candidate's failure moves a request on, and a plan has one: the last
            # such failure is the answer (not why a later candidate was left out).
            assert failure is not None
            raise failure

    async def _copy_chat(self, record: AssetRecord, request: inference_pb2.ChatRequest,
                         may_wake: bool) -> SideOutcome:
        """A shadow copy of a chat (see `_copying`)."""
        request = _forwarded(request, record)  # it came named for the primary's asset
        started, text = time.perf_counter(), []
        usage = inference_pb2.Usage()
        with self._copying(record, request, LLM) as call:
            async with aclosing(self.dispatcher.chat(record, request, stream=True, may_wake=may_wake,
                                                     **call)) as chunks:
                async for chunk in chunks:
                    _check_answered_by(record, chunk.asset_id)
                    text.append(chunk.delta)
                    if chunk.HasField("usage"):
                        usage = chunk.usage
        return SideOutcome(time.perf_counter() - started, usage.prompt_tokens, usage.completion_tokens,
                           text="".join(text), greedy=decodes_greedily(request, record))

    async def _copy_embed(self, record: AssetRecord, request: inference_pb2.EmbedRequest,
                          may_wake: bool) -> SideOutcome:
        """A shadow copy of an embedding request (see `_copying`)."""
        request = _forwarded(request, record)
        started = time.perf_counter()
        with self._copying(record, request, EMBEDDING) as call:
            result = await self.dispatcher.embed(record, request, may_wake=may_wake, **call)
        _check_answered_by(record, result.asset_id)
        return SideOutcome(time.perf_counter() - started, result.usage.prompt_tokens,
                           vectors=[list(e.values) for e in result.embeddings])

    @contextmanager
    def _copying(self, record: AssetRecord, request: inference_pb2.ChatRequest | inference_pb2.EmbedRequest,
                 interface: str) -> Iterator[dict[str, Any]]:
        """What a shadow copy is sent with, while it holds a slot of the shadow asset at this
        router: it is sent only when one is free now (it never queues nor takes a slot a
        request waits for: else `Overloaded`, counted as saturated), does not wait at the
        worker, does not count as use of the model there, and has no key nor ledger line."""
        with self._gate(record).try_slot() as free:
            if not free:
                raise Overloaded(f"model '{record.spec.asset_id}' has no free slot for a shadow copy")
            yield {"deadline": Deadline.within(self.request_timeout_s, None),
                   "queue": QueueBudget(0.0, shadow_copy=True),
                   "ticket": UsageTicket("", request.model, interface, request.request_id)}

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


def _check_answered_by(record: AssetRecord, asset_id: str) -> None:
    """`UpstreamError` unless the shadow asset itself answered its copy (a copy compared with
    what another asset answered would say nothing of the shadow)."""
    if asset_id and asset_id != record.spec.asset_id:
        raise UpstreamError(f"the copy for '{record.spec.asset_id}' was answered by '{asset_id}'")


def _dearest(estimate: Estimate) -> tuple[Decimal, int]:
    """How an estimate ranks among a plan's candidates': the one that could cost the key most
    is reserved, whichever candidate answers."""
    return estimate.usd, estimate.tokens


def _forwarded(request: R, record: AssetRecord) -> R:
    """`request` as a worker gets it: naming the asset by its id."""
    forwarded = type(request)()
    forwarded.CopyFrom(request)
    forwarded.model = record.spec.asset_id  # type: ignore[attr-defined]  # both requests have it
    return forwarded
