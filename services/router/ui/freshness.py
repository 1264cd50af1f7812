"""`PictureRefresh`: the router's pictures of its workers and of the registry, brought up to date
once after each change the live feed reports, however many pages ask.

The models and workers views read what the router already holds (each worker's last picture,
the catalog's snapshot), which can be a moment behind an event that just went out: a page that
re-fetched its fragment on `model.unloaded` could show the model still loaded and then, with no
further event, never update. So a view asks `current(refresh)` first: when a change was noted
since the last refresh began (or none was ever made), it waits for a refresh begun after that
change, starting one if none is under way; otherwise it asks nobody. Every open tab re-fetches
on the same event, and they share that one refresh. A page loaded in full, and a feed opened,
count as changes: whatever changed while no feed was open is shown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


class PictureRefresh:
    """Refreshes on demand, at most once per noted change (see the module docstring)."""

    def __init__(self) -> None:
        self._change = 1
        """Bumped by every `changed`; a refresh begun at change `n` covers changes up to `n`."""
        self._covered = 0
        self._running: asyncio.Future[None] | None = None
        self._running_covers = 0

    def changed(self) -> None:
        """Something the pictures show may have changed (an event went out, a feed opened)."""
        self._change += 1

    async def current(self, refresh: Callable[[], Awaitable[object]]) -> None:
        """Return once a refresh (`refresh()`) begun after the latest change noted so far has
        finished; at once when one already has. A failed refresh raises here for every caller
        that waited on it."""
        wanted = self._change
        while self._covered < wanted:
            if self._running is None:
                self._running_covers = self._change
                self._running = asyncio.ensure_future(self._run(refresh, self._change))
                self._running.add_done_callback(_retrieved)
            running, covers = self._running, self._running_covers
            # Shielded: one page giving up does not cancel the refresh the others wait for.
            if covers >= wanted:
                await asyncio.shield(running)
                return
            try:
                await asyncio.shield(running)
            except Exception:  # begun before the change: its failure is not this caller's answer
                continue

    async def _run(self, refresh: Callable[[], Awaitable[object]], covers: int) -> None:
        try:
            await refresh()
            self._covered = max(self._covered, covers)
        finally:
            self._running = None


def _retrieved(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved here: a failure is the waiting callers' to report
