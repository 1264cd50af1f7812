"""Dynamic batching: concurrent embed calls share forward passes on one dedicated thread.

The first arrival opens a short window (`max_wait_s`); whatever arrives before it closes,
or before the batch is full, runs together. While a batch runs, new calls queue up and
form the next one. Within a batch, sequences are sorted by length so each forward pass
pads little, and each pass stays under `max_batch_tokens` (padded) and `max_batch_items`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

Forward = Callable[[list[list[int]]], np.ndarray]


@dataclass(frozen=True)
class BatchSettings:
    """Bounds of one batch."""

    max_wait_s: float = 0.005
    """How long the first request of a batch waits for company."""
    max_batch_tokens: int = 8192
    """Padded tokens in one forward pass."""
    max_batch_items: int = 64
    """Sequences in one forward pass."""


@dataclass
class _Job:
    sequences: list[list[int]]
    future: asyncio.Future[np.ndarray]
    tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = sum(len(s) for s in self.sequences)


def plan_passes(lengths: list[int], settings: BatchSettings) -> list[list[int]]:
    """Group sequence indices, shortest first, into passes within the batch bounds."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    passes: list[list[int]] = []
    current: list[int] = []
    for index in order:
        padded = lengths[index] * (len(current) + 1)
        if current and (padded > settings.max_batch_tokens or len(current) >= settings.max_batch_items):
            passes.append(current)
            current = []
        current.append(index)
    if current:
        passes.append(current)
    return passes


class DynamicBatcher:
    """Runs `forward(sequences) -> rows` for many callers at once, one pass at a time."""

    def __init__(self, forward: Forward, settings: BatchSettings | None = None, name: str = "batch"):
        self.settings = settings or BatchSettings()
        self._forward = forward
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._queue: deque[_Job] = deque()
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def queued(self) -> int:
        """Calls waiting for a batch (not counting the one running)."""
        return len(self._live())

    async def run(self, sequences: list[list[int]]) -> np.ndarray:
        """Embed token sequences; returns one row per sequence, in order."""
        if self._closed:
            raise RuntimeError("the model was unloaded")
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._arrived = asyncio.Event()
            self._task = loop.create_task(self._collect(), name="dynamic-batcher")
        job = _Job(sequences, loop.create_future())
        self._queue.append(job)
        assert self._arrived is not None
        self._arrived.set()
        return await job.future

    async def _collect(self) -> None:
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = loop.time() + self.settings.max_wait_s
            while not self._full() and (remaining := deadline - loop.time()) > 0:
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), remaining)
            jobs = self._take()
            if jobs:
                await self._run(jobs)

    def _live(self) -> list[_Job]:
        return [job for job in self._queue if not job.future.done()]

    def _full(self) -> bool:
        live = self._live()
        tokens = sum(job.tokens for job in live)
        items = sum(len(job.sequences) for job in live)
        return tokens >= self.settings.max_batch_tokens or items >= self.settings.max_batch_items

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
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(RuntimeError("the model was unloaded"))
            raise
        except Exception as exc:
            log.exception("embedding batch failed")
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
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
            for i, row in zip(indices, out, strict=True):
                rows[i] = row
        return np.stack(rows)  # type: ignore[arg-type]

    async def close(self) -> None:
        """Stop collecting; queued callers get an error. Waits for a running pass to end."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done():
                job.future.set_exception(RuntimeError("the model was unloaded"))
        await asyncio.to_thread(self._executor.shutdown, wait=True)
