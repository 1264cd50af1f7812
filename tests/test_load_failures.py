"""A model that cannot load: one clear error per request, one load attempt per cooldown.

Real registry, jobs service, worker and router (tiny models), on a database of this module's
own. The official `openai` client is used with its default retries: a failed model must not
be something it retries into a load storm.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import openai
import pytest
from openai import AsyncOpenAI
from polling import wait_until
from stack_harness import TINY_CHAT, TINY_EMBED, Stack, running_stack

from roundhouse.v1 import asset_pb2, inference_pb2, jobs_pb2, registry_pb2
from services.common.asset_proto import spec_to_proto
from services.common.assetspec import parse_spec

WORKER_MB = 60


def chat_asset(sources: Path, asset_id: str, memory_mb: int) -> dict:
    return {"asset_id": asset_id, "interface": "llm-runtime",
            "source": {"kind": "path", "path": str(sources / TINY_CHAT)},
            "resources": {"memory_mb": memory_mb}, "lifecycle": {"desired": "on-demand"}}


async def apply_only(stack: Stack, document: dict) -> None:
    """Apply through the registry without installing anything."""
    spec = parse_spec(document, source_roots=[stack.sources])
    await stack.registry.stub.ApplyAssets(registry_pb2.ApplyAssetsRequest(
        assets=[registry_pb2.AssetApply(spec=spec_to_proto(spec))]))


async def load_operations(stack: Stack, asset_id: str) -> list[jobs_pb2.Operation]:
    reply = await stack.jobs.stub.ListOperations(jobs_pb2.ListOperationsRequest(
        asset_id=asset_id, type=jobs_pb2.OPERATION_TYPE_LOAD))
    return list(reply.operations)


def client(stack: Stack) -> AsyncOpenAI:
    """The official client as an app would use it: default retries included."""
    return AsyncOpenAI(base_url=f"{stack.http_url}/v1", api_key="unused")


async def chat(stack: Stack, model: str) -> str:
    async with client(stack) as api:
        reply = await api.chat.completions.create(
            model=model, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    return reply.choices[0].message.content or ""


async def test_a_model_too_big_for_every_worker_fails_once_per_cooldown(
    own_db: str, nats_url: str, sources: Path, tmp_path: Path
) -> None:
    async with running_stack(own_db, nats_url, sources, tmp_path / "store",
                             worker_memory_mb=WORKER_MB, load_failure_cooldown_s=600) as stack:
        await stack.apply(chat_asset(sources, "too-big", memory_mb=10 * WORKER_MB))

        errors = []
        for _ in range(5):
            with pytest.raises(openai.APIStatusError) as caught:
                await chat(stack, "too-big")
            errors.append(caught.value)

        assert {e.status_code for e in errors} == {424}
        body = errors[-1].body
        assert isinstance(body, dict)
        assert body["code"] == "model_failed" and body["param"] == "model"
        assert "too-big" in body["message"] and "MiB" in body["message"]  # the reason: no room
        assert [o.status for o in await load_operations(stack, "too-big")] == [
            jobs_pb2.OPERATION_STATUS_FAILED]
        asset = await stack.registry_asset("too-big")
        assert asset.status.state == asset_pb2.ASSET_STATE_FAILED

        # Over gRPC the same refusal is FAILED_PRECONDITION, still without another load.
        with pytest.raises(grpc.aio.AioRpcError) as rpc:
            async for _ in stack.inference.Chat(inference_pb2.ChatRequest(
                    model="too-big", max_tokens=2,
                    messages=[inference_pb2.ChatMessage(role="user", content="hi")])):
                pass
        assert rpc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert len(await load_operations(stack, "too-big")) == 1

        # A new revision that fits is tried at once, cooldown or not.
        await stack.apply(chat_asset(sources, "too-big", memory_mb=WORKER_MB // 2))
        assert await chat(stack, "too-big") is not None
        statuses = [o.status for o in await load_operations(stack, "too-big")]
        assert sorted(statuses) == sorted([jobs_pb2.OPERATION_STATUS_FAILED,
                                           jobs_pb2.OPERATION_STATUS_SUCCEEDED])


async def test_a_model_not_installed_is_refused_until_installed(
    own_db: str, nats_url: str, sources: Path, tmp_path: Path
) -> None:
    async with running_stack(own_db, nats_url, sources, tmp_path / "store",
                             load_failure_cooldown_s=600) as stack:
        await apply_only(stack, {"asset_id": "uninstalled", "interface": "embedding-runtime",
                                 "source": {"kind": "path", "path": str(sources / TINY_EMBED)}})

        async with client(stack) as api:
            for _ in range(3):
                with pytest.raises(openai.APIStatusError) as caught:
                    await api.embeddings.create(model="uninstalled", input="hello")
                assert caught.value.status_code == 424
                assert "not installed" in caught.value.message
            assert len(await load_operations(stack, "uninstalled")) == 1

            install = await stack.jobs.stub.SubmitOperation(jobs_pb2.SubmitOperationRequest(
                type=jobs_pb2.OPERATION_TYPE_INSTALL, asset_id="uninstalled"))

            async def installed() -> bool:
                op = await stack.jobs.stub.GetOperation(
                    jobs_pb2.GetOperationRequest(operation_id=install.operation_id))
                return op.status == jobs_pb2.OPERATION_STATUS_SUCCEEDED

            await wait_until(installed, 60, interval=0.1)
            reply = await api.embeddings.create(model="uninstalled", input="hello")
        assert len(reply.data[0].embedding) > 0
        assert len(await load_operations(stack, "uninstalled")) == 2


async def test_after_the_cooldown_the_next_request_tries_one_load_again(
    own_db: str, nats_url: str, sources: Path, tmp_path: Path
) -> None:
    cooldown_s = 2.0
    async with running_stack(own_db, nats_url, sources, tmp_path / "store",
                             worker_memory_mb=WORKER_MB, load_failure_cooldown_s=cooldown_s) as stack:
        await stack.apply(chat_asset(sources, "never-fits", memory_mb=10 * WORKER_MB))
        refused = 0

        async def second_load_tried() -> bool:
            nonlocal refused
            with pytest.raises(openai.APIStatusError) as caught:
                await chat(stack, "never-fits")
            assert caught.value.status_code == 424
            refused += 1
            return len(await load_operations(stack, "never-fits")) >= 2

        await wait_until(second_load_tried, 30, interval=0.2)
        # Many refusals within the cooldown, but only the first and the one after it loaded.
        assert refused > 2
        assert len(await load_operations(stack, "never-fits")) == 2
