"""Watching one operation: its state now, then every change until it finishes.

A watcher takes the operation as this instance's commits leave it (`ChangeNotifier`, signalled
after each commit with the changed row, so no read follows), and otherwise re-reads the row
every `poll_s`. The row is the source of truth, and re-reading it by primary key every half
second is cheap, so changes made by another jobs instance (which this process never hears of
directly) reach the watcher within `poll_s`, without one NATS subscription per watcher,
without waiting on the outbox relay, and even while NATS is down. Listening to `job.*` events
instead would give the same latency only for events that do get published, and the watcher
would still have to read the row to return a full `Operation`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncGenerator, Iterator

from services.jobs.model import OperationRecord
from services.jobs.repository import OperationRepository

DEFAULT_POLL_S = 0.5


class Listener:
    """One watcher's view of the changes of an operation: `changed` is set on each, and
    `latest` is the newest record a change came with (None when it came without one)."""

    def __init__(self) -> None:
        self.changed = asyncio.Event()
        self.latest: OperationRecord | None = None

    def take(self) -> OperationRecord | None:
        """The record the changes since the last call came with, if they all had one; clears."""
        self.changed.clear()
        latest, self.latest = self.latest, None
        return latest


class ChangeNotifier:
    """Wakes the watchers of an operation when this process has changed it."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[Listener]] = defaultdict(set)

    def notify(self, operation_id: str, record: OperationRecord | None = None) -> None:
        """Signal every watcher of `operation_id` (call after the change committed), handing
        them `record`, the operation as the commit left it, when the caller has it."""
        for listener in self._waiters.get(operation_id, ()):
            newest = listener.latest
            if record is None or (listener.changed.is_set() and newest is None):
                listener.latest = None  # a change without its record: the watcher reads the row
            elif newest is None or record.updated_at >= newest.updated_at:
                listener.latest = record  # commits may be reported out of order: keep the newest
            listener.changed.set()

    @contextlib.contextmanager
    def listen(self, operation_id: str) -> Iterator[Listener]:
        """A listener of the changes of `operation_id` while the block runs."""
        listener = Listener()
        self._waiters[operation_id].add(listener)
        try:
            yield listener
        finally:
            waiters = self._waiters[operation_id]
            waiters.discard(listener)
            if not waiters:
                del self._waiters[operation_id]


async def watch_operation(
    repository: OperationRepository,
    notifier: ChangeNotifier,
    operation_id: str,
    *,
    poll_s: float = DEFAULT_POLL_S,
) -> AsyncGenerator[OperationRecord, None]:
    """Yield the operation now, then each state a re-read finds changed, ending when terminal.

    Raises `OperationNotFound` at once for an unknown id. Changes in quick succession may
    be merged into one (a watcher sees the latest state, not every intermediate step).
    """
    with notifier.listen(operation_id) as listener:
        record = await repository.get(operation_id)
        yield record
        seen = record.observable()
        while not record.terminal:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(listener.changed.wait(), poll_s)
            told = listener.take()
            if told is not None and told.updated_at >= record.updated_at:
                record = told
            else:
                record = await repository.get(operation_id)
            if record.observable() != seen:
                seen = record.observable()
                yield record
