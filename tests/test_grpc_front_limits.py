"""The router's gRPC front takes requests no bigger than its HTTP API does
(`ROUNDHOUSE_MAX_BODY_BYTES`): over it, RESOURCE_EXHAUSTED where HTTP answers 413."""

from __future__ import annotations

import grpc
import httpx
import pytest
from stack_harness import TINY_CHAT, Stack, running_router

from roundhouse.v1 import inference_pb2, inference_pb2_grpc

CAP = 4096


def chat(content: str) -> inference_pb2.ChatRequest:
    return inference_pb2.ChatRequest(model=TINY_CHAT, max_tokens=2, messages=[
        inference_pb2.ChatMessage(role="user", content=content)])


async def test_a_request_over_the_body_cap_is_refused_on_both_fronts(stack: Stack) -> None:
    assert stack.router_settings is not None and stack.bus is not None
    capped = stack.router_settings.model_copy(update={"max_body_bytes": CAP})
    async with running_router(capped, stack.bus) as (router, port), \
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        front = inference_pb2_grpc.InferenceStub(channel)
        served = [c async for c in front.Chat(chat("hello"), timeout=60)]
        assert served[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH

        big = "hello " * CAP
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in front.Chat(chat(big), timeout=60):
                pass
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{router.http_port}", timeout=60) as http:
            reply = await http.post("/v1/chat/completions", json={
                "model": TINY_CHAT, "max_tokens": 2, "messages": [{"role": "user", "content": big}]})
        assert reply.status_code == 413
