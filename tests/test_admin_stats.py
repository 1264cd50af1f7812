"""The admin statistics as an operator sees them: a stack that checks keys, requests made with
the official `openai` client (one of them failing), then `/admin/v1/stats/...` and the gRPC
`Admin` service on the router's front."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import openai
import pytest
import torch
from limits_harness import new_key
from polling import wait_until
from stack_harness import TINY_CHAT, TINY_EMBED, Stack, not_installed, running_stack, tiny_documents, tiny_spec

from roundhouse.v1 import admin_pb2, admin_pb2_grpc, registry_pb2, worker_pb2
from services.cli.stats import show_stats
from services.common.asset_proto import AssetRecord, spec_to_proto
from services.common.registry_reads import list_all_assets
from services.common.route_proto import Stored, stored_from_proto
from services.router.admission import Admission
from services.router.stats import AdminStats, FailedHere, WorkerView

DISABLED = "stats-disabled"
NOT_INSTALLED = "not-installed"


@pytest.fixture(scope="module")
async def stack(
    own_db: str, nats_url: str, sources: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    async with running_stack(own_db, nats_url, sources, tmp_path_factory.mktemp("store"),
                             auth=True) as running:
        chat, embed = tiny_documents(sources)
        await running.apply(chat, embed, {**chat, "asset_id": DISABLED, "aliases": [],
                                          "lifecycle": {"desired": "disabled"}})
        # Registered only: its source was never installed into the store.
        never = not_installed(sources).model_copy(update={"aliases": []})
        await running.registry.stub.ApplyAssets(registry_pb2.ApplyAssetsRequest(
            assets=[registry_pb2.AssetApply(spec=spec_to_proto(never))]))
        yield running


@pytest.fixture(scope="module")
async def user_key(stack: Stack) -> str:
    async with httpx.AsyncClient(base_url=f"{stack.http_url}/admin/v1", headers=stack.admin_headers) as admin:
        secret, _ = await new_key(admin, "stats-user")
    return secret


@pytest.fixture(scope="module")
async def traffic(stack: Stack, user_key: str) -> None:
    """Three chats (one streamed), one embedding and one chat refused for its length."""
    async with openai.AsyncOpenAI(base_url=f"{stack.http_url}/v1", api_key=user_key, max_retries=0,
                                  timeout=60) as client:
        for _ in range(2):
            await client.chat.completions.create(
                model=TINY_CHAT, messages=[{"role": "user", "content": "hello"}], max_tokens=4)
        stream = await client.chat.completions.create(
            model=TINY_CHAT, messages=[{"role": "user", "content": "hello"}], max_tokens=4, stream=True)
        async for _ in stream:
            pass
        await client.embeddings.create(model=TINY_EMBED, input="hello")
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(
                model=TINY_CHAT, messages=[{"role": "user", "content": "hello " * 5000}])


async def worker_id(stack: Stack) -> str:
    info = await stack.workers[0].control.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest())
    return info.worker_id


async def stats(admin: httpx.AsyncClient, **params: str) -> dict[str, Any]:
    reply = await admin.get("/stats/models", params=params)
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return {m["asset_id"]: m for m in body["models"]}


async def test_each_model_shows_its_requests_errors_and_percentiles(
    stack: Stack, admin: httpx.AsyncClient, traffic: None
) -> None:
    models = await stats(admin, window="1h")
    chat, embed = models[TINY_CHAT], models[TINY_EMBED]
    assert (chat["requests"], chat["errors"], chat["error_rate"]) == (4, 1, 0.25)
    assert (embed["requests"], embed["errors"], embed["error_rate"]) == (1, 0, 0.0)
    assert chat["completion_tokens"] > 0 and chat["tokens_per_s"] > 0
    assert 0 < chat["p50_latency_ms"] <= chat["p95_latency_ms"] <= chat["p99_latency_ms"]
    assert 0 < chat["p50_ttft_ms"] <= chat["p95_ttft_ms"] <= chat["p99_ttft_ms"]
    assert embed["p50_ttft_ms"] is None and embed["p50_latency_ms"] > 0
    holder = await worker_id(stack)
    for model in (chat, embed):
        assert (model["state"], model["workers"], model["runtime"]) == ("loaded", [holder], "transformers")
        assert model["memory_bytes"] > 0 and model["idle_s"] is not None
    assert {"chat", "completions"} <= set(chat["capabilities"]) and "embeddings" not in chat["capabilities"]
    assert "embeddings" in embed["capabilities"] and embed["interfaces"] == ["embedding-runtime"]
    assert (models[DISABLED]["state"], models[NOT_INSTALLED]["state"]) == ("disabled", "not_installed")
    assert models[DISABLED]["requests"] == 0 and models[DISABLED]["p50_latency_ms"] is None


async def test_filters_by_runtime_capability_state_and_interface(
    stack: Stack, admin: httpx.AsyncClient, traffic: None
) -> None:
    every = {TINY_CHAT, TINY_EMBED, DISABLED, NOT_INSTALLED}
    assert set(await stats(admin, runtime="transformers")) == every
    assert await stats(admin, runtime="openai") == {}
    assert set(await stats(admin, capability="embeddings")) == {TINY_EMBED}
    assert set(await stats(admin, interface="llm-runtime")) == every - {TINY_EMBED}
    assert set(await stats(admin, state="loaded")) == {TINY_CHAT, TINY_EMBED}
    queued = await admin.post(f"/models/{TINY_EMBED}/unload")
    assert queued.status_code == 202, queued.text

    async def asleep() -> bool:
        return set(await stats(admin, state="sleeping")) == {TINY_EMBED}

    await wait_until(asleep, timeout=30, interval=0.1)
    assert set(await stats(admin, state="loaded")) == {TINY_CHAT}
    assert (await stats(admin, state="sleeping"))[TINY_EMBED]["workers"] == []


async def test_summary_counts_models_and_requests(admin: httpx.AsyncClient, traffic: None) -> None:
    reply = await admin.get("/stats/summary", params={"window": "30m"})
    assert reply.status_code == 200, reply.text
    summary = reply.json()
    models = await stats(admin)
    assert summary["window_s"] == 1800 and summary["models"] == len(models) == 4
    assert summary["by_runtime"] == {"transformers": 4}
    assert summary["by_capability"]["embeddings"] == 1 and summary["by_capability"]["chat"] == 3
    states: dict[str, int] = {}
    for model in models.values():
        states[model["state"]] = states.get(model["state"], 0) + 1
    assert summary["by_state"] == states
    assert (summary["requests"]["requests"], summary["requests"]["errors"]) == (5, 1)


async def test_resources_show_worker_memory_and_the_store(
    stack: Stack, admin: httpx.AsyncClient, traffic: None
) -> None:
    reply = await admin.get("/stats/resources")
    assert reply.status_code == 200, reply.text
    resources = reply.json()
    [worker] = resources["workers"]
    assert worker["worker_id"] == await worker_id(stack) and worker["healthy"]
    assert worker["memory_budget_bytes"] == 4096 * 1024 * 1024
    held = {m["asset_id"]: m for m in worker["models"]}
    assert TINY_CHAT in held and held[TINY_CHAT]["memory_bytes"] > 0
    assert worker["memory_used_bytes"] >= sum(m["memory_bytes"] for m in held.values())
    # The GPU figures are the machine's own: present or not, as torch sees it.
    assert worker["has_gpu"] == torch.cuda.is_available()
    assert (worker["gpu_memory_total_bytes"] > 0) == worker["has_gpu"]
    assert worker["gpu_memory_used_bytes"] <= worker["gpu_memory_total_bytes"]
    store = resources["store"]
    assert store is not None and store["used_bytes"] > 0
    assert {a["asset_id"] for a in store["assets"]} >= {TINY_CHAT, TINY_EMBED}


async def test_usage_series_per_model_and_per_key(admin: httpx.AsyncClient, traffic: None) -> None:
    reply = await admin.get("/stats/usage", params={"window": "1h", "bucket": "5m", "by": "model"})
    assert reply.status_code == 200, reply.text
    series = reply.json()
    assert (series["window_s"], series["bucket_s"], series["by"]) == (3600, 300, "model")
    per_model: dict[str, int] = {}
    for point in series["points"]:
        per_model[point["group"]] = per_model.get(point["group"], 0) + point["requests"]
    assert per_model == {TINY_CHAT: 4, TINY_EMBED: 1}
    by_key = (await admin.get("/stats/usage", params={"window": "1h", "by": "key"})).json()
    assert [(p["group"].startswith("stats-user-"), p["requests"], p["errors"]) for p in by_key["points"]] == [
        (True, 5, 1)]
    widened = (await admin.get("/stats/usage", params={"window": "7d", "bucket": "30s"})).json()
    assert widened["bucket_s"] == 7 * 86_400 // 1000 + 1


@pytest.mark.parametrize("query, param", [
    ("/stats/models?window=0s", "window"), ("/stats/models?window=1y", "window"),
    ("/stats/summary?window=10000d", "window"), ("/stats/usage?bucket=5", "bucket"),
    ("/stats/models?state=asleep", "state"), ("/stats/usage?by=day", "by"),
])
async def test_bad_windows_and_filters_are_400s_naming_the_field(
    admin: httpx.AsyncClient, query: str, param: str
) -> None:
    reply = await admin.get(query)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


async def test_stats_need_an_admin_key(stack: Stack, user_key: str) -> None:
    async with httpx.AsyncClient(base_url=stack.http_url) as http:
        assert (await http.get("/admin/v1/stats/models")).status_code == 401
        user = await http.get("/admin/v1/stats/summary", headers={"Authorization": f"Bearer {user_key}"})
        assert user.status_code == 403


async def test_grpc_admin_answers_an_admin_key_only(stack: Stack, user_key: str, traffic: None) -> None:
    admin = admin_pb2_grpc.AdminStub(stack.channel)
    as_admin = (("authorization", f"Bearer {stack.admin_key}"),)
    listed = await admin.ListModelStats(admin_pb2.ListModelStatsRequest(interface="llm-runtime"),
                                        metadata=as_admin)
    assert listed.window_s == 3600
    chat = {m.asset_id: m for m in listed.models}[TINY_CHAT]
    assert (chat.state, chat.figures.requests, chat.figures.errors) == ("loaded", 4, 1)
    assert chat.figures.p50_latency_ms <= chat.figures.p95_latency_ms <= chat.figures.p99_latency_ms
    assert TINY_EMBED not in {m.asset_id for m in listed.models}
    summary = await admin.GetSummary(admin_pb2.GetSummaryRequest(window_s=600), metadata=as_admin)
    assert (summary.window_s, summary.models, summary.by_runtime["transformers"]) == (600, 4, 4)
    resources = await admin.GetResources(admin_pb2.GetResourcesRequest(), metadata=as_admin)
    assert resources.workers[0].memory_budget_bytes == 4096 * 1024 * 1024
    assert resources.HasField("store") and resources.store.used_bytes > 0
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await admin.GetSummary(admin_pb2.GetSummaryRequest(),
                               metadata=(("authorization", f"Bearer {user_key}"),))
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as anonymous:
        await admin.ListModelStats(admin_pb2.ListModelStatsRequest())
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_roundhouse_stats_prints_the_model_table(
    stack: Stack, traffic: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ROUNDHOUSE_ROUTER_URL", stack.http_url)
    monkeypatch.setenv("ROUNDHOUSE_ADMIN_KEY", str(stack.admin_key))
    assert await asyncio.to_thread(show_stats, "1h", interface="llm-runtime") == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert rows["model"][:5] == ["model", "state", "runtime", "requests", "errors"]
    assert rows[TINY_CHAT][1:6] == ["loaded", "transformers", "4", "1", "25.0"]
    assert rows[DISABLED][1:4] == ["disabled", "transformers", "0"] and rows[DISABLED][6] == "-"
    assert TINY_EMBED not in rows


async def test_a_listing_of_states_only_leaves_the_ledger_alone(
    stack: Stack, own_db: str, traffic: None
) -> None:
    """What the UI's models page asks: states without figures, so no ledger flush and no
    percentile query for each live event."""
    flushes = 0

    async def flush() -> None:
        nonlocal flushes
        flushes += 1

    async def assets() -> list[Stored]:
        return [stored_from_proto(a) for a in await list_all_assets(stack.registry.stub, timeout_s=10)]

    async def no_store() -> None:
        return None

    pool = await asyncpg.create_pool(own_db, min_size=0, max_size=2)
    try:
        found = AdminStats(assets=assets, workers=lambda: [], gates=Admission().stats, storage=no_store,
                           pool=pool, flush=flush)
        states = {m.asset_id: m for m in await found.models(figures=False)}
        assert flushes == 0 and states[TINY_CHAT].figures.requests == 0
        assert states[DISABLED].state == "disabled"
        figures = {m.asset_id: m for m in await found.models()}
        assert flushes == 1 and figures[TINY_CHAT].figures.requests == 4
    finally:
        await pool.close()


async def test_the_summary_counts_a_request_made_just_before(admin: httpx.AsyncClient, stack: Stack,
                                                              user_key: str, traffic: None) -> None:
    # Last of the module's tests on the stack: the others count the `traffic` fixture's requests.
    before = (await admin.get("/stats/summary")).json()["requests"]["requests"]
    async with openai.AsyncOpenAI(base_url=f"{stack.http_url}/v1", api_key=user_key, max_retries=0,
                                  timeout=60) as client:
        await client.chat.completions.create(
            model=TINY_CHAT, messages=[{"role": "user", "content": "hello"}], max_tokens=1)
    reply = await admin.get("/stats/summary")
    assert reply.status_code == 200, reply.text
    assert reply.json()["requests"]["requests"] == before + 1


async def test_a_failed_or_loading_model_says_so(sources: Path) -> None:
    """The states the running stack does not reach on its own: a load under way, as the registry
    reports it, and a model a worker reports failed (its reason shown)."""
    now = datetime.now(UTC)
    records = [AssetRecord(tiny_spec(sources, TINY_CHAT), 1, now, now, state="loading"),
               AssetRecord(tiny_spec(sources, TINY_EMBED), 1, now, now, state="loaded")]
    worker = WorkerView(address="w:1", worker_id="w1", healthy=True, draining=False, memory_used_bytes=0,
                        memory_budget_bytes=1, has_gpu=False,
                        failed=[FailedHere(asset_id=TINY_EMBED, reason="out of memory", stage="load")])

    async def assets() -> list[Stored]:
        return list(records)

    async def no_store() -> None:
        return None

    found = AdminStats(assets=assets, workers=lambda: [worker], gates=Admission().stats, storage=no_store)
    models = {m.asset_id: m for m in await found.models()}
    assert (models[TINY_CHAT].state, models[TINY_CHAT].failure) == ("loading", "")
    assert (models[TINY_EMBED].state, models[TINY_EMBED].failure) == ("failed", "out of memory")
    assert [m.asset_id for m in await found.models(state="failed")] == [TINY_EMBED]
