"""Deadlines seen by an `openai` client: the request timeout, a client's shorter
`x-request-timeout`, the idle timeout between streamed chunks, and a worker frozen by SIGSTOP.

The models are served by one worker process, so that it can be stopped and resumed. Every
request that runs past its deadline ends with 504 `timeout` (a stream already started, with an
error event), and gives back what it held: the router's slot and the worker's.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from polling import wait_until
from process_harness import worker_process
from stack_harness import TINY_CHAT, TINY_EMBED, Stack, running_router, running_stack, tiny_documents

from roundhouse.v1 import worker_pb2
from services.common.workerpool import WorkerHandle
from services.router.server import RouterParts

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
IDLE_S = 1.0
SHORT_S = 1.0


@dataclass
class Frozen:
    """A stack whose only worker is a process, and two more routers on it: one that allows
    `IDLE_S` of silence between chunks, one whose request timeout is `SHORT_S`."""

    stack: Stack
    worker: asyncio.subprocess.Process
    worker_id: str
    idle: RouterParts
    short: RouterParts

    def url(self, router: RouterParts | None = None) -> str:
        return f"http://127.0.0.1:{(router or self.stack.router).http_port}/v1"

    def handle(self) -> WorkerHandle:
        worker = self.stack.router.gateway.workers.find(worker_id=self.worker_id)
        assert worker is not None
        return worker

    async def worker_in_flight(self) -> dict[str, tuple[int, int]]:
        """Running and waiting requests per model, as the worker process reports them."""
        info = await self.handle().control.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest(), timeout=5)
        return {m.asset_id: (m.in_flight, m.waiting) for m in info.models}

    @contextmanager
    def stopped(self) -> Iterator[None]:
        """The worker process frozen (SIGSTOP) for the block, resumed (SIGCONT) after it."""
        self.worker.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.worker.send_signal(signal.SIGCONT)


@pytest.fixture(scope="module")
async def frozen(db_dsn: str, nats_url: str, sources: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Frozen]:
    root = tmp_path_factory.mktemp("deadlines")
    async with AsyncExitStack() as stack:
        process, worker_id, address = await stack.enter_async_context(
            worker_process(nats_url, root / "store", sources, root / "worker.log"))
        # Heartbeats every 0.5 s, but declared dead only after 6 s of silence: a short deadline
        # ends a request to a frozen worker long before its death cancels the request.
        main = await stack.enter_async_context(running_stack(
            db_dsn, nats_url, sources, root / "store", workers=0, extra_workers=[address],
            worker_heartbeat_s=2))
        await main.apply(*tiny_documents(sources, max_concurrency=1, max_queue=2, queue_timeout_s=5))
        assert main.router_settings is not None
        idle, _ = await stack.enter_async_context(running_router(
            main.router_settings.model_copy(update={"stream_idle_timeout_s": IDLE_S}), main.bus))
        short, _ = await stack.enter_async_context(running_router(
            main.router_settings.model_copy(update={"request_timeout_s": SHORT_S}), main.bus))
        fixture = Frozen(main, process, worker_id, idle, short)
        async with openai.AsyncOpenAI(base_url=fixture.url(), api_key="unused", max_retries=0,
                                      timeout=120) as client:  # wake both models on the process
            await client.chat.completions.create(model=TINY_CHAT, messages=HELLO, max_tokens=2)
            await client.embeddings.create(model=TINY_EMBED, input="wake")
        for router in (idle, short):
            await wait_until(holding(router), 10)
        yield fixture


def holding(router: RouterParts) -> Callable[[], bool]:
    """Whether `router` knows a worker holding both models."""
    return lambda: all(router.gateway.workers.pick(m) is not None for m in (TINY_CHAT, TINY_EMBED))


def nothing_in_flight(router: RouterParts) -> Callable[[], bool]:
    """Whether `router` has no request of either model in flight."""
    return lambda: all(router.gateway.admission.stats(m).in_flight == 0 for m in (TINY_CHAT, TINY_EMBED))


def client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)


async def assert_freed(frozen: Frozen, *routers: RouterParts) -> None:
    """Nothing left in flight at the routers nor at the worker, and a new request (one slot
    at the worker) is served."""
    for router in routers:
        await wait_until(nothing_in_flight(router), 10)

    async def worker_idle() -> bool:
        return all(n == (0, 0) for n in (await frozen.worker_in_flight()).values())

    await wait_until(worker_idle, 10, interval=0.05)
    async with client(frozen.url()) as api:
        reply = await api.chat.completions.create(model=TINY_CHAT, messages=HELLO, max_tokens=3)
    assert reply.usage is not None and reply.usage.completion_tokens == 3


async def test_an_invalid_x_request_timeout_is_refused_naming_the_header(frozen: Frozen) -> None:
    async with httpx.AsyncClient(base_url=frozen.url(), timeout=30) as http:
        for value in ("soon", "0", "-1", "1e3", "inf", ""):
            for path, body in (("/chat/completions", {"model": TINY_CHAT, "messages": HELLO}),
                               ("/embeddings", {"model": TINY_EMBED, "input": "x"})):
                reply = await http.post(path, json=body, headers={"x-request-timeout": value})
                assert reply.status_code == 400, (value, reply.text)
                error = reply.json()["error"]
                assert error["param"] == "x-request-timeout"
                assert "x-request-timeout" in error["message"]
        reply = await http.post("/embeddings", json={"model": TINY_EMBED, "input": "x"},
                                headers={"x-request-timeout": "30.5"})
    assert reply.status_code == 200


async def test_a_frozen_worker_times_requests_out_frees_their_slots_and_is_declared_down(
    frozen: Frozen,
) -> None:
    short_first = {"x-request-timeout": "1"}
    with frozen.stopped():
        async with client(frozen.url()) as api, client(frozen.url(frozen.short)) as short_api:
            outcomes = await asyncio.gather(
                api.chat.completions.create(model=TINY_CHAT, messages=HELLO, max_tokens=3, stream=True,
                                            extra_headers=short_first),
                api.embeddings.create(model=TINY_EMBED, input="x", extra_headers=short_first),
                # The router's own request timeout: a client cannot stretch it.
                short_api.chat.completions.create(model=TINY_CHAT, messages=HELLO, max_tokens=3,
                                                  extra_headers={"x-request-timeout": "100"}),
                return_exceptions=True)
        for refused in outcomes:
            assert isinstance(refused, openai.APIStatusError), refused
            assert refused.status_code == 504
            assert refused.code == "timeout" and refused.type == "timeout_error"
            assert "deadline of 1s" in refused.message
        for router in (frozen.stack.router, frozen.short):
            await wait_until(nothing_in_flight(router), 5)
        await wait_until(lambda: frozen.handle().down, 20)
    await wait_until(lambda: frozen.handle().healthy, 20)
    await assert_freed(frozen, frozen.stack.router, frozen.short)


async def test_a_stream_silent_past_the_idle_timeout_ends_with_a_timeout_event(frozen: Frozen) -> None:
    async with client(frozen.url(frozen.idle)) as api:
        stream = await api.chat.completions.create(model=TINY_CHAT, messages=HELLO, max_tokens=4000,
                                                   temperature=0, stream=True)
        received = 0
        try:
            with pytest.raises(openai.APIError) as ended:
                async for _ in stream:
                    received += 1
                    if received == 2:  # streaming: the role, then text
                        frozen.worker.send_signal(signal.SIGSTOP)
        finally:
            frozen.worker.send_signal(signal.SIGCONT)
    assert ended.value.code == "timeout"
    assert f"sent nothing for {IDLE_S:g}s" in ended.value.message
    assert not frozen.handle().down
    await assert_freed(frozen, frozen.idle)
