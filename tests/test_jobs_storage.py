"""`Jobs.GetStorage`: the model store's disk use against its quota, per installed asset."""

from __future__ import annotations

from pathlib import Path

import pytest
from jobs_harness import add_model, copy_model, jobs_settings, running_jobs, submit, watch_until_done
from registry_harness import RunningRegistry

from roundhouse.v1 import jobs_pb2
from services.common.modelstore.files import tree_bytes

GIB = 1024**3

pytestmark = pytest.mark.usefixtures("no_leftover_operations")


async def test_storage_shows_the_installed_assets_against_the_quota(
    registry: RunningRegistry, db_dsn: str, nats_url: str, tiny_llama: Path, tmp_path: Path
) -> None:
    installed = await add_model(registry, copy_model(tiny_llama, tmp_path / "sources"))
    not_installed = await add_model(registry, copy_model(tiny_llama, tmp_path / "sources"))
    settings = jobs_settings(db_dsn, nats_url, tmp_path, registry.address, max_storage_gb=2)
    async with running_jobs(settings) as jobs:
        empty = await jobs.stub.GetStorage(jobs_pb2.GetStorageRequest())
        op = await jobs.stub.SubmitOperation(submit(installed))
        final = (await watch_until_done(jobs.stub, op.operation_id))[-1]
        assert final.status == jobs_pb2.OPERATION_STATUS_SUCCEEDED
        storage = await jobs.stub.GetStorage(jobs_pb2.GetStorageRequest())

    store = tmp_path / "store"
    assert (empty.used_bytes, list(empty.assets)) == (0, [])
    assert storage.path == str(store)
    assert storage.quota_bytes == 2 * GIB
    assert storage.used_bytes == tree_bytes(store) > 0
    by_asset = {a.asset_id: a.bytes for a in storage.assets}
    assert not_installed not in by_asset
    assert 0 < by_asset[installed] <= storage.used_bytes
    assert by_asset[installed] >= sum(f.stat().st_size for f in tiny_llama.iterdir() if f.is_file())


async def test_storage_without_a_quota_says_zero(
    registry: RunningRegistry, db_dsn: str, nats_url: str, tmp_path: Path
) -> None:
    async with running_jobs(jobs_settings(db_dsn, nats_url, tmp_path, registry.address)) as jobs:
        storage = await jobs.stub.GetStorage(jobs_pb2.GetStorageRequest())
    assert storage.quota_bytes == 0
