"""Stopping background tasks that swallow a cancellation, as nats-py does mid-publish."""

from __future__ import annotations

import asyncio
import logging

import pytest

from services.common.tasks import cancel_and_wait


async def swallows_one_cancel(started: asyncio.Event) -> None:
    """Like a loop whose publish ate the CancelledError: it goes back to waiting."""
    started.set()
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        pass  # what nats-py's flush does
    await asyncio.sleep(3600)


async def test_a_task_that_swallowed_its_cancellation_is_still_stopped() -> None:
    started = asyncio.Event()
    task = asyncio.create_task(swallows_one_cancel(started))
    await started.wait()

    await cancel_and_wait(task, timeout_s=5)

    assert task.cancelled()


async def test_a_task_that_will_not_stop_is_left_after_the_bound(caplog: pytest.LogCaptureFixture) -> None:
    release, started = asyncio.Event(), asyncio.Event()

    async def stubborn() -> None:
        started.set()
        while not release.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(stubborn(), name="stubborn")
    await started.wait()
    with caplog.at_level(logging.WARNING):
        await cancel_and_wait(task, timeout_s=0.5)
    assert not task.done()
    assert "stubborn did not stop within 0.5s" in caplog.text
    release.set()
    await cancel_and_wait(task, timeout_s=5)
    assert task.done()
