"""Thrashing: models that keep evicting each other on a worker are announced once per episode,
counted in the router's metrics, and held longer instead of being reloaded forever.

The monitor on real Postgres, its events through the outbox to a real nats-server, counted by
the router's metrics as the router subscribes them; then end to end (registry, jobs, router,
one worker with room for one model), with two models that evict each other until the jobs
service holds the one in place and answers the other with a 503.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import openai
import pytest
from openai import AsyncOpenAI
from polling import wait_until
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from stack_harness import TINY_CHAT, running_stack, witness

from roundhouse.v1 import events_pb2
from services.common.events import EventBus
from services.common.outbox import OutboxRelay
from services.jobs.thrashing import ThrashingMonitor
from services.router.http.metrics import THRASHING_EVENTS, HttpMetrics

WINDOW_S = 600.0


@asynccontextmanager
async def announcing(sessionmaker: async_sessionmaker[AsyncSession], nats_url: str, worker_id: str
                     ) -> AsyncIterator[tuple[ThrashingMonitor, list[events_pb2.Event], HttpMetrics]]:
    """A monitor whose events the outbox relays; the `model.thrashing` events about
    `worker_id`, and a router's metrics fed from the bus."""
    bus = await EventBus.connect(nats_url, name="thrashing-test")
    relay = OutboxRelay(sessionmaker, bus)
    relay.start()
    seen: list[events_pb2.Event] = []

    async def keep(event: events_pb2.Event) -> None:
        if event.worker_id == worker_id:
            seen.append(event)

    metrics = HttpMetrics()
    await bus.subscribe(THRASHING_EVENTS, keep)
    await bus.subscribe(THRASHING_EVENTS, metrics.observe_thrashing)
    try:
        yield (ThrashingMonitor(sessionmaker, evictions=2, window_s=WINDOW_S, hold_s=60,
                                on_commit=relay.notify), seen, metrics)
    finally:
        await relay.stop()
        await bus.close()


def names() -> tuple[str, str, str]:
    tag = uuid.uuid4().hex[:8]
    return f"w-{tag}", f"a-{tag}", f"b-{tag}"


async def test_models_that_keep_evicting_each_other_are_announced_once_per_episode(
    sessionmaker: async_sessionmaker[AsyncSession], nats_url: str,
) -> None:
    worker, a, b = names()
    async with announcing(sessionmaker, nats_url, worker) as (monitor, seen, metrics):
        t0 = datetime.now(UTC)
        assert await monitor.record(worker, a, b, at=t0) is None
        assert await monitor.record(worker, b, a, at=t0 + timedelta(seconds=1)) is None  # a is back
        episode = await monitor.record(worker, a, b, at=t0 + timedelta(seconds=2))  # b is back

        assert episode is not None and episode.asset_ids == (a, b)
        assert await monitor.record(worker, b, a, at=t0 + timedelta(seconds=3)) is None  # goes on
        assert set(await monitor.ongoing([worker], at=t0 + timedelta(seconds=3))) == {worker}
        quiet = t0 + timedelta(seconds=3 + WINDOW_S + 1)
        assert await monitor.ongoing([worker], at=quiet) == {}

        for n in range(3):  # at it again, long after: another episode
            victim, newcomer = (a, b) if n % 2 == 0 else (b, a)
            again = await monitor.record(worker, victim, newcomer, at=quiet + timedelta(seconds=n))
        assert again is not None

        await wait_until(lambda: len(seen) >= 4, 10)
        assert sorted(e.asset_id for e in seen) == [a, a, b, b]  # none for the eviction that went on
        first = {e.asset_id: e for e in seen[:2]}
        assert first[a].type == "model.thrashing" and first[a].source == "jobs"
        assert first[a].model.evicted_for == b and first[b].model.evicted_for == a
        assert f"'{a}', '{b}' keep evicting each other on worker {worker}" in first[a].model.reason
        exposed = metrics.render().decode()
        assert f'roundhouse_model_thrashing_total{{asset_id="{a}"}} 2.0' in exposed
        assert f'roundhouse_model_thrashing_total{{asset_id="{b}"}} 2.0' in exposed


async def test_evictions_that_bring_nothing_back_are_not_thrashing(
    sessionmaker: async_sessionmaker[AsyncSession], nats_url: str,
) -> None:
    worker, a, b = names()
    async with announcing(sessionmaker, nats_url, worker) as (monitor, _, _):
        t0 = datetime.now(UTC)
        for n in range(6):  # a new model each time, never one evicted before
            assert await monitor.record(worker, f"{a}-{n}", f"{a}-{n + 1}",
                                        at=t0 + timedelta(seconds=n)) is None
        # Evictions on other workers do not add up.
        assert await monitor.record(f"{worker}-x", b, a, at=t0) is None
        assert await monitor.record(f"{worker}-y", a, b, at=t0) is None
        assert await monitor.ongoing([worker, f"{worker}-x", f"{worker}-y"]) == {}


def chat_asset(sources: Path, asset_id: str) -> dict:
    """A tiny chat asset declaring 40 MB (one fits a 60 MB worker), evictable at once."""
    return {"asset_id": asset_id, "interface": "llm-runtime",
            "source": {"kind": "path", "path": str(sources / TINY_CHAT)},
            "resources": {"memory_mb": 40},
            "lifecycle": {"desired": "on-demand", "min_resident_s": 0}}


async def test_two_models_taking_turns_on_one_worker_are_held_instead_of_reloaded_forever(
    own_db: str, nats_url: str, sources: Path, tmp_path: Path, no_assets: None,
) -> None:
    async with running_stack(own_db, nats_url, sources, tmp_path / "store", worker_memory_mb=60,
                             jobs_thrashing_evictions=2, jobs_thrashing_hold_s=600) as stack, \
            witness(nats_url) as seen:
        await stack.apply(chat_asset(sources, "ping"), chat_asset(sources, "pong"))
        client = AsyncOpenAI(base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0)

        async def chat(model: str) -> None:
            await client.chat.completions.create(
                model=model, max_tokens=2, temperature=0, messages=[{"role": "user", "content": "hi"}])

        try:
            for model in ("ping", "pong", "ping", "pong"):  # each load evicts the other
                await chat(model)
            await wait_until(lambda: len(seen.of("model.thrashing")) == 2, 10)

            with pytest.raises(openai.APIStatusError) as refused:
                await chat("ping")

            assert refused.value.status_code == 503
            assert "keep evicting each other there (thrashing)" in refused.value.message
            await chat("pong")  # held in place, and serving
        finally:
            await client.close()
        assert sorted(e.asset_id for e in seen.of("model.thrashing")) == ["ping", "pong"]
        assert len(seen.of("model.evicted")) == 3
