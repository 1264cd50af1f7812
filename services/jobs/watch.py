"""Watching one operation: its state now, then every change until it finishes.

A watcher re-reads the operation's row whenever this instance changes it (`ChangeNotifier`,
signalled after each commit) and otherwise every `poll_s`. The row is the source of truth,
and re-reading it by primary key every half second is cheap, so changes made by another jobs
instance (which this process never hears of directly) reach the watcher within `poll_s`,
without one NATS subscription per watcher, without waiting on the outbox relay, and even
while NATS is down. Listening to `job.*` events instead would give the same latency only for
events that do get published, and the watcher would still have to read the row to return a
full `Operation`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncGenerator, Iterator

from services.jobs.model import OperationRecord
from services.jobs.repository import OperationRepository

DEFAULT_POLL_S = 0.5


class ChangeNotifier:
    """Wakes the watchers of an operation when this process has changed it."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)

    def notify(self, operation_id: str) -> None:
        """Signal every watcher of `operation_id` (call after the change committed)."""
        for event in self._waiters.get(operation_id, ()):
            event.set()

    @contextlib.contextmanager
    def listen(self, operation_id: str) -> Iterator[asyncio.Event]:
        """An event set on each change of `operation_id` while the block runs."""
        event = asyncio.Event()
        self._waiters[operation_id].add(event)
        try:
            yield event
        finally:
            waiters = self._waiters[operation_id]
            waiters.discard(event)
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
    with notifier.listen(operation_id) as changed:
        record = await repository.get(operation_id)
        yield record
        seen = record.observable()
        while not record.terminal:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), poll_s)
            changed.clear()
            record = await repository.get(operation_id)
            if record.observable() != seen:
                seen = record.observable()
                yield record
