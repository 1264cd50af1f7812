"""Lifecycle end to end: wake on demand, LRU eviction across workers, auto-sleep, re-placement.

Real registry, jobs service (with its reconciler), router and workers with small memory
budgets, on a database of this module's own; a NATS subscriber is the witness.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from jobs_harness import watch_until_done
from openai import AsyncOpenAI
from polling import wait_until
from process_harness import worker_process
from stack_harness import TINY_CHAT, TINY_EMBED, Stack, Witness, running_stack, tiny_documents, witness

from roundhouse.v1 import asset_pb2, inference_pb2, jobs_pb2, registry_pb2
from services.common.asset_proto import spec_to_proto
from services.common.assetspec import parse_spec

BUDGET_MB, MODEL_MB = 60, 40
"""Each worker has room for one tiny model as declared below, not two."""
# Each test starts with no assets and no operations: an earlier test's model would take the room.
pytestmark = pytest.mark.usefixtures("no_assets")


def chat_model(sources: Path, asset_id: str, **lifecycle: object) -> dict:
    """A tiny chat asset that declares `MODEL_MB`."""
    return {"asset_id": asset_id, "interface": "llm-runtime",
            "source": {"kind": "path", "path": str(sources / TINY_CHAT)},
            "resources": {"memory_mb": MODEL_MB},
            "lifecycle": {"desired": "on-demand", "min_resident_s": 0, **lifecycle},
            "policy": {"max_concurrency": 4, "max_queue": 64, "queue_timeout_s": 60}}


@asynccontextmanager
async def watched_stack(
    own_db: str, nats_url: str, sources: Path, tmp_path: Path, *, workers: int,
    worker_memory_mb: int = BUDGET_MB, reconcile: bool = True, **jobs: Any,
) -> AsyncIterator[tuple[Stack, Witness]]:
    """A stack on this module's database whose jobs service reconciles, plus a witness of its
    `model.*` events; `jobs` overrides further jobs settings."""
    async with running_stack(own_db, nats_url, sources, tmp_path / "store", workers=workers,
                             worker_memory_mb=worker_memory_mb, reconcile=reconcile,
                             **jobs) as stack, witness(nats_url) as seen:
        yield stack, seen


async def chat(stack: Stack, model: str, max_tokens: int = 2) -> str:
    """One chat completion through the router's OpenAI API."""
    client = AsyncOpenAI(base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0)
    try:
        reply = await client.chat.completions.create(
            model=model, max_tokens=max_tokens, temperature=0,
            messages=[{"role": "user", "content": "hello"}])
    finally:
        await client.close()
    assert reply.choices[0].finish_reason in ("length", "stop")
    return reply.choices[0].message.content or ""


def holders(stack: Stack, asset_id: str) -> list[str]:
    return [w.worker_id for w in stack.router.gateway.workers.holders(asset_id)]


async def test_twenty_requests_to_a_sleeping_model_cause_exactly_one_load(
    own_db: str, nats_url: str, sources: Path, tmp_path: Path
) -> None:
    async with watched_stack(own_db, nats_url, sources, tmp_path, workers=2) as (stack, seen):
        await stack.apply(chat_model(sources, "sleepy"))
        assert holders(stack, "sleepy") == []

        replies = await asyncio.gather(*(chat(stack, "sleepy") for _ in range(20)))

        assert len(replies) == 20
        await wait_until(lambda: seen.of("model.loaded", "sleepy"), 10)
        assert len(seen.of("model.loading", "sleepy")) == 1
        assert len(seen.of("model.loaded", "sleepy")) == 1
        loads = await stack.jobs.stub.ListOperations(jobs_pb2.ListOperationsRequest(
            asset_id="sleepy", type=jobs_pb2.OPERATION_TYPE_LOAD))
        assert [o.status for o in loads.operations] == [jobs_pb2.OPERATION_STATUS_SUCCEEDED]


async def test_a_load_evicts_the_least_recently_used_idle_model_never_a_busy_one(
    own_db: str, nats_url: str, sources: Path, tmp_path: Path
) -> None:
    async with watched_stack(own_db, nats_url, sources, tmp_path, workers=2) as (stack, seen):
        await stack.apply(*(chat_model(sources, m) for m in ("first", "second", "third")))
        await chat(stack, "first")
        await chat(stack, "second")
        assert holders(stack, "first") and holders(stack, "second")

        await chat(stack, "third")  # both workers full: the least recently used goes

        await wait_until(lambda: seen.of("model.evicted"), 10)
        [evicted] = seen.of("model.evicted")
        assert evicted.asset_id == "first" and evicted.model.reason == "evict"
        assert evicted.model.evicted_for == "third" and evicted.model.idle_seconds > 0
        assert evicted.model.memory_bytes >= MODEL_MB * 1024 * 1024
        assert holders(stack, "first") == [] and holders(stack, "second") and holders(stack, "third")

        # "second" is now the least recently used, but busy: "third" goes instead.
        stream = stack.inference.Chat(inference_pb2.ChatRequest(
            model="second", max_tokens=4000, temperature=0,
            messages=[inference_pb2.ChatMessage(role="user", content="hello")]), timeout=120)
        await stream.read()
        await chat(stack, "first")
        stream.cancel()

        await wait_until(lambda: len(seen.of("model.evicted")) == 2, 10)
        assert [e.asset_id for e in seen.of("model.evicted")] == ["first", "third"]
        assert holders(stack, "second") and holders(stack, "first")


async def test_an_idle_model_falls_asleep_and_the_next_request_wakes_it(
    own_db: str, nats_url: str, sources: Path, tmp_path: Path
) -> None:
    async with watched_stack(own_db, nats_url, sources, tmp_path, workers=1,
                             auto_sleep_unit_s=1.0, reconcile_interval_s=0.3) as (stack, seen):
        await stack.apply(chat_model(sources, "napper", auto_sleep_min=1))  # 1 unit: 1 s here
        await chat(stack, "napper")

        await wait_until(lambda: seen.of("model.sleeping", "napper"), 15)
        [sleeping] = seen.of("model.sleeping", "napper")
        assert sleeping.model.reason == "sleep" and sleeping.model.idle_seconds >= 1.0
        await wait_until(lambda: not holders(stack, "napper"), 5)

        async def asleep_in_registry() -> bool:
            asset = await stack.registry_asset("napper")
            return asset.status.state == asset_pb2.ASSET_STATE_SLEEPING

        await wait_until(asleep_in_registry, 5)

        await chat(stack, "napper")  # answers: its finish reason is checked
        assert len(seen.of("model.loaded", "napper")) == 2


async def test_running_models_of_a_killed_worker_come_back_on_another(
    own_db: str, nats_url: str, sources: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    async with watched_stack(own_db, nats_url, sources, tmp_path, workers=1) as (stack, seen), \
            worker_process(nats_url, store, sources, tmp_path / "worker.log") as (process, doomed, _):
        await stack.apply(chat_model(sources, "steady"))
        jobs_pool = stack.jobs.app.service.pool
        await wait_until(lambda: jobs_pool.find(worker_id=doomed) is not None, 60)
        placed = await stack.jobs.stub.SubmitOperation(jobs_pb2.SubmitOperationRequest(
            type=jobs_pb2.OPERATION_TYPE_LOAD, asset_id="steady", worker_id=doomed))
        await wait_until(lambda: [e for e in seen.of("model.loaded", "steady") if e.worker_id == doomed], 60)
        assert placed.worker_id == doomed
        await stack.apply({**chat_model(sources, "steady"), "lifecycle": {"desired": "running"}})

        process.send_signal(signal.SIGKILL)

        survivor = stack.workers[0].server.host.worker_id
        await wait_until(lambda: [e for e in seen.of("model.loaded", "steady") if e.worker_id == survivor], 30)
        await wait_until(lambda: holders(stack, "steady") == [survivor], 10)
        await chat(stack, "steady")  # answers: its finish reason is checked


async def test_admin_api_queues_operations_and_reports_their_progress(
    own_db: str, nats_url: str, sources: Path, tmp_path: Path
) -> None:
    async with watched_stack(own_db, nats_url, sources, tmp_path, workers=1) as (stack, _), \
            httpx.AsyncClient(base_url=f"{stack.http_url}/admin/v1", timeout=30) as admin:
        await stack.apply(chat_model(sources, "managed"))

        queued = await admin.post("/models/managed/load")
        assert queued.status_code == 202
        operation = queued.json()
        assert operation["type"] == "load" and operation["asset_id"] == "managed"
        assert queued.headers["location"] == f"/admin/v1/operations/{operation['operation_id']}"

        async def finished() -> bool:
            polled = (await admin.get(f"/operations/{operation['operation_id']}")).json()
            return polled["status"] == "succeeded" and polled["progress"] == 100

        await wait_until(finished, 60, interval=0.1)

        async def listed_on_worker() -> bool:  # the router's picture follows within a heartbeat
            [worker] = (await admin.get("/workers")).json()["workers"]
            return worker["healthy"] and [m["asset_id"] for m in worker.get("models", [])] == ["managed"]

        await wait_until(listed_on_worker, 10, interval=0.1)

        unload = (await admin.post("/models/managed/unload", json={"force": True})).json()
        await wait_until(lambda: not holders(stack, "managed"), 30)
        listed = (await admin.get("/operations", params={"asset_id": "managed"})).json()
        assert [o["type"] for o in listed["operations"]] == ["unload", "load"]
        assert listed["operations"][0]["operation_id"] == unload["operation_id"]

        missing = await admin.post("/models/absent/load")
        assert missing.status_code == 404
        assert "absent" in missing.json()["error"]["message"]
        wrong = await admin.post("/models/managed/reboot")
        assert wrong.status_code in (400, 404) and "error" in wrong.json()
        unknown = await admin.get("/operations/not-an-id")
        assert unknown.status_code == 404 and unknown.json()["error"]["message"]


async def test_applied_assets_are_installed_and_running_ones_loaded_without_being_asked(
    own_db: str, nats_url: str, sources: Path, tmp_path: Path
) -> None:
    async with watched_stack(own_db, nats_url, sources, tmp_path, workers=1,
                             reconcile_interval_s=0.3) as (stack, seen):
        document = {**chat_model(sources, "eager"), "lifecycle": {"desired": "running"}}
        spec = parse_spec(document, source_roots=[sources])
        await stack.registry.stub.ApplyAssets(registry_pb2.ApplyAssetsRequest(
            assets=[registry_pb2.AssetApply(spec=spec_to_proto(spec))]))  # not in the store yet

        await wait_until(lambda: seen.of("model.loaded", "eager"), 60)
        installs = await stack.jobs.stub.ListOperations(jobs_pb2.ListOperationsRequest(
            asset_id="eager", type=jobs_pb2.OPERATION_TYPE_INSTALL))
        assert [o.status for o in installs.operations] == [jobs_pb2.OPERATION_STATUS_SUCCEEDED]
        assert stack.store.is_installed(spec)


async def test_a_disabled_model_is_unloaded_and_refused_with_a_clear_error(
    own_db: str, nats_url: str, sources: Path, tmp_path: Path
) -> None:
    async with watched_stack(own_db, nats_url, sources, tmp_path, workers=1,
                             reconcile_interval_s=0.3) as (stack, seen):
        await stack.apply(chat_model(sources, "retired"))
        await chat(stack, "retired")

        await stack.apply({**chat_model(sources, "retired"), "lifecycle": {"desired": "disabled"}})

        await wait_until(lambda: seen.of("model.unloaded", "retired"), 30)
        assert seen.of("model.unloaded", "retired")[0].model.reason == "disabled"
        with pytest.raises(openai.APIStatusError) as refused:
            await chat(stack, "retired")
        assert refused.value.status_code == 409 and "disabled" in refused.value.message


async def test_profile_loads_the_model_and_measures_it(
    own_db: str, nats_url: str, sources: Path, tmp_path: Path
) -> None:
    async with watched_stack(own_db, nats_url, sources, tmp_path, workers=1,
                             worker_memory_mb=BUDGET_MB * 2, reconcile=False) as (stack, _):
        await stack.apply(chat_model(sources, "measured"), tiny_documents(sources)[1])
        finals = {}
        for asset_id in ("measured", TINY_EMBED):
            submitted = await stack.jobs.stub.SubmitOperation(jobs_pb2.SubmitOperationRequest(
                type=jobs_pb2.OPERATION_TYPE_PROFILE, asset_id=asset_id))
            finals[asset_id] = (await watch_until_done(stack.jobs.stub, submitted.operation_id))[-1]

    assert {o.status for o in finals.values()} == {jobs_pb2.OPERATION_STATUS_SUCCEEDED}
    chat_profile, embed_profile = finals["measured"].message, finals[TINY_EMBED].message
    assert "loaded on" in chat_profile and "tokens/s" in chat_profile and "first token" in chat_profile
    assert "sentences/s in one batch of 32" in embed_profile
