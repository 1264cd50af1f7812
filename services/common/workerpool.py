"""The workers a service knows: what each holds, how much room it has, how busy it is.

The router routes requests with it; the jobs service places loads and picks eviction victims
with it. Both keep it fresh from heartbeats (see `liveness`) and `GetWorkerInfo` calls.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterator
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

    @property
    def healthy(self) -> bool:
        """Whether the last refresh or heartbeat reached it and it is not declared down."""
        return self.info is not None and not self.down

    def holds(self, asset_id: str) -> bool:
        """Whether it reported holding the asset."""
        return self.info is not None and any(m.asset_id == asset_id for m in self.info.models)

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
    ) -> None:
        """`settings`: TLS and the internal token of the channels to workers (see `open_channel`)."""
        self._settings = settings
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
        """Take a worker's heartbeat: learn it if new, refresh its picture, route to it again."""
        worker = self.find(worker_id=info.worker_id, address=info.address)
        if worker is None:
            log.info("discovered worker %s at %s", info.worker_id, info.address)
            worker = self._add(info.address)
        elif worker.down:
            log.info("worker %s at %s is back", info.worker_id, worker.address)
        worker.worker_id, worker.info, worker.last_info, worker.down = info.worker_id, info, info, False
        return worker

    def mark_down(self, worker: WorkerHandle, *, cancel_calls: bool) -> list[str]:
        """Stop routing to `worker`; with `cancel_calls`, fail its calls in flight at once.

        Returns the assets it was last known to hold.
        """
        last = worker.info or worker.last_info
        held = [m.asset_id for m in last.models] if last is not None else []
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
        worker.info = worker.last_info = info
        return True

    async def _refresh_one(self, worker: WorkerHandle) -> None:
        try:
            worker.info = await worker.control.GetWorkerInfo(
                worker_pb2.GetWorkerInfoRequest(), timeout=2, wait_for_ready=True
            )
            worker.worker_id, worker.last_info = worker.info.worker_id, worker.info
        except grpc.aio.AioRpcError as exc:
            if worker.info is not None:
                log.warning("worker %s unreachable: %s", worker.address, exc.code().name)
            worker.info = None

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            await self.refresh()

    def pick(self, asset_id: str) -> WorkerHandle | None:
        """The healthy worker holding the asset with the fewest requests in flight."""
        holders = self.holders(asset_id)
        return min(holders, key=lambda w: w.in_flight[asset_id], default=None)

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
