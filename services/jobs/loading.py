"""Load and unload operations: put models on workers, evicting idle ones to make room.

The jobs service sees workers through a `WorkerPool` kept fresh by their heartbeats. A load
asks every worker for a current picture (while it reads the asset), chooses a worker
(`placement.plan_placement`), unloads the victims there with reason `evict` (each is a
`model.evicted` event from the worker, with its idle time and the asset it made room for),
then loads. A model loaded less than its hold ago is not evicted (`lifecycle.min_resident_s`,
longer while it is thrashing, see `thrashing`); every eviction is recorded for the thrashing
watch. Observed state goes to the registry as it changes: `loading` (while the worker
loads), `loaded` (with the workers and measured capabilities, written alongside the
operation's outcome), `sleeping` for evicted and slept models, `failed` for a load that
failed (before the operation's outcome, which the failed-model cooldown relies on). The
worker's reply to the load is what the pool learns the placement from: no second call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

import grpc
from sqlalchemy.exc import SQLAlchemyError

from roundhouse.v1 import inference_pb2, worker_pb2
from services.common.asset_proto import AssetRecord, record_to_proto
from services.common.errors import AssetDisabled, ModelNotReady, NotFound, RoundhouseError
from services.common.grpc_client import domain_error
from services.common.workerpool import WorkerHandle, WorkerPool
from services.jobs.install import MIB, human_bytes
from services.jobs.model import ProgressReport, is_transient
from services.jobs.placement import NO_HOLD, Hold, Placement, Victim, has_room, plan_placement
from services.jobs.registry_client import RegistryClient
from services.jobs.runners import RunContext
from services.jobs.thrashing import Episode, ThrashingMonitor

log = logging.getLogger(__name__)

UNLOAD_CALL_S = 60.0


def footprint_bytes(record: AssetRecord) -> int:
    """Memory the asset needs on a worker: its footprint measured at its last load, or its
    declared `resources.memory_mb` when that is more (as the worker counts it)."""
    measured = int((record.capabilities or {}).get("memory_bytes", 0) or 0)
    return max(measured, (record.spec.resources.memory_mb or 0) * MIB)


class LoadRunner:
    """Loads the asset on one worker (the operation's `worker_id`, else the best placed).

    Safe to repeat: an asset already held by a worker counts as loaded. With `force`,
    `running` models, and models within their hold, may be evicted too. With a `thrashing`
    monitor, evictions are recorded and thrashing models held longer.
    """

    def __init__(self, pool: WorkerPool, registry: RegistryClient, *, load_call_s: float,
                 thrashing: ThrashingMonitor | None = None) -> None:
        self._pool = pool
        self._registry = registry
        self._load_call_s = load_call_s
        self._thrashing = thrashing

    async def __call__(self, ctx: RunContext) -> str:
        op = ctx.operation
        await ctx.report(ProgressReport("asking the workers what they hold", progress=5))
        record, _ = await asyncio.gather(self._registry.get_asset(op.asset_id), self._pool.refresh())
        if record.spec.desired == "disabled":
            raise AssetDisabled(f"model '{op.asset_id}' is disabled; enable it to load it")
        try:
            return await self._place_and_load(ctx, record)
        except RoundhouseError as exc:
            # A load that would fail the same way again (not installed, broken weights, no room
            # on any worker) makes the asset `failed`, which starts its cooldown. A transient
            # failure (no worker up, a worker unavailable) does not: the next request retries.
            if not is_transient(exc):
                await self._report_failed(op.asset_id, exc)
            raise

    async def _place_and_load(self, ctx: RunContext, record: AssetRecord) -> str:
        op = ctx.operation
        holders = self._pool.holders(op.asset_id)
        current = [w for w in holders if _revision(w, op.asset_id) == record.revision]
        if current:
            return f"already loaded on {', '.join(w.worker_id for w in current)}"
        if holders:  # an older revision: the worker swaps it in place
            return await self._load(ctx, holders[0], record)
        workers = self._pool.healthy()
        if op.worker_id:
            workers = [w for w in workers if w.worker_id == op.worker_id]
            if not workers:
                raise ModelNotReady(f"worker '{op.worker_id}' is not available", retry_after_s=5)
        needed = footprint_bytes(record)
        # What the held models are (`running`? held how long?) matters only to evict some.
        held: dict[str, AssetRecord] = {}
        episodes: dict[str, Episode] = {}
        if not has_room(workers, needed):
            held, episodes = await self._held(workers)

        def hold_of(worker_id: str, asset_id: str) -> Hold:
            if (other := held.get(asset_id)) is None:  # the registry no longer knows it
                return NO_HOLD
            episode = episodes.get(worker_id)
            if self._thrashing and episode and asset_id in episode.asset_ids:
                return self._thrashing.hold(episode, other.spec.lifecycle.min_resident_s)
            return Hold(other.spec.lifecycle.min_resident_s)

        placement = plan_placement(
            workers, op.asset_id, needed,
            lambda asset_id: held[asset_id].spec.desired if asset_id in held else "on-demand",
            now=datetime.now(UTC), force=op.force, hold_of=hold_of)
        await self._evict(ctx, placement, op.asset_id)
        return await self._load(ctx, placement.worker, record)

    async def _held(self, workers: list[WorkerHandle]
                    ) -> tuple[dict[str, AssetRecord], dict[str, Episode]]:
        """The records of the models the workers hold (the registry's, by id) and the workers'
        ongoing thrashing episodes."""
        ids = {m.asset_id for w in workers if w.info for m in w.info.models}
        records = await self._registry.list_assets() if ids else []
        episodes = (await self._thrashing.ongoing(w.worker_id for w in workers)
                    if self._thrashing is not None and ids else {})
        return {r.spec.asset_id: r for r in records if r.spec.asset_id in ids}, episodes

    async def _evict(self, ctx: RunContext, placement: Placement, asset_id: str) -> None:
        worker = placement.worker
        for victim in placement.victims:
            await ctx.report(ProgressReport(
                f"evicting {victim.asset_id} from {worker.worker_id} (idle {victim.idle_s:.0f}s, "
                f"{human_bytes(victim.memory_bytes)}) to make room", progress=20))
            await self._unload_victim(worker, victim, asset_id)

    async def _unload_victim(self, worker: WorkerHandle, victim: Victim, asset_id: str) -> None:
        try:
            await worker.control.UnloadModel(worker_pb2.UnloadModelRequest(
                asset_id=victim.asset_id, reason="evict", evicted_for=asset_id), timeout=UNLOAD_CALL_S)
        except grpc.aio.AioRpcError as exc:
            error = domain_error(exc, unavailable=f"worker {worker.worker_id} is unavailable")
            if isinstance(error, NotFound):
                return  # gone meanwhile: the room is there
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                # A request arrived since the picture was taken: choose again on the next try.
                raise ModelNotReady(f"{victim.asset_id} became busy on {worker.worker_id}; "
                                    "placing again", retry_after_s=1) from None
            raise error from None
        log.info("evicted %s from %s (idle %.0fs) for %s", victim.asset_id, worker.worker_id,
                 victim.idle_s, asset_id)
        if self._thrashing is not None:
            try:
                await self._thrashing.record(worker.worker_id, victim.asset_id, asset_id)
            except SQLAlchemyError as exc:  # the eviction is done; only its record is missing
                log.warning("could not record the eviction of %s: %s", victim.asset_id, exc)
        await self._registry.report_state(
            victim.asset_id, "sleeping",
            message=f"evicted from {worker.worker_id} to make room for {asset_id}")

    async def _load(self, ctx: RunContext, worker: WorkerHandle, record: AssetRecord) -> str:
        asset_id = record.spec.asset_id
        await ctx.report(ProgressReport(f"loading on {worker.worker_id}", progress=40))
        loading = asyncio.create_task(self._registry.report_state(
            asset_id, "loading", message=f"loading on {worker.worker_id}"))
        try:
            reply = await worker.control.LoadModel(
                worker_pb2.LoadModelRequest(asset=record_to_proto(record)), timeout=self._load_call_s)
        except grpc.aio.AioRpcError as exc:
            await self._pool.refresh(worker)
            raise domain_error(exc, unavailable=f"worker {worker.worker_id} is unavailable") from None
        finally:
            await _recorded(loading)  # in the registry before whatever it hears of next
        model = reply.model
        if not self._pool.note_loaded(worker, model):
            await self._pool.refresh(worker)
        ctx.alongside(self._registry.report_state(
            asset_id, "loaded", message=f"loaded on {worker.worker_id}",
            worker_ids=[w.worker_id for w in self._pool.holders(asset_id)] or [worker.worker_id],
            capabilities=model.capabilities))
        return (f"loaded on {worker.worker_id} in {model.load_seconds:.2f}s "
                f"({human_bytes(model.memory_bytes)})")

    async def _report_failed(self, asset_id: str, error: RoundhouseError) -> None:
        message = error.message
        try:
            await self._registry.report_state(asset_id, "failed", message=message)
        except RoundhouseError as exc:
            log.warning("could not record the failed load of %s: %s", asset_id, exc)


class UnloadRunner:
    """Unloads the asset from every worker holding it (or only the operation's `worker_id`).

    The operation's reason becomes the workers' event: `sleep` → `model.sleeping`, anything
    else → `model.unloaded`. Without `force` a model with requests in flight is not unloaded:
    the operation fails (for a `sleep`, the reconciler asks again once it is idle). Safe to
    repeat.
    """

    def __init__(self, pool: WorkerPool, registry: RegistryClient) -> None:
        self._pool = pool
        self._registry = registry

    async def __call__(self, ctx: RunContext) -> str:
        op = ctx.operation
        reason = op.reason or "operator"
        await self._pool.refresh()
        holders = [w for w in self._pool.holders(op.asset_id)
                   if not op.worker_id or w.worker_id == op.worker_id]
        if not holders:
            return "not loaded on any worker"
        freed = 0
        for n, worker in enumerate(holders):
            await ctx.report(ProgressReport(f"unloading from {worker.worker_id}",
                                            progress=10 + 80 * n // len(holders)))
            try:
                reply = await worker.control.UnloadModel(worker_pb2.UnloadModelRequest(
                    asset_id=op.asset_id, force=op.force, reason=reason), timeout=UNLOAD_CALL_S)
                freed += reply.freed_bytes
            except grpc.aio.AioRpcError as exc:
                error = domain_error(exc, unavailable=f"worker {worker.worker_id} is unavailable")
                if not isinstance(error, NotFound):
                    raise error from None
            finally:
                await self._pool.refresh(worker)
        if not self._pool.holders(op.asset_id):
            state = "sleeping" if reason == "sleep" else "installed"
            await self._registry.report_state(op.asset_id, state, message=f"unloaded ({reason})")
        names = ", ".join(w.worker_id for w in holders)
        return f"unloaded from {names} ({reason}); {human_bytes(freed)} freed"


async def _recorded(report: asyncio.Task[None]) -> None:
    """Wait for a state report sent beside a call; its failure is logged, not raised: the work
    it reports on goes on, and the next report replaces it."""
    try:
        await asyncio.shield(report)
    except RoundhouseError as exc:
        log.warning("could not record an observed state in the registry: %s", exc.message)


def _revision(worker: WorkerHandle, asset_id: str) -> int:
    info = worker.info
    return next((m.revision for m in info.models if m.asset_id == asset_id), 0) if info else 0


PROFILE_PROMPT = "Describe a railway roundhouse in two sentences."
PROFILE_SENTENCES = 32


class ProfileRunner:
    """Measures the asset where it is served: load time and memory (loading it first when no
    worker holds it), then one short generation (time to first token, tokens per second) or
    one batch of embeddings (sentences per second), sent to the worker directly."""

    def __init__(self, pool: WorkerPool, loader: LoadRunner, *, max_tokens: int = 32) -> None:
        self._pool = pool
        self._loader = loader
        self._max_tokens = max_tokens

    async def __call__(self, ctx: RunContext) -> str:
        asset_id = ctx.operation.asset_id
        loaded = await self._loader(ctx)  # leaves the pool's picture of the holder fresh
        worker = self._pool.pick(asset_id)
        if worker is None or worker.info is None:
            raise ModelNotReady(f"'{asset_id}' is not held by any worker after loading", retry_after_s=1)
        held = next(m for m in worker.info.models if m.asset_id == asset_id)
        await ctx.report(ProgressReport(f"measuring on {worker.worker_id}", progress=70))
        try:
            if held.capabilities.embedding_dim == 0:
                figures = await self._generate(worker, asset_id)
            else:
                figures = await self._embed(worker, asset_id)
        except grpc.aio.AioRpcError as exc:
            raise domain_error(exc, unavailable=f"worker {worker.worker_id} is unavailable") from None
        return (f"{loaded}; load {held.load_seconds:.2f}s, {human_bytes(held.memory_bytes)} on "
                f"{worker.worker_id}; {figures}")

    async def _generate(self, worker: WorkerHandle, asset_id: str) -> str:
        request = inference_pb2.ChatRequest(
            model=asset_id, max_tokens=self._max_tokens, temperature=0,
            messages=[inference_pb2.ChatMessage(role="user", content=PROFILE_PROMPT)])
        started = time.perf_counter()
        first = tokens = 0.0
        async for chunk in worker.inference.Chat(request, timeout=300):
            if chunk.delta and not first:
                first = time.perf_counter() - started
            if chunk.usage.completion_tokens:
                tokens = chunk.usage.completion_tokens
        elapsed = time.perf_counter() - started
        return (f"time to first token {first * 1000:.0f} ms, {tokens / elapsed:.1f} tokens/s "
                f"({tokens:.0f} tokens)")

    async def _embed(self, worker: WorkerHandle, asset_id: str) -> str:
        request = inference_pb2.EmbedRequest(model=asset_id, inputs=[
            inference_pb2.EmbedInput(text=f"{PROFILE_PROMPT} ({n})") for n in range(PROFILE_SENTENCES)])
        started = time.perf_counter()
        reply = await worker.inference.Embed(request, timeout=300)
        elapsed = time.perf_counter() - started
        return (f"{len(reply.embeddings) / elapsed:.1f} sentences/s in one batch of "
                f"{len(reply.embeddings)}, {reply.dimensions} dimensions")
