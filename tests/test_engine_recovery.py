"""A chat engine that dies while serving, end to end: the app's stream ends with a clean error,
nothing is answered by the dead engine, and the reconciler loads the model again by itself.

Real registry, jobs service with its reconciler, worker and router (tiny models), on a
database of this module's own; the official `openai` client is the app.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
from openai import AsyncOpenAI
from polling import wait_until
from stack_harness import TINY_CHAT, running_stack, witness

from roundhouse.v1 import jobs_pb2

CRASH = "crash injected by test_engine_recovery"


async def test_a_crashed_engine_ends_its_streams_cleanly_and_is_reloaded_by_the_reconciler(
    own_db: str, nats_url: str, sources: Path, tmp_path: Path
) -> None:
    async with running_stack(own_db, nats_url, sources, tmp_path / "store", reconcile=True,
                             reconcile_interval_s=0.5) as stack, witness(nats_url) as seen:
        await stack.apply({"asset_id": "fragile", "interface": "llm-runtime",
                           "source": {"kind": "path", "path": str(sources / TINY_CHAT)},
                           "lifecycle": {"desired": "running"}})
        await wait_until(lambda: seen.of("model.loaded", "fragile"), 60, interval=0.05)
        worker = stack.workers[0].server

        async with AsyncOpenAI(base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0) as api:
            stream = await api.chat.completions.create(
                model="fragile", max_tokens=3000, stream=True,
                messages=[{"role": "user", "content": "hello w1 w2"}])
            chunks = aiter(stream)
            while not (await anext(chunks)).choices[0].delta.content:
                pass  # generation is under way
            async with worker.host.use("fragile") as lease:
                lease.model.crash_engine(CRASH)  # type: ignore[attr-defined]
            with pytest.raises(openai.APIError) as cut:
                async for _ in chunks:
                    pass
            assert "failed on this worker" in cut.value.message and CRASH in cut.value.message

            await wait_until(lambda: seen.of("model.degraded", "fragile"), 30, interval=0.05)
            # The reconciler loads it again, with no request asking for it.
            await wait_until(lambda: len(seen.of("model.loaded", "fragile")) == 2, 60, interval=0.05)

            async def load_statuses() -> list[int]:
                loads = await stack.jobs.stub.ListOperations(jobs_pb2.ListOperationsRequest(
                    asset_id="fragile", type=jobs_pb2.OPERATION_TYPE_LOAD))
                return [o.status for o in loads.operations]

            done = [jobs_pb2.OPERATION_STATUS_SUCCEEDED] * 2

            async def reloaded() -> bool:
                return await load_statuses() == done

            await wait_until(reloaded, 30, interval=0.05)

            await wait_until(lambda: stack.router.gateway.workers.holders("fragile"), 30, interval=0.05)
            reply = await api.chat.completions.create(
                model="fragile", max_tokens=3, temperature=0,
                messages=[{"role": "user", "content": "hello"}])
        assert reply.choices[0].finish_reason in ("length", "stop")
        assert reply.model == "fragile"
        assert [e.model.reason for e in seen.of("model.degraded", "fragile")] != []
        assert all(CRASH in e.model.reason for e in seen.of("model.degraded", "fragile"))


async def test_a_crashed_engine_shows_in_readiness_and_the_worker_list_until_reloaded(
    own_db: str, nats_url: str, sources: Path, tmp_path: Path
) -> None:
    # No reconciler here: the failure stays in view for as long as the test looks.
    async with running_stack(own_db, nats_url, sources, tmp_path / "store") as stack, \
            witness(nats_url) as seen, httpx.AsyncClient(base_url=stack.http_url) as http:
        await stack.apply({"asset_id": "fragile-seen", "interface": "llm-runtime",
                           "source": {"kind": "path", "path": str(sources / TINY_CHAT)}})
        assert (await http.post("/admin/v1/models/fragile-seen/load")).status_code == 202
        await wait_until(lambda: seen.of("model.loaded", "fragile-seen"), 60, interval=0.05)
        assert (await http.get("/readyz")).json() == {"status": "ready", "failed_models": []}
        await wait_until(lambda: stack.router.gateway.workers.holders("fragile-seen"), 30, interval=0.05)

        async with stack.workers[0].server.host.use("fragile-seen") as lease:
            lease.model.crash_engine(CRASH)  # type: ignore[attr-defined]

        async def degraded() -> bool:
            return (await http.get("/readyz")).json()["status"] == "degraded"

        await wait_until(degraded, 30, interval=0.05)
        ready = (await http.get("/readyz"))
        assert ready.status_code == 200  # the other models still serve
        assert [(f["asset_id"], f["stage"]) for f in ready.json()["failed_models"]] == [
            ("fragile-seen", "engine")]
        workers = (await http.get("/admin/v1/workers")).json()["workers"]
        [failed] = [f for w in workers for f in w.get("failed_models", [])]
        assert failed["asset_id"] == "fragile-seen" and CRASH in failed["reason"]

