"""Minimum residency: a model loaded less than its `lifecycle.min_resident_s` ago is not evicted.

Placement on workers' pictures (no network): a held model within its hold is passed over for
an older one, or the load is refused with a retryable error saying how long to wait; a forced
load evicts it anyway. End to end (registry, jobs, router, one worker with room for one
model): the request that would evict a model loaded moments ago gets a 503 naming the hold,
and the model keeps serving.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import openai
import pytest
from openai import AsyncOpenAI
from stack_harness import TINY_CHAT, running_stack

from roundhouse.v1 import worker_pb2, worker_pb2_grpc
from services.common.errors import ModelNotReady
from services.common.workerpool import WorkerHandle
from services.jobs.placement import NO_HOLD, Hold, plan_placement

MIB = 1024 * 1024
NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    """A channel nothing is called on: placement only reads the pictures."""
    channel = grpc.aio.insecure_channel("127.0.0.1:9")
    yield channel
    await channel.close(None)


def held(asset_id: str, *, loaded_s_ago: float, used_s_ago: float, mb: int = 40) -> worker_pb2.LoadedModel:
    model = worker_pb2.LoadedModel(asset_id=asset_id, memory_bytes=mb * MIB)
    model.loaded_at.FromDatetime(NOW - timedelta(seconds=loaded_s_ago))
    model.last_used_at.FromDatetime(NOW - timedelta(seconds=used_s_ago))
    return model


def worker(channel: grpc.aio.Channel, *models: worker_pb2.LoadedModel, budget_mb: int = 100) -> WorkerHandle:
    info = worker_pb2.WorkerInfo(
        worker_id="w1", address="127.0.0.1:9", memory_budget_bytes=budget_mb * MIB,
        memory_used_bytes=sum(m.memory_bytes for m in models), models=models)
    return WorkerHandle("127.0.0.1:9", channel, worker_pb2_grpc.WorkerControlStub(channel),
                        None, info=info, worker_id="w1")  # type: ignore[arg-type]


def holds(**seconds: float) -> dict[str, Hold]:
    return {asset_id: Hold(s) for asset_id, s in seconds.items()}


def place(workers: list[WorkerHandle], hold: dict[str, Hold], *, force: bool = False) -> list[str]:
    placement = plan_placement(workers, "newcomer", 40 * MIB, lambda _: "on-demand", now=NOW,
                               force=force, hold_of=lambda _, asset_id: hold.get(asset_id, NO_HOLD))
    return [v.asset_id for v in placement.victims]


async def test_a_model_within_its_hold_is_passed_over_for_an_older_one(channel: grpc.aio.Channel) -> None:
    # "fresh" is the least recently used, but was loaded 5 s ago and stays 30 s.
    full = worker(channel, held("fresh", loaded_s_ago=5, used_s_ago=4),
                  held("settled", loaded_s_ago=300, used_s_ago=1))
    assert place([full], holds(fresh=30, settled=30)) == ["settled"]
    assert place([full], holds(fresh=0, settled=30)) == ["fresh"]


async def test_a_load_that_only_held_models_stand_in_the_way_of_is_refused_for_a_while(
    channel: grpc.aio.Channel,
) -> None:
    full = worker(channel, held("fresh", loaded_s_ago=5, used_s_ago=4),
                  held("newer", loaded_s_ago=2, used_s_ago=1))

    with pytest.raises(ModelNotReady) as refused:
        place([full], holds(fresh=30, newer=30))

    assert refused.value.retry_after_s == 25  # when "fresh" may go
    assert "'fresh' on w1 was loaded 5s ago and stays 30s: its lifecycle.min_resident_s" in refused.value.message
    assert place([full], holds(fresh=30, newer=30), force=True) == ["fresh"]


async def test_a_model_past_its_hold_goes_as_it_always_did(channel: grpc.aio.Channel) -> None:
    full = worker(channel, held("old", loaded_s_ago=31, used_s_ago=31), held("busy", loaded_s_ago=1,
                                                                             used_s_ago=0))
    assert place([full], holds(old=30, busy=30)) == ["old"]


def chat_asset(sources: Path, asset_id: str, min_resident_s: int) -> dict:
    """A tiny chat asset declaring 40 MB, so that one worker of 60 MB holds one."""
    return {"asset_id": asset_id, "interface": "llm-runtime",
            "source": {"kind": "path", "path": str(sources / TINY_CHAT)},
            "resources": {"memory_mb": 40},
            "lifecycle": {"desired": "on-demand", "min_resident_s": min_resident_s}}


async def chat(client: AsyncOpenAI, model: str) -> str:
    reply = await client.chat.completions.create(
        model=model, max_tokens=2, temperature=0, messages=[{"role": "user", "content": "hello"}])
    return reply.choices[0].finish_reason


async def test_a_request_that_would_evict_a_model_loaded_moments_ago_gets_a_503(
    own_db: str, nats_url: str, sources: Path, tmp_path: Path, no_assets: None,
) -> None:
    async with running_stack(own_db, nats_url, sources, tmp_path / "store", worker_memory_mb=60) as stack:
        await stack.apply(chat_asset(sources, "resident", 600), chat_asset(sources, "newcomer", 600))
        client = AsyncOpenAI(base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0)
        try:
            assert await chat(client, "resident") == "length"

            with pytest.raises(openai.APIStatusError) as refused:
                await chat(client, "newcomer")

            assert refused.value.status_code == 503
            assert refused.value.response.headers.get("retry-after")
            assert "'resident' on" in refused.value.message
            assert "lifecycle.min_resident_s" in refused.value.message
            assert await chat(client, "resident") == "length"  # still there, never evicted
        finally:
            await client.close()
