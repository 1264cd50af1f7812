"""Dynamic batching: concurrent embed calls share forward passes on one dedicated thread.

There is no waiting window. A call made while the model is idle starts a pass at once (at the
event loop's next turn, so calls that arrive together still share it); calls made while a
pass runs queue up, and the next batch takes everything queued, as far as the bounds allow.
Under load the batches grow by themselves; alone, a call pays nothing for batching. A
batch's sequences are sorted by length and cut into forward passes that pad little
(`plan_passes`), each under `max_batch_tokens` (padded) and `max_batch_items`. At most
`max_queued` calls wait for a batch; one more is refused at once with `Overloaded`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import sys
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from services.common.errors import Overloaded

log = logging.getLogger(__name__)

Forward = Callable[[list[list[int]]], np.ndarray]

UNLOADED = "the model was unloaded"


@dataclass(frozen=True)
class BatchSettings:
    """Bounds of one batch."""

    max_batch_tokens: int = 8192
    """Padded tokens in one forward pass."""
    max_batch_items: int = 64
    """Sequences in one forward pass."""
    max_queued: int = 256
    """Calls waiting for a batch. One more is refused with `Overloaded` (429) rather than queued:
    the worker's admission keeps fewer waiting (a model's `max_concurrency`), so this bound
    holds whatever calls the batcher directly, and keeps its memory bounded."""
    pass_cost_tokens: int = 32
    """What one more forward pass costs, in padded tokens: its fixed work (module calls,
    pooling) measured against the work per token of a small encoder on CPU (MiniLM: about
    8 ms against 0.25 ms). `plan_passes` splits a batch where padding would cost more."""


@dataclass
class _Job:
    sequences: list[list[int]]
    future: asyncio.Future[np.ndarray]
    tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = sum(len(s) for s in self.sequences)


def plan_passes(lengths: list[int], settings: BatchSettings) -> list[list[int]]:
    """Group sequence indices, shortest first, into forward passes within the batch bounds.

    A pass pads every sequence to its longest one, so mixing short and long sequences
    wastes work; another pass costs `pass_cost_tokens`. Of the ways to cut the sorted
    sequences into consecutive passes, this takes the cheapest (padded tokens plus pass
    costs): similar lengths share a pass, and a long tail gets one of its own.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    sorted_lengths = [lengths[i] for i in order]
    count = len(order)
    # cost[end]: the cheapest plan for the first `end` sorted sequences; its last pass
    # starts at begins[end].
    cost = [0] + [sys.maxsize] * count
    begins = [0] * (count + 1)
    for end in range(1, count + 1):
        width = sorted_lengths[end - 1]
        for begin in range(end - 1, max(0, end - settings.max_batch_items) - 1, -1):
            size = end - begin
            if size > 1 and width * size > settings.max_batch_tokens:
                break
            candidate = cost[begin] + settings.pass_cost_tokens + width * size
            if candidate < cost[end]:
                cost[end], begins[end] = candidate, begin
    passes: list[list[int]] = []
    end = count
    while end > 0:
        passes.append(order[begins[end]:end])
        end = begins[end]
    return passes[::-1]


class DynamicBatcher:
    """Runs `forward(sequences) -> rows` for many callers at once, one batch at a time.

    A batch is the calls queued when the previous one ended (or the lone call that found
    the model idle), up to the settings' bounds; its sequences may take several forward
    passes. Forward passes run on one thread of their own, never two at once. A failing
    batch fails each of its callers; `close` fails the queued ones.
    """

    def __init__(self, forward: Forward, settings: BatchSettings | None = None, name: str = "batch"):
        self.settings = settings or BatchSettings()
        self._forward = forward
        self._name = name
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._queue: deque[_Job] = deque()
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.on_pass: Callable[[int], None] | None = None
        """Told the number of sequences of each forward pass, from the batch thread."""

    @property
    def queued(self) -> int:
        """Calls waiting for a batch (not counting those in the running one)."""
        return sum(1 for job in self._queue if not job.future.done())

    async def run(self, sequences: list[list[int]]) -> np.ndarray:
        """Embed token sequences; returns one row per sequence, in order.

        Raises `Overloaded` when `max_queued` calls wait already.
        """
        if self._closed:
            raise RuntimeError(UNLOADED)
        if self.queued >= self.settings.max_queued:
            raise Overloaded(f"the embedding batch queue '{self._name}' is full ("
                             f"{self.settings.max_queued} calls waiting, its bound); retry shortly")
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._arrived = asyncio.Event()
            # A context of its own: the batches serve every caller, not the first one's request.
            self._task = loop.create_task(self._collect(), name="dynamic-batcher", context=contextvars.Context())
        job = _Job(sequences, loop.create_future())
        self._queue.append(job)
        assert self._arrived is not None
        self._arrived.set()
        return await job.future

    async def _collect(self) -> None:
        assert self._arrived is not None
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            jobs = self._take()
            if jobs:
                await self._run(jobs)

    def _take(self) -> list[_Job]:
        jobs: list[_Job] = []
        tokens = items = 0
        while self._queue:
            job = self._queue[0]
            if job.future.done():  # its caller went away before the batch ran
                self._queue.popleft()
                continue
            over = (
                tokens + job.tokens > self.settings.max_batch_tokens
                or items + len(job.sequences) > self.settings.max_batch_items
            )
            if jobs and over:
                break
            jobs.append(self._queue.popleft())
            tokens += job.tokens
            items += len(job.sequences)
        return jobs

    async def _run(self, jobs: list[_Job]) -> None:
        sequences = [s for job in jobs for s in job.sequences]
        loop = asyncio.get_running_loop()
        try:
            rows = await loop.run_in_executor(self._executor, self._forward_all, sequences)
        except asyncio.CancelledError:
            _fail(jobs)
            raise
        except Exception as exc:
            log.exception("embedding batch failed")
            _fail(jobs, exc)
            return
        start = 0
        for job in jobs:
            end = start + len(job.sequences)
            if not job.future.done():
                job.future.set_result(rows[start:end])
            start = end

    def _forward_all(self, sequences: list[list[int]]) -> np.ndarray:
        rows: list[np.ndarray | None] = [None] * len(sequences)
        for indices in plan_passes([len(s) for s in sequences], self.settings):
            out = self._forward([sequences[i] for i in indices])
            if self.on_pass is not None:
                self.on_pass(len(indices))
            for i, row in zip(indices, out, strict=True):
                rows[i] = row
        return np.stack(rows)  # type: ignore[arg-type]

    async def close(self) -> None:
        """Stop batching; queued callers get an error. Waits for a running pass to end."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        _fail(list(self._queue))
        self._queue.clear()
        await asyncio.to_thread(self._executor.shutdown, wait=True)


def _fail(jobs: list[_Job], exc: BaseException | None = None) -> None:
    """Fail the jobs whose callers still wait: with `exc`, else each with an unload error."""
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(exc if exc is not None else RuntimeError(UNLOADED))
