"""`roundhouse models install|rm|load`, `roundhouse ops` and `roundhouse events` as an operator
uses them, against a real registry, jobs service, Postgres and NATS."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from jobs_harness import RunningJobs, add_model, copy_model, jobs_settings, running_jobs, uid
from registry_harness import RunningRegistry

from services.cli.events import format_event
from services.common.events import new_event

pytestmark = pytest.mark.usefixtures("no_leftover_operations")

COMMAND = [sys.executable, "-m", "services.cli.main"]


@pytest.fixture
async def jobs(
    registry: RunningRegistry, db_dsn: str, nats_url: str, tmp_path: Path
) -> AsyncIterator[RunningJobs]:
    async with running_jobs(jobs_settings(db_dsn, nats_url, tmp_path, registry.address)) as running:
        yield running


def cli_env(jobs_address: str = "127.0.0.1:9", nats_url: str = "") -> dict[str, str]:
    env = {**os.environ, "ROUNDHOUSE_JOBS_ADDRESS": jobs_address}
    if nats_url:
        env["ROUNDHOUSE_NATS_URL"] = nats_url
    return env


async def roundhouse(*args: str, jobs_address: str = "127.0.0.1:9") -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [*COMMAND, *args], env=cli_env(jobs_address),
        capture_output=True, text=True, timeout=120,
    )


def operation_id(stdout: str) -> str:
    found = re.search(r"^operation (\S+) (queued|running): ", stdout, re.MULTILINE)
    assert found, stdout
    return found.group(1)


async def test_install_wait_then_ls_and_watch(
    registry: RunningRegistry, jobs: RunningJobs, tiny_llama: Path, tmp_path: Path
) -> None:
    asset_id = await add_model(registry, copy_model(tiny_llama, tmp_path / "sources"))
    done = await roundhouse("models", "install", asset_id, "--wait", jobs_address=jobs.address)
    assert done.returncode == 0, done.stderr
    op_id = operation_id(done.stdout)
    progress = [int(p) for p in re.findall(rf"^install {asset_id}: \w+ (\d+)%", done.stdout,
                                           re.MULTILINE)]
    assert progress and progress == sorted(progress) and progress[-1] == 100, done.stdout
    assert f"operation {op_id} (install {asset_id}) succeeded" in done.stdout

    listing = await roundhouse("ops", "ls", "--asset", asset_id, jobs_address=jobs.address)
    assert listing.returncode == 0, listing.stderr
    header, *rows = listing.stdout.splitlines()
    assert header.split()[:6] == ["ID", "TYPE", "ASSET", "STATUS", "PROGRESS", "AGE"]
    assert len(rows) == 1 and rows[0].split()[:5] == [op_id, "install", asset_id, "succeeded",
                                                       "100%"], listing.stdout
    filtered = await roundhouse("ops", "ls", "--status", "failed", jobs_address=jobs.address)
    assert filtered.returncode == 0 and op_id not in filtered.stdout

    watched = await roundhouse("ops", "watch", op_id, jobs_address=jobs.address)
    assert watched.returncode == 0, watched.stderr
    assert f"operation {op_id} (install {asset_id}) succeeded" in watched.stdout


async def test_ls_follows_pages_up_to_the_limit(
    registry: RunningRegistry, jobs: RunningJobs, tiny_llama: Path, tmp_path: Path
) -> None:
    asset_id = await add_model(registry, copy_model(tiny_llama, tmp_path / "sources"))
    for _ in range(3):
        done = await roundhouse("models", "install", asset_id, "--wait",
                                jobs_address=jobs.address)
        assert done.returncode == 0, done.stderr
    listing = await roundhouse("ops", "ls", "--limit", "2", jobs_address=jobs.address)
    assert len(listing.stdout.splitlines()) == 3, listing.stdout


async def test_failures_exit_1_with_the_services_message(
    registry: RunningRegistry, jobs: RunningJobs, tiny_llama: Path, tmp_path: Path
) -> None:
    absent = uid("absent")
    done = await roundhouse("models", "install", absent, jobs_address=jobs.address)
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and absent in done.stderr, done.stderr
    assert "not found" in done.stderr

    asset_id = await add_model(registry, copy_model(tiny_llama, tmp_path / "sources"))
    load = await roundhouse("models", "load", asset_id, jobs_address=jobs.address)
    assert load.returncode == 1
    assert "no worker is available" in load.stderr, load.stderr

    unknown = await roundhouse("ops", "watch", "not-an-id", jobs_address=jobs.address)
    assert unknown.returncode == 1 and unknown.stderr.startswith("error: ")


async def test_unreachable_jobs_service_is_a_clear_error() -> None:
    for args in (("models", "install", "x"), ("ops", "ls"), ("ops", "cancel", "x")):
        done = await roundhouse(*args)
        assert done.returncode == 1
        assert done.stderr.startswith(
            "error: cannot reach the jobs service at 127.0.0.1:9; is `roundhouse up` running"
        ), done.stderr


async def test_events_tails_an_install_until_ctrl_c(
    registry: RunningRegistry, jobs: RunningJobs, nats_url: str, tiny_llama: Path,
    tmp_path: Path,
) -> None:
    asset_id = await add_model(registry, copy_model(tiny_llama, tmp_path / "sources"))
    tail = await asyncio.create_subprocess_exec(
        *COMMAND, "events", env=cli_env(jobs.address, nats_url),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert tail.stdout is not None and tail.stderr is not None
        ready = await asyncio.wait_for(tail.stderr.readline(), 30)
        assert ready.startswith(b"tailing roundhouse.events.>"), ready
        done = await roundhouse("models", "install", asset_id, jobs_address=jobs.address)
        op_id = operation_id(done.stdout)

        async def until_succeeded() -> list[str]:
            seen: list[str] = []
            while not any("job.succeeded" in s and f"job={op_id}" in s for s in seen):
                line = await tail.stdout.readline()  # type: ignore[union-attr]
                assert line, f"events ended early: {seen}"
                seen.append(line.decode().rstrip())
            return seen

        try:
            lines = await asyncio.wait_for(until_succeeded(), 60)
        except TimeoutError:
            tail.send_signal(signal.SIGINT)
            out, err = await tail.communicate()
            raise AssertionError(f"no job.succeeded for {op_id}:\n{out.decode()}{err.decode()}") from None
        progress = [s for s in lines if "job.progress" in s and f"job={op_id}" in s]
        assert progress and all(f"asset={asset_id}" in s and "progress=" in s for s in progress)
        tail.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(tail.wait(), 30) == 0
    finally:
        if tail.returncode is None:
            tail.kill()
            await tail.wait()


def test_event_lines_show_ids_and_figures() -> None:
    from roundhouse.v1 import events_pb2

    event = new_event("model.loaded", "worker", asset_id="chat", worker_id="w1",
                      model=events_pb2.ModelEventDetail(load_seconds=1.234,
                                                        memory_bytes=3 * 1024**3))
    line = format_event(event)
    assert "model.loaded" in line and "asset=chat worker=w1" in line
    assert "load_seconds=1.23" in line and "memory_bytes=3.0GiB" in line
    down = format_event(new_event("worker.down", "router", worker_id="w1",
                                  worker=events_pb2.WorkerEventDetail(reason="shutdown",
                                                                      asset_ids=["a", "b"])))
    assert "worker=w1" in down and "reason=shutdown asset_ids=a,b" in down
