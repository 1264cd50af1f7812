"""Assets that share one source share one install: installed once, served by each, removed last.

The store keys model folders by source, so a second asset with the same source is installed
the moment the first is: the reconciler loads it without fetching anything, and deleting one
of them keeps the files the other still uses.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from jobs_harness import (
    add_model,
    asset_status,
    copy_model,
    jobs_settings,
    running_jobs,
    submit,
    watch_until_done,
)
from openai import AsyncOpenAI
from polling import wait_until
from registry_harness import RunningRegistry
from stack_harness import Stack, running_stack

from roundhouse.v1 import asset_pb2, jobs_pb2, registry_pb2
from services.common.asset_proto import spec_to_proto
from services.common.assetspec import AssetSpec, parse_spec

CATALOG = Path(__file__).resolve().parents[1] / "deploy" / "catalog"
MINILM, COPY = "all-minilm-l6-v2", "minilm-copy"
SENTENCES = ["A man is playing a guitar.", "Someone is strumming a guitar.", "The stock market fell."]
SUCCEEDED = jobs_pb2.OPERATION_STATUS_SUCCEEDED


def source_folders(store_root: Path) -> list[str]:
    """The model folders the store holds, one per installed source."""
    folder = store_root / "sources"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.mark.usefixtures("no_leftover_operations")
async def test_deleting_an_asset_keeps_the_files_another_asset_uses(
    registry: RunningRegistry, db_dsn: str, nats_url: str, tiny_llama: Path, tmp_path: Path
) -> None:
    folder = copy_model(tiny_llama, tmp_path / "sources")
    first, second = await add_model(registry, folder), await add_model(registry, folder)
    async with running_jobs(jobs_settings(db_dsn, nats_url, tmp_path, registry.address)) as jobs:
        for asset_id in (first, second):
            install = await jobs.stub.SubmitOperation(submit(asset_id))
            assert (await watch_until_done(jobs.stub, install.operation_id))[-1].status == SUCCEEDED
        installed = Path((await asset_status(registry, first)).store_path)
        assert (await asset_status(registry, second)).store_path == str(installed)
        assert source_folders(tmp_path / "store") == [installed.name]

        delete = await jobs.stub.SubmitOperation(submit(first, jobs_pb2.OPERATION_TYPE_DELETE))
        kept = (await watch_until_done(jobs.stub, delete.operation_id))[-1]
        assert kept.status == SUCCEEDED
        assert f"its files kept, still used by {second}" in kept.message
        assert (installed / "manifest.json").is_file()

        delete = await jobs.stub.SubmitOperation(submit(second, jobs_pb2.OPERATION_TYPE_DELETE))
        removed = (await watch_until_done(jobs.stub, delete.operation_id))[-1]
        assert removed.status == SUCCEEDED and "its files removed" in removed.message
        assert not installed.exists()


def minilm_documents() -> tuple[dict, dict]:
    """The catalog's MiniLM asset, and a copy of it under another id with the same source."""
    original = yaml.safe_load((CATALOG / f"{MINILM}.yaml").read_text())
    copy = {**original, "asset_id": COPY, "display_name": "MiniLM again", "aliases": [],
            "lifecycle": {"desired": "running"}}
    return original, copy


async def apply(stack: Stack, document: dict) -> AssetSpec:
    """Apply one asset through the registry only: the reconciler does the rest."""
    spec = parse_spec(document)
    await stack.registry.stub.ApplyAssets(registry_pb2.ApplyAssetsRequest(
        assets=[registry_pb2.AssetApply(spec=spec_to_proto(spec))]))
    return spec


async def operations(stack: Stack, asset_id: str, kind: int) -> list[jobs_pb2.Operation]:
    """The operations of one type the jobs service ran or queued for an asset."""
    listed = await stack.jobs.stub.ListOperations(
        jobs_pb2.ListOperationsRequest(asset_id=asset_id, type=kind))  # type: ignore[arg-type]
    return list(listed.operations)


def loaded(stack: Stack, asset_id: str) -> Callable[[], Awaitable[bool]]:
    """A condition to poll: the registry reports the asset loaded on a worker (failed: fail now)."""
    async def check() -> bool:
        status = (await stack.registry_asset(asset_id)).status
        assert status.state != asset_pb2.ASSET_STATE_FAILED, status.message
        return status.state == asset_pb2.ASSET_STATE_LOADED
    return check


async def embed(client: AsyncOpenAI, model: str) -> np.ndarray:
    """The embeddings of `SENTENCES` from `model`, through the router's OpenAI API."""
    reply = await client.embeddings.create(model=model, input=SENTENCES, encoding_format="float")
    assert reply.model == model
    return np.asarray([item.embedding for item in reply.data])


@pytest.mark.catalog
async def test_a_second_asset_with_the_same_source_is_loaded_and_served_from_the_same_files(
    own_db: str, nats_url: str, tmp_path: Path
) -> None:
    (tmp_path / "sources").mkdir()
    store_root = tmp_path / "store"
    original_document, copy_document = minilm_documents()
    async with running_stack(own_db, nats_url, tmp_path / "sources", store_root, reconcile=True,
                             reconcile_interval_s=0.3) as stack:
        original = await apply(stack, original_document)
        await wait_until(loaded(stack, MINILM), 300, interval=0.2)
        installed = stack.store.installed(original)
        assert installed is not None and installed.path is not None
        assert source_folders(store_root) == [installed.path.name]

        copy = await apply(stack, copy_document)
        await wait_until(loaded(stack, COPY), 180, interval=0.2)

        assert await operations(stack, COPY, jobs_pb2.OPERATION_TYPE_INSTALL) == []
        assert [o.status for o in await operations(stack, COPY, jobs_pb2.OPERATION_TYPE_LOAD)] == [SUCCEEDED]
        shared = stack.store.installed(copy)
        assert shared is not None and shared.path == installed.path
        assert source_folders(store_root) == [installed.path.name]

        client = AsyncOpenAI(base_url=f"{stack.http_url}/v1", api_key="x", max_retries=0)
        try:
            expected = await embed(client, MINILM)
            served = await embed(client, COPY)
        finally:
            await client.close()
        assert served.shape == (len(SENTENCES), 384)
        np.testing.assert_allclose(served, expected, rtol=0, atol=1e-6)
