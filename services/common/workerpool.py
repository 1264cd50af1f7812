"""The workers a service knows: what each holds, how much room it has, how busy it is.

The router routes requests with it; the jobs service places loads and picks eviction victims
with it. Both keep it fresh from heartbeats (see `liveness`) and `GetWorkerInfo` calls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc

from roundhouse.v1 import inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.common.errors import ModelNotReady
from services.common.grpc_client import open_channel
from services.common.grpc_server import MAX_MESSAGE_BYTES
from services.common.settings import CommonSettings

log = logging.getLogger(__name__)


@dataclass
class WorkerHandle:
    """One worker: its stubs, its last reported state, and the router's own in-flight count."""

    address: str
    channel: grpc.aio.Channel
    control: worker_pb2_grpc.WorkerControlStub
    inference: inference_pb2_grpc.InferenceStub
    info: worker_pb2.WorkerInfo | None = None
    in_flight: Counter[str] = field(default_factory=Counter)
    worker_id: str = ""
    last_info: worker_pb2.WorkerInfo | None = None
    """The last picture it gave, kept when it stops answering."""
    down: bool = False
    """Declared dead (heartbeats missed) or shut down; cleared by its next heartbeat."""
    calls: set[grpc.aio.Call] = field(default_factory=set)
    """Calls to it in flight, cancelled when it is declared dead."""
    down_since: float = 0.0
    """When (monotonic) it was declared down; 0 while it is not."""
    in_flight_at_picture: Counter[str] = field(default_factory=Counter)
    """`in_flight` when its current picture came: what this router sent or finished since."""

    @property
    def healthy(self) -> bool:
        """Whether the last refresh or heartbeat reached it and it is not declared down."""
        return self.info is not None and not self.down

    @property
    def serving(self) -> bool:
        """Healthy and not draining: new requests may go there."""
        return self.healthy and not self.info.draining  # type: ignore[union-attr]  # healthy: info set

    def model(self, asset_id: str) -> worker_pb2.LoadedModel | None:
        """The asset as its last picture shows it held there; None when it does not hold it."""
        if self.info is None:
            return None
        return next((m for m in self.info.models if m.asset_id == asset_id), None)

    def free_slots(self, asset_id: str) -> int:
        """Slots of the asset free there, as far as this router knows: its last picture's
        `max_concurrency - in_flight - waiting`, less what this router sent since (plus what
        it finished since). Negative: requests wait there. 0 if it does not hold the asset."""
        model = self.model(asset_id)
        if model is None:
            return 0
        sent = self.in_flight[asset_id] - self.in_flight_at_picture[asset_id]
        return model.max_concurrency - model.in_flight - model.waiting - sent

    def take_picture(self, info: worker_pb2.WorkerInfo) -> bool:
        """Adopt `info` unless it is older than the picture held: same process (`started_at`) and
        a lower or equal `seq` (a heartbeat that arrives after a fresher reply), or a process
        that started earlier. Pictures without a `seq` are always adopted. Whether adopted."""
        last = self.last_info
        if last is not None and info.worker_id == last.worker_id:
            started, last_started = info.started_at.ToNanoseconds(), last.started_at.ToNanoseconds()
            if started < last_started or (started == last_started and 0 < info.seq <= last.seq):
                return False
        self.worker_id, self.info, self.last_info = info.worker_id, info, info
        self.in_flight_at_picture = self.in_flight.copy()
        return True

    def holds(self, asset_id: str) -> bool:
        """Whether it reported holding the asset."""
        return self.model(asset_id) is not None

    @property
    def free_bytes(self) -> int:
        """Memory budget left, as last reported."""
        if self.info is None:
            return 0
        return self.info.memory_budget_bytes - self.info.memory_used_bytes


class WorkerPool:
    """Keeps a picture of every worker: configured addresses plus any that heartbeat."""

    def __init__(
        self, addresses: list[str], *, refresh_s: float = 2.0, settings: CommonSettings | None = None,
        forget_after_s: float | None = None,
    ) -> None:
        """`settings`: TLS and the internal token of the channels to workers (see `open_channel`).
        A worker learnt from its heartbeats (not in `addresses`) that stays down
        `forget_after_s` (default: ten refresh periods) is forgotten and its channel closed."""
        self._settings = settings
        self._configured = set(addresses)
        self._forget_after_s = forget_after_s if forget_after_s is not None else 10 * refresh_s
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   # A worker that starts after the router is found within a second or two.
                   ("grpc.initial_reconnect_backoff_ms", 200),
                   ("grpc.max_reconnect_backoff_ms", 2000)]
        self._options = options
        self.workers: list[WorkerHandle] = []
        for address in addresses:
            self._add(address)
        self._refresh_s = refresh_s
        self._task: asyncio.Task[None] | None = None

    def _add(self, address: str) -> WorkerHandle:
        channel = open_channel(address, self._settings, self._options)
        worker = WorkerHandle(address, channel, worker_pb2_grpc.WorkerControlStub(channel),
                              inference_pb2_grpc.InferenceStub(channel))
        self.workers.append(worker)
        return worker

    def find(self, *, worker_id: str = "", address: str = "") -> WorkerHandle | None:
        """The known worker with that id (or else that address), if any."""
        by_id = next((w for w in self.workers if worker_id and w.worker_id == worker_id), None)
        return by_id or next((w for w in self.workers if address and w.address == address), None)

    def observe(self, info: worker_pb2.WorkerInfo) -> WorkerHandle:
        """Take a worker's heartbeat: learn it if new, refresh its picture, route to it again.
        A heartbeat older than the picture held (see `WorkerHandle.take_picture`) changes
        nothing."""
        worker = self.find(worker_id=info.worker_id, address=info.address)
        if worker is None:
            log.info("discovered worker %s at %s", info.worker_id, info.address)
            worker = self._add(info.address)
        if not worker.take_picture(info):
            return worker
        if worker.down:
            log.info("worker %s at %s is back", info.worker_id, worker.address)
        worker.down, worker.down_since = False, 0.0
        return worker

    def mark_down(self, worker: WorkerHandle, *, cancel_calls: bool) -> list[str]:
        """Stop routing to `worker`; with `cancel_calls`, fail its calls in flight at once.

        Returns the assets it was last known to hold.
        """
        last = worker.info or worker.last_info
        held = [m.asset_id for m in last.models] if last is not None else []
        if not worker.down:
            worker.down_since = time.monotonic()
        worker.down, worker.info = True, None
        if cancel_calls:
            for call in list(worker.calls):
                call.cancel()
        return held

    @contextmanager
    def tracking(self, worker: WorkerHandle, call: grpc.aio.Call) -> Iterator[None]:
        """Count `call` in flight on `worker`; a call cancelled because the worker was declared
        dead raises `ModelNotReady` (503, retry later) instead of a bare cancellation."""
        worker.calls.add(call)
        try:
            yield
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if worker.down and call.cancelled() and not (task and task.cancelling()):
                raise ModelNotReady(
                    f"worker {worker.worker_id or worker.address} stopped answering; retry later",
                    retry_after_s=1.0,
                ) from None
            raise
        finally:
            worker.calls.discard(call)

    async def start(self) -> None:
        """Take a first picture, then keep it fresh in the background."""
        await self.refresh()
        self._task = asyncio.create_task(self._refresh_forever(), name="worker-refresh")

    def note_draining(self, worker: WorkerHandle) -> None:
        """Count `worker` as draining, as it answered, until a newer picture says otherwise."""
        if worker.info is not None and not worker.info.draining:
            info = worker_pb2.WorkerInfo()
            info.CopyFrom(worker.info)
            info.draining = True
            worker.info = worker.last_info = info

    async def close(self) -> None:
        """Stop refreshing and close every channel."""
        if self._task:
            self._task.cancel()
        for worker in self.workers:
            await worker.channel.close(None)

    async def refresh(self, worker: WorkerHandle | None = None) -> None:
        """Ask one worker (or all) what it holds; a worker that does not answer is unhealthy."""
        targets = [worker] if worker else [w for w in self.workers if not w.down]
        await asyncio.gather(*(self._refresh_one(w) for w in targets))

    def note_loaded(self, worker: WorkerHandle, model: worker_pb2.LoadedModel) -> bool:
        """Count `model` as held by `worker` from now on, as the worker's own `LoadModel` reply
        says, without asking it again (its next refresh or heartbeat brings the full picture).
        False when there is no picture of it to amend (then refresh it)."""
        if worker.info is None:
            return False
        info = worker_pb2.WorkerInfo()
        info.CopyFrom(worker.info)
        freed = sum(m.memory_bytes for m in info.models if m.asset_id == model.asset_id)
        kept = [m for m in info.models if m.asset_id != model.asset_id]
        del info.models[:]
        info.models.extend([*kept, model])
        info.memory_used_bytes = max(info.memory_used_bytes - freed, 0) + model.memory_bytes
        # The picture keeps its `seq`: the worker's next picture, which has the model, replaces it.
        worker.info = worker.last_info = info
        return True

    async def _refresh_one(self, worker: WorkerHandle) -> None:
        try:
            info = await worker.control.GetWorkerInfo(
                worker_pb2.GetWorkerInfoRequest(), timeout=2, wait_for_ready=True
            )
        except grpc.aio.AioRpcError as exc:
            if worker.info is not None:
                log.warning("worker %s unreachable: %s", worker.address, exc.code().name)
            worker.info = None
            return
        if not worker.take_picture(info) and worker.info is None:
            worker.info = worker.last_info  # it answered: the newest picture still stands

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            await self.refresh()
            await self.forget_gone()

    async def forget_gone(self) -> None:
        """Forget the workers learnt from heartbeats that have been down longer than
        `forget_after_s` with no call left to them, closing their channels."""
        now = time.monotonic()
        gone = [w for w in self.workers if w.down and w.address not in self._configured
                and not w.calls and now - w.down_since >= self._forget_after_s]
        for worker in gone:
            log.info("forgetting worker %s at %s (down for %.0fs)", worker.worker_id, worker.address,
                     now - worker.down_since)
            self.workers.remove(worker)
            await worker.channel.close(None)

    def pick(self, asset_id: str, exclude: Collection[str] = ()) -> WorkerHandle | None:
        """The worker to send a request for the asset to: among those holding it that are
        healthy, not draining and not in `exclude` (addresses), the one with the most free
        slots (see `WorkerHandle.free_slots`), then the fewest requests from this router."""
        holders = [w for w in self.holders(asset_id) if w.serving and w.address not in exclude]
        return max(holders, key=lambda w: (w.free_slots(asset_id), -w.in_flight[asset_id]), default=None)

    def capacity(self, asset_id: str, default: int) -> int:
        """Slots the workers serving the asset have for it together, as last reported;
        `default` for each that does not say, and in all when none holds it."""
        slots = [((m := w.model(asset_id)) and m.max_concurrency) or default
                 for w in self.holders(asset_id) if w.serving]
        return sum(slots) or default

    def holders(self, asset_id: str) -> list[WorkerHandle]:
        """The healthy workers that reported holding the asset."""
        return [w for w in self.workers if w.healthy and w.holds(asset_id)]

    def healthy(self) -> list[WorkerHandle]:
        """The workers that answered lately and are not declared down."""
        return [w for w in self.workers if w.healthy]

    def failed_models(self) -> list[tuple[str, worker_pb2.FailedModel]]:
        """`(worker_id, failure)` of every model a healthy worker reports as failed."""
        return [(w.worker_id, failed) for w in self.healthy() if w.info
                for failed in w.info.failed_models]

    def known(self) -> bool:
        """Whether at least one worker answered the last refresh."""
        return any(w.healthy for w in self.workers)
