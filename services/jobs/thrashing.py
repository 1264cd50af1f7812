"""Thrashing: models that keep evicting each other on a worker, told once and then held longer.

Every eviction the jobs service makes is recorded (`evictions`). An eviction that brings back
a model evicted from the same worker earlier in the window (`window_s`) is a reversal: two
models taking turns, or a longer cycle. Once `evictions` reversals fall within the window,
the models involved are thrashing there: an episode starts, and each of them gets one
`model.thrashing` event (committed through the outbox with the episode, so however many jobs
instances record evictions, one of them announces it). The episode goes on while reversals
keep coming within the window, without another event, and ends a window after the last one.

While it goes on, its models stay loaded on that worker at least `hold_s`, or twice their
`min_resident_s` if longer (see `placement.Hold`): a request for the model that lost its
place gets a clear, retryable 503 instead of evicting the other one again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from roundhouse.v1 import events_pb2
from services.common.db.models import Eviction, ThrashingEpisode
from services.common.events import new_event
from services.common.outbox import add_to_outbox
from services.jobs.placement import Hold

log = logging.getLogger(__name__)

THRASHING = "model.thrashing"


@dataclass(frozen=True)
class Episode:
    """Models that keep evicting each other on one worker."""

    worker_id: str
    asset_ids: tuple[str, ...]
    started_at: datetime

    @property
    def names(self) -> str:
        """The models, quoted, for messages."""
        return ", ".join(f"'{a}'" for a in self.asset_ids)


class ThrashingMonitor:
    """Records evictions, finds thrashing episodes and announces each one once."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        evictions: int,
        window_s: float,
        hold_s: float,
        on_commit: Callable[[], None] = lambda: None,
    ) -> None:
        """`on_commit` runs after a commit that put events in the outbox (the relay's `notify`)."""
        self._sessions = sessions
        self._evictions = evictions
        self._window = timedelta(seconds=window_s)
        self._hold_s = hold_s
        self._on_commit = on_commit

    def hold(self, episode: Episode, min_resident_s: float) -> Hold:
        """How long a model of `episode` stays loaded before it may be evicted again."""
        return Hold(max(self._hold_s, 2 * min_resident_s),
                    f"{episode.names} keep evicting each other there (thrashing)")

    async def record(self, worker_id: str, asset_id: str, evicted_for: str, *,
                     at: datetime | None = None) -> Episode | None:
        """Record that `asset_id` was evicted from `worker_id` for `evicted_for`; return the
        episode this eviction starts, if it starts one (its events are in the outbox)."""
        at = at or datetime.now(UTC)
        since = at - self._window
        async with self._sessions() as session, session.begin():
            session.add(Eviction(worker_id=worker_id, asset_id=asset_id, evicted_for=evicted_for,
                                 evicted_at=at))
            await session.execute(delete(Eviction).where(
                Eviction.worker_id == worker_id, Eviction.evicted_at < since))
            recent = (await session.scalars(
                select(Eviction).where(Eviction.worker_id == worker_id, Eviction.evicted_at >= since)
                .order_by(Eviction.evicted_at, Eviction.id))).all()
            reversals, involved = _reversals(recent)
            if reversals < self._evictions:
                return None
            episode = await self._continue_or_start(session, worker_id, involved, at)
            if episode is not None:
                for event in self._events(episode, recent, reversals):
                    add_to_outbox(session, event)
        if episode is not None:
            log.warning("%s keep evicting each other on %s: held for at least %.0fs",
                        episode.names, worker_id, self._hold_s)
            self._on_commit()
        return episode

    async def _continue_or_start(self, session: AsyncSession, worker_id: str,
                                 involved: list[str], at: datetime) -> Episode | None:
        """Extend the worker's ongoing episode, or start one (returned); under the row's lock."""
        await session.execute(insert(ThrashingEpisode).values(
            worker_id=worker_id, asset_ids=[], started_at=at, last_at=at - 2 * self._window,
        ).on_conflict_do_nothing())
        row = await session.scalar(select(ThrashingEpisode).where(
            ThrashingEpisode.worker_id == worker_id).with_for_update())
        assert row is not None
        ongoing = row.last_at >= at - self._window
        row.last_at = max(row.last_at, at)
        if ongoing:
            row.asset_ids = sorted({*row.asset_ids, *involved})
            return None
        row.asset_ids, row.started_at = sorted(involved), at
        return Episode(worker_id, tuple(row.asset_ids), at)

    async def ongoing(self, worker_ids: Iterable[str], *, at: datetime | None = None
                      ) -> dict[str, Episode]:
        """The ongoing episodes of these workers, by worker id."""
        since = (at or datetime.now(UTC)) - self._window
        async with self._sessions() as session:
            rows = (await session.scalars(select(ThrashingEpisode).where(
                ThrashingEpisode.worker_id.in_(list(worker_ids)),
                ThrashingEpisode.last_at >= since))).all()
        return {r.worker_id: Episode(r.worker_id, tuple(r.asset_ids), r.started_at) for r in rows}

    def _events(self, episode: Episode, recent: Iterable[Eviction], reversals: int
                ) -> list[events_pb2.Event]:
        """One `model.thrashing` per model of the episode, naming the model that last took its
        place there."""
        took_place = {e.asset_id: e.evicted_for for e in recent}
        reason = (f"{episode.names} keep evicting each other on worker {episode.worker_id}: "
                  f"{reversals} evictions brought back a model evicted within the last "
                  f"{self._window.total_seconds():.0f}s; each now stays loaded at least "
                  f"{self._hold_s:.0f}s (or twice its min_resident_s) before it may be evicted")
        return [new_event(THRASHING, "jobs", asset_id=asset_id, worker_id=episode.worker_id,
                          model=events_pb2.ModelEventDetail(
                              reason=reason, evicted_for=took_place.get(asset_id, "")))
                for asset_id in episode.asset_ids]


def _reversals(evictions: Iterable[Eviction]) -> tuple[int, list[str]]:
    """How many evictions (oldest first) brought back a model evicted before them, and the
    models those evictions involved."""
    evicted: set[str] = set()
    involved: set[str] = set()
    count = 0
    for eviction in evictions:
        if eviction.evicted_for in evicted:
            count += 1
            involved |= {eviction.asset_id, eviction.evicted_for}
        evicted.add(eviction.asset_id)
    return count, sorted(involved)
