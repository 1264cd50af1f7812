"""The Jobs service over gRPC, with a real registry, Postgres, NATS and model store."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from jobs_harness import (
    JobEvents,
    add_model,
    asset_status,
    copy_model,
    jobs_settings,
    rpc_error,
    running_jobs,
    submit,
    uid,
    watch_until_done,
)
from registry_harness import RunningRegistry

from roundhouse.v1 import asset_pb2, jobs_pb2, registry_pb2
from services.common.db.engine import make_engine, make_sessionmaker
from services.common.db.models import Operation

INSTALL, LOAD, UNLOAD, PROFILE, DELETE = (
    jobs_pb2.OPERATION_TYPE_INSTALL, jobs_pb2.OPERATION_TYPE_LOAD, jobs_pb2.OPERATION_TYPE_UNLOAD,
    jobs_pb2.OPERATION_TYPE_PROFILE, jobs_pb2.OPERATION_TYPE_DELETE,
)
SUCCEEDED, FAILED = jobs_pb2.OPERATION_STATUS_SUCCEEDED, jobs_pb2.OPERATION_STATUS_FAILED


pytestmark = pytest.mark.usefixtures("no_leftover_operations")


async def test_install_reports_progress_events_and_the_installed_asset(
    registry: RunningRegistry, events: JobEvents, db_dsn: str, nats_url: str,
    tiny_llama: Path, tmp_path: Path,
) -> None:
    asset_id = await add_model(registry, copy_model(tiny_llama, tmp_path / "sources"))
    async with running_jobs(jobs_settings(db_dsn, nats_url, tmp_path, registry.address)) as jobs:
        op = await jobs.stub.SubmitOperation(submit(asset_id))
        assert op.status in (jobs_pb2.OPERATION_STATUS_QUEUED, jobs_pb2.OPERATION_STATUS_RUNNING)
        states = await watch_until_done(jobs.stub, op.operation_id)
        await events.wait_for(op.operation_id, "job.succeeded")

    final = states[-1]
    assert (final.status, final.progress, final.attempts, final.error) == (SUCCEEDED, 100, 1, "")
    assert final.started_at.seconds and final.finished_at.seconds
    progress = [s.progress for s in states]
    assert progress == sorted(progress)
    ordered = sorted(events.of(op.operation_id), key=lambda e: e.time.ToNanoseconds())
    kinds = [e.type for e in ordered]
    assert kinds[0] == "job.queued" and kinds[-1] == "job.succeeded"
    assert set(kinds[1:-1]) == {"job.progress"}
    updates = [e.job for e in ordered if e.type == "job.progress"]
    assert [u.progress for u in updates] == sorted(u.progress for u in updates)
    assert any(0 < u.progress < 100 and u.bytes_total > 0 for u in updates), updates
    status = await asset_status(registry, asset_id)
    assert status.state == asset_pb2.ASSET_STATE_INSTALLED
    installed = Path(status.store_path)
    assert installed.parent == tmp_path / "store" / "sources"
    assert json.loads((installed / "manifest.json").read_text())["installed_for"] == asset_id


async def test_submit_with_the_same_idempotency_key_returns_the_first_operation(
    registry: RunningRegistry, events: JobEvents, db_dsn: str, nats_url: str,
    tiny_llama: Path, tmp_path: Path,
) -> None:
    asset_id = await add_model(registry, copy_model(tiny_llama, tmp_path / "sources"))
    async with running_jobs(jobs_settings(db_dsn, nats_url, tmp_path, registry.address)) as jobs:
        key = uid("key")
        first = await jobs.stub.SubmitOperation(submit(asset_id, key=key))
        await watch_until_done(jobs.stub, first.operation_id)
        again = await jobs.stub.SubmitOperation(submit(asset_id, key=key))
        assert again.operation_id == first.operation_id
        assert (again.status, again.idempotency_key) == (SUCCEEDED, key)
        other = await rpc_error(jobs.stub.SubmitOperation(submit(asset_id, DELETE, key=key)))
        assert other.code() == grpc.StatusCode.ABORTED
        assert first.operation_id in other.details()
        listed = await jobs.stub.ListOperations(jobs_pb2.ListOperationsRequest(asset_id=asset_id))
    assert [o.operation_id for o in listed.operations] == [first.operation_id]
    assert events.types(first.operation_id).count("job.queued") == 1


async def test_unknown_assets_operations_and_arguments_are_refused(
    registry: RunningRegistry, db_dsn: str, nats_url: str, tmp_path: Path
) -> None:
    async with running_jobs(jobs_settings(db_dsn, nats_url, tmp_path, registry.address)) as jobs:
        err = await rpc_error(jobs.stub.SubmitOperation(submit(uid("absent"))))
        assert err.code() == grpc.StatusCode.NOT_FOUND and "not found" in err.details()
        err = await rpc_error(jobs.stub.SubmitOperation(jobs_pb2.SubmitOperationRequest(asset_id="x")))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "type" in err.details()
        for missing in (str(uuid.uuid4()), "not-an-id"):
            err = await rpc_error(jobs.stub.GetOperation(
                jobs_pb2.GetOperationRequest(operation_id=missing)))
            assert err.code() == grpc.StatusCode.NOT_FOUND
        err = await rpc_error(jobs.stub.EnsureLoaded(jobs_pb2.EnsureLoadedRequest(asset_id="x")))
        assert err.code() == grpc.StatusCode.NOT_FOUND and "'x' not found" in err.details()
        err = await rpc_error(jobs.stub.EnsureLoaded(jobs_pb2.EnsureLoadedRequest()))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "asset_id" in err.details()


async def test_a_permanent_failure_fails_once_without_retries(
    registry: RunningRegistry, events: JobEvents, db_dsn: str, nats_url: str, tmp_path: Path
) -> None:
    folder = tmp_path / "sources" / "not-a-model"
    folder.mkdir()
    (folder / "weights.safetensors").write_bytes(b"\0" * 64)
    asset_id = await add_model(registry, folder)
    async with running_jobs(jobs_settings(db_dsn, nats_url, tmp_path, registry.address)) as jobs:
        op = await jobs.stub.SubmitOperation(submit(asset_id))
        final = (await watch_until_done(jobs.stub, op.operation_id))[-1]
        await events.wait_for(op.operation_id, "job.failed")

    assert (final.status, final.attempts) == (FAILED, 1)
    assert "is not a model folder" in final.error
    assert "job.queued" not in events.types(op.operation_id)[1:]
    status = await asset_status(registry, asset_id)
    assert status.state == asset_pb2.ASSET_STATE_FAILED and "not a model folder" in status.message
    assert not (tmp_path / "store" / "sources").exists()


async def test_storage_quota_is_checked_before_and_during_an_install(
    registry: RunningRegistry, db_dsn: str, nats_url: str, tiny_llama: Path, tmp_path: Path
) -> None:
    declared = await add_model(registry, copy_model(tiny_llama, tmp_path / "sources"), disk_gb=5)
    undeclared = await add_model(registry, copy_model(tiny_llama, tmp_path / "sources"))
    settings = jobs_settings(db_dsn, nats_url, tmp_path, registry.address, max_storage_gb=1e-6)
    async with running_jobs(settings) as jobs:
        before = await jobs.stub.SubmitOperation(submit(declared))
        during = await jobs.stub.SubmitOperation(submit(undeclared))
        before_final = (await watch_until_done(jobs.stub, before.operation_id))[-1]
        during_final = (await watch_until_done(jobs.stub, during.operation_id))[-1]

    assert (before_final.status, before_final.attempts) == (FAILED, 1)
    assert "storage quota exceeded" in before_final.error
    assert "declares 5.0 GiB (resources.disk_gb)" in before_final.error
    assert (during_final.status, during_final.attempts) == (FAILED, 1)
    assert "storage quota exceeded while installing" in during_final.error
    assert "partial install was removed" in during_final.error
    store = tmp_path / "store"
    assert not [p.name for p in store.iterdir() if p.name != ".locks"]
    assert (await asset_status(registry, undeclared)).state == asset_pb2.ASSET_STATE_FAILED


async def test_list_pages_newest_first_and_filters(
    registry: RunningRegistry, db_dsn: str, nats_url: str, tiny_llama: Path, tmp_path: Path
) -> None:
    a = await add_model(registry, copy_model(tiny_llama, tmp_path / "sources"))
    b = await add_model(registry, copy_model(tiny_llama, tmp_path / "sources"))
    async with running_jobs(jobs_settings(db_dsn, nats_url, tmp_path, registry.address)) as jobs:
        submitted = []
        for asset_id, kind in [(a, INSTALL), (a, LOAD), (b, INSTALL), (b, UNLOAD), (a, PROFILE)]:
            submitted.append((await jobs.stub.SubmitOperation(submit(asset_id, kind))).operation_id)
        finals = {i: (await watch_until_done(jobs.stub, i))[-1] for i in submitted}

        async def listed(**filters: object) -> list[str]:
            ids, token = [], ""
            while True:
                page = await jobs.stub.ListOperations(jobs_pb2.ListOperationsRequest(
                    page_size=2, page_token=token, **filters))  # type: ignore[arg-type]
                assert len(page.operations) <= 2
                ids += [o.operation_id for o in page.operations]
                token = page.next_page_token
                if not token:
                    return ids

        assert await listed() == submitted[::-1]
        assert await listed(asset_id=a) == [submitted[4], submitted[1], submitted[0]]
        assert await listed(type=INSTALL) == [submitted[2], submitted[0]]
        assert await listed(status=FAILED) == [submitted[4], submitted[1]]
        assert await listed(status=SUCCEEDED, asset_id=b) == [submitted[3], submitted[2]]
        err = await rpc_error(jobs.stub.ListOperations(
            jobs_pb2.ListOperationsRequest(page_token="bogus")))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    # No worker is up: the load is retried (a worker may come), then fails with the reason.
    assert "no worker is available" in finals[submitted[1]].error
    assert finals[submitted[1]].attempts == 3  # the jobs service's default attempts
    assert "not loaded on any worker" in finals[submitted[3]].message
    assert "no worker is available" in finals[submitted[4]].error  # a profile loads first


async def test_delete_removes_the_installed_files_and_the_asset(
    registry: RunningRegistry, db_dsn: str, nats_url: str, tiny_llama: Path, tmp_path: Path
) -> None:
    asset_id = await add_model(registry, copy_model(tiny_llama, tmp_path / "sources"))
    async with running_jobs(jobs_settings(db_dsn, nats_url, tmp_path, registry.address)) as jobs:
        install = await jobs.stub.SubmitOperation(submit(asset_id))
        assert (await watch_until_done(jobs.stub, install.operation_id))[-1].status == SUCCEEDED
        installed = Path((await asset_status(registry, asset_id)).store_path)
        assert (installed / "manifest.json").is_file()
        delete = await jobs.stub.SubmitOperation(submit(asset_id, DELETE))
        final = (await watch_until_done(jobs.stub, delete.operation_id))[-1]
    assert final.status == SUCCEEDED and "its files removed" in final.message
    assert not installed.exists()
    err = await rpc_error(registry.stub.GetAsset(registry_pb2.GetAssetRequest(asset_id=asset_id)))
    assert err.code() == grpc.StatusCode.NOT_FOUND


async def test_a_dead_instances_operation_is_taken_over_and_run_once(
    registry: RunningRegistry, events: JobEvents, db_dsn: str, nats_url: str,
    tiny_llama: Path, tmp_path: Path,
) -> None:
    abandoned = await add_model(registry, copy_model(tiny_llama, tmp_path / "sources"))
    busy = await add_model(registry, copy_model(tiny_llama, tmp_path / "sources"))
    now = datetime.now(UTC)
    engine = make_engine(db_dsn)
    async with make_sessionmaker(engine)() as session, session.begin():
        expired, live = uuid.uuid4(), uuid.uuid4()
        session.add_all([
            Operation(operation_id=expired, type="install", asset_id=abandoned, status="running",
                      attempts=1, lease_owner="dead-instance", message="copy: 40%",
                      lease_expires_at=now - timedelta(minutes=1), started_at=now),
            Operation(operation_id=live, type="install", asset_id=busy, status="running",
                      attempts=1, lease_owner="live-instance",
                      lease_expires_at=now + timedelta(minutes=10), started_at=now),
        ])
    try:
        async with running_jobs(jobs_settings(db_dsn, nats_url, tmp_path, registry.address)) as jobs:
            final = (await watch_until_done(jobs.stub, str(expired)))[-1]
            await events.wait_for(str(expired), "job.succeeded")
            other = await jobs.stub.GetOperation(jobs_pb2.GetOperationRequest(operation_id=str(live)))
    finally:
        await engine.dispose()

    assert (final.status, final.attempts) == (SUCCEEDED, 2)
    kinds = events.types(str(expired))
    assert kinds.count("job.succeeded") == 1
    starts = [e.job.message for e in events.of(str(expired)) if "attempt" in e.job.message]
    assert starts == ["running (attempt 2 of 3)"]
    assert (await asset_status(registry, abandoned)).state == asset_pb2.ASSET_STATE_INSTALLED
    assert (other.status, other.attempts) == (jobs_pb2.OPERATION_STATUS_RUNNING, 1)
