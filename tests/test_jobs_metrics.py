"""The jobs service's `/metrics` (ROUNDHOUSE_JOBS_METRICS_PORT) after real operations: an
install, a load onto a real worker, an unload, a failing install, and one held running."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import httpx
import pytest
from jobs_harness import (
    add_model,
    copy_model,
    feed_until_done,
    jobs_settings,
    running_jobs,
    stalled_model,
    submit,
    watch_until_done,
)
from polling import wait_until
from prometheus_client.parser import text_string_to_metric_families
from registry_harness import RunningRegistry
from stack_harness import running_worker

from roundhouse.v1 import jobs_pb2
from services.common.modelstore import ModelStore
from services.jobs.server import build_app

INSTALL, LOAD, UNLOAD = (jobs_pb2.OPERATION_TYPE_INSTALL, jobs_pb2.OPERATION_TYPE_LOAD,
                         jobs_pb2.OPERATION_TYPE_UNLOAD)
SUCCEEDED, FAILED = jobs_pb2.OPERATION_STATUS_SUCCEEDED, jobs_pb2.OPERATION_STATUS_FAILED

pytestmark = pytest.mark.usefixtures("no_leftover_operations")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int) -> Samples:
    """Every sample the metrics port serves, by name and labels."""
    async with httpx.AsyncClient() as client:
        reply = await client.get(f"http://127.0.0.1:{port}/metrics")
    assert reply.status_code == 200
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(reply.text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def run(stub: jobs_pb2.JobsStub, asset_id: str, kind: int) -> jobs_pb2.Operation:
    op = await stub.SubmitOperation(submit(asset_id, kind))
    return (await watch_until_done(stub, op.operation_id))[-1]


async def test_operations_outbox_and_events_are_counted_and_served(
    registry: RunningRegistry, db_dsn: str, nats_url: str, tiny_llama: Path, tmp_path: Path
) -> None:
    good = await add_model(registry, copy_model(tiny_llama, tmp_path / "sources"))
    broken_folder = tmp_path / "sources" / "not-a-model"
    broken_folder.mkdir()
    (broken_folder / "weights.safetensors").write_bytes(b"\0" * 64)
    broken = await add_model(registry, broken_folder)
    stalled_folder, fifo = stalled_model(tiny_llama, tmp_path)
    stalled = await add_model(registry, stalled_folder)
    store = ModelStore(tmp_path / "store", [tmp_path / "sources"])

    async with running_worker(store) as worker:
        settings = jobs_settings(db_dsn, nats_url, tmp_path, registry.address,
                                 worker_addresses=[worker.address], jobs_metrics_port=0)
        async with running_jobs(settings) as jobs:
            port = jobs.app.metrics_port
            assert port
            outcomes = [(await run(jobs.stub, good, kind)).status for kind in (INSTALL, LOAD, UNLOAD)]
            assert outcomes == [SUCCEEDED] * 3
            assert (await run(jobs.stub, broken, INSTALL)).status == FAILED

            held = await jobs.stub.SubmitOperation(submit(stalled))

            async def install_in_progress() -> bool:
                return value(await scrape(port), "roundhouse_operations_in_progress",
                             type="install") == 1

            await wait_until(install_in_progress, timeout=15)
            await asyncio.wait_for(feed_until_done(fifo, jobs.stub, held.operation_id), 60)

            async def nothing_in_progress() -> bool:
                return value(await scrape(port), "roundhouse_operations_in_progress",
                             type="install") == 0

            await wait_until(nothing_in_progress, timeout=15)

            async def all_published() -> Samples | None:
                samples = await scrape(port)
                done = value(samples, "roundhouse_events_published_total", type="job.succeeded")
                backlog = value(samples, "roundhouse_outbox_backlog")
                return samples if done and backlog == 0 else None

            await wait_until(all_published, timeout=15)
            samples = await scrape(port)

    for type_, status, count in [("install", "succeeded", 2), ("load", "succeeded", 1),
                                 ("unload", "succeeded", 1), ("install", "failed", 1)]:
        assert value(samples, "roundhouse_operations_total", type=type_, status=status) == count
        assert value(samples, "roundhouse_operation_duration_seconds_count",
                     type=type_, status=status) == count
        assert (value(samples, "roundhouse_operation_duration_seconds_sum", type=type_, status=status)
                or 0) > 0
    assert value(samples, "roundhouse_operation_duration_seconds_bucket",
                 type="load", status="succeeded", le="0.0005") == 0
    assert value(samples, "roundhouse_operations_in_progress", type="load") == 0
    # The registry's relay shares the outbox: this one publishes most events, not all.
    published = {dict(labels)["type"]: n for (name, labels), n in samples.items()
                 if name == "roundhouse_events_published_total"}
    assert published.keys() >= {"job.queued", "job.progress", "job.succeeded"}
    assert all(n > 0 for n in published.values()), published


async def test_no_metrics_port_unless_asked(
    registry: RunningRegistry, db_dsn: str, nats_url: str, tmp_path: Path
) -> None:
    async with running_jobs(jobs_settings(db_dsn, nats_url, tmp_path, registry.address)) as jobs:
        assert jobs.app.metrics_port is None


async def test_a_metrics_port_already_taken_fails_start_up_before_anything_runs(
    registry: RunningRegistry, db_dsn: str, nats_url: str, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = jobs_settings(db_dsn, nats_url, tmp_path, registry.address,
                                 jobs_metrics_port=taken.getsockname()[1])
        before = asyncio.all_tasks()
        with pytest.raises(OSError):
            await build_app(settings)
    # Nothing was left running: no outbox relay, gauge sampler or liveness watch of its own.
    left = {t.get_name() for t in asyncio.all_tasks() - before if not t.done()}
    assert not left & {"outbox-relay", "operations-gauge", "worker-liveness"}, left
