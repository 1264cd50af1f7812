"""Drain on SIGTERM, with real processes: a router or a worker finishes the streams in flight,
refuses new work cleanly and exits; a jobs service finishes or hands back its operations;
`roundhouse up`'s supervisor lets its children drain, and a second Ctrl-C stops them at once.

The process under test is a real `roundhouse` process; what it talks to runs in the test.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import asyncpg
import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from jobs_harness import JobEvents, add_model, feed_until_done, jobs_settings, running_jobs, stalled_model, submit
from openai.types.chat import ChatCompletionMessageParam
from polling import wait_until
from process_harness import roundhouse_process, wait_ready
from registry_harness import RunningRegistry, running_registry
from stack_harness import TINY_CHAT, running_router, running_worker, tiny_documents

from roundhouse.v1 import (
    inference_pb2,
    inference_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    registry_pb2,
    worker_pb2,
    worker_pb2_grpc,
)
from services.common.asset_proto import spec_to_proto
from services.common.assetspec import parse_spec
from services.common.embedded import free_port, wait_pid_gone
from services.common.events import EventBus
from services.common.grpc_interceptors import ERROR_CLASS_KEY
from services.common.modelstore.store import ModelStore
from services.router.settings import RouterSettings

REPO = Path(__file__).resolve().parents[1]
STREAMS, TOKENS = 8, 200
DRAIN_TIMEOUT_S = 30
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]


@asynccontextmanager
async def backend(dsn: str, nats_url: str, sources: Path, store: ModelStore, root: Path,
                  workers: list[str]) -> AsyncIterator[tuple[RunningRegistry, str]]:
    """A registry holding the tiny models (room for every stream at once) and a jobs service
    loading them on `workers`; yields the registry and the jobs address."""
    async with AsyncExitStack() as stack:
        registry = await stack.enter_async_context(running_registry(dsn, nats_url, [sources]))
        specs = [parse_spec(d, source_roots=[sources])
                 for d in tiny_documents(sources, max_concurrency=STREAMS + 2, max_queue=STREAMS)]
        await registry.stub.ApplyAssets(registry_pb2.ApplyAssetsRequest(
            assets=[registry_pb2.AssetApply(spec=spec_to_proto(s)) for s in specs]))
        jobs = await stack.enter_async_context(running_jobs(jobs_settings(
            dsn, nats_url, root / "jobs", registry.address, model_store=store.root,
            source_roots=[sources], worker_addresses=workers, worker_refresh_s=0.5,
            worker_heartbeat_s=0.5, jobs_instance_id=f"drain-{uuid.uuid4().hex[:8]}")))
        yield registry, jobs.address


class Streams:
    """Long chat streams through the official client, each counting what it received."""

    def __init__(self, client: openai.AsyncOpenAI, count: int = STREAMS) -> None:
        self._client = client
        self._first_tokens = [asyncio.Event() for _ in range(count)]
        self._tasks = [asyncio.create_task(self._one(e)) for e in self._first_tokens]

    async def _one(self, first_token: asyncio.Event) -> tuple[str | None, int]:
        stream = await self._client.chat.completions.create(
            model=TINY_CHAT, messages=HELLO, max_tokens=TOKENS, temperature=0, stream=True,
            stream_options={"include_usage": True})
        finish, tokens = None, 0
        async for chunk in stream:
            if chunk.choices:
                first_token.set()
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return finish, tokens

    async def started(self) -> None:
        """Wait until every stream has received its first token."""
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in self._first_tokens)), 60)
        assert not any(t.done() for t in self._tasks), "a stream ended before the signal"

    async def outcomes(self) -> list[tuple[str | None, int]]:
        """Each stream's finish reason and completion tokens, once every one has ended."""
        return list(await asyncio.gather(*self._tasks))


def client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


async def exit_code(process: asyncio.subprocess.Process, log: Path) -> int:
    """The process's exit code; it must exit within the drain timeout."""
    try:
        return await asyncio.wait_for(process.wait(), DRAIN_TIMEOUT_S)
    except TimeoutError:
        raise AssertionError(f"still running after the drain timeout:\n{log.read_text()}") from None


@pytest.mark.parametrize("delay_s", [5, 0], ids=["listener-open-5s", "listener-closed-at-once"])
async def test_a_router_drains_on_sigterm(
    delay_s: int, own_db: str, nats_url: str, sources: Path, store: ModelStore, tmp_path: Path
) -> None:
    async with AsyncExitStack() as stack:
        bus = await EventBus.connect(nats_url, name="drain-worker", ensure_stream=False)
        stack.push_async_callback(bus.close)
        worker = await stack.enter_async_context(running_worker(store, bus=bus))
        registry, jobs = await stack.enter_async_context(
            backend(own_db, nats_url, sources, store, tmp_path, [worker.address]))
        http_port, grpc_address = free_port(), f"127.0.0.1:{free_port()}"
        url, log = f"http://127.0.0.1:{http_port}", tmp_path / "router.log"
        router = await stack.enter_async_context(roundhouse_process("router", {
            "ROUNDHOUSE_HOME": str(tmp_path / "home"), "ROUNDHOUSE_DATABASE_URL": own_db,
            "ROUNDHOUSE_NATS_URL": nats_url, "ROUNDHOUSE_REGISTRY_ADDRESS": registry.address,
            "ROUNDHOUSE_JOBS_ADDRESS": jobs, "ROUNDHOUSE_WORKER_ADDRESSES": json.dumps([worker.address]),
            "ROUNDHOUSE_ROUTER_ADDRESS": grpc_address, "ROUNDHOUSE_HTTP_PORT": str(http_port),
            "ROUNDHOUSE_AUTH": "disabled", "ROUNDHOUSE_WORKER_HEARTBEAT_S": "0.5",
            "ROUNDHOUSE_DRAIN_DELAY_S": str(delay_s), "ROUNDHOUSE_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S),
        }, log))
        await wait_ready(url, router, log)
        api = client(url)
        await api.chat.completions.create(model=TINY_CHAT, messages=HELLO, max_tokens=2)
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(grpc_address))
        front = inference_pb2_grpc.InferenceStub(channel)
        grpc_started = asyncio.Event()
        grpc_stream = asyncio.create_task(read_chat(front.Chat(chat_request(TOKENS), timeout=60), grpc_started))
        http_streams = Streams(api)
        await http_streams.started()
        await asyncio.wait_for(grpc_started.wait(), 60)

        router.send_signal(signal.SIGTERM)
        if delay_s:  # the listener is open for a while: every refusal is a clean answer
            await refused_while_listening(url, api, front, channel)
        else:
            await refused_or_closed(api)
            await wait_until(lambda: listener_closed(url), timeout=DRAIN_TIMEOUT_S)

        assert await http_streams.outcomes() == [("length", TOKENS)] * STREAMS
        last = await grpc_stream
        assert last.finish_reason == inference_pb2.FINISH_REASON_LENGTH
        assert last.usage.completion_tokens == TOKENS
        assert await exit_code(router, log) == 0
        with pytest.raises(openai.APIConnectionError):
            await api.models.list()


async def refused_while_listening(url: str, api: openai.AsyncOpenAI, front: inference_pb2_grpc.InferenceStub,
                                  channel: grpc.aio.Channel) -> None:
    """/readyz says 503 `draining`; a new request gets 503 `shutting_down` with a Retry-After over
    HTTP, UNAVAILABLE (`ShuttingDown`) over gRPC, whose health is NOT_SERVING."""
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        probe = await http.get("/readyz")
    assert (probe.status_code, probe.json()["status"]) == (503, "draining")
    with pytest.raises(openai.InternalServerError) as refused:
        await api.chat.completions.create(model=TINY_CHAT, messages=HELLO, max_tokens=2)
    assert refused.value.status_code == 503 and refused.value.code == "shutting_down"
    assert int(refused.value.response.headers["retry-after"]) >= 1
    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.aio.AioRpcError) as refused_call:
        async for _ in front.Chat(chat_request(2), timeout=10):
            pass
    assert refused_call.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (ERROR_CLASS_KEY, "ShuttingDown") in list(refused_call.value.trailing_metadata() or ())


async def refused_or_closed(api: openai.AsyncOpenAI) -> None:
    """A new request is refused: 503 `shutting_down` while the listener is still open, else the
    connection is."""
    with pytest.raises((openai.InternalServerError, openai.APIConnectionError)) as refused:
        await api.chat.completions.create(model=TINY_CHAT, messages=HELLO, max_tokens=2)
    if isinstance(refused.value, openai.InternalServerError):
        assert refused.value.code == "shutting_down"


async def listener_closed(url: str) -> bool:
    """Whether the router's listener is gone: a connection is refused, or one the kernel took
    just before the listener closed is dropped unanswered."""
    async with httpx.AsyncClient(timeout=5) as http:
        try:
            await http.get(f"{url}/healthz")
        except (httpx.ConnectError, httpx.RemoteProtocolError):
            return True
    return False


def chat_request(max_tokens: int) -> inference_pb2.ChatRequest:
    return inference_pb2.ChatRequest(model=TINY_CHAT, max_tokens=max_tokens, messages=[
        inference_pb2.ChatMessage(role="user", content="hello")])


async def read_chat(call: grpc.aio.UnaryStreamCall, started: asyncio.Event) -> inference_pb2.ChatChunk:
    """Read a gRPC chat stream to its end, telling `started` at its first chunk; its last chunk."""
    chunks = []
    async for chunk in call:
        started.set()
        chunks.append(chunk)
    return chunks[-1]


async def test_a_worker_drains_on_sigterm(
    own_db: str, nats_url: str, sources: Path, store: ModelStore, tmp_path: Path
) -> None:
    address, log = f"127.0.0.1:{free_port()}", tmp_path / "worker.log"
    async with AsyncExitStack() as stack:
        worker = await stack.enter_async_context(roundhouse_process("worker", {
            "ROUNDHOUSE_WORKER_ADDRESS": address, "ROUNDHOUSE_WORKER_ID": "draining-worker",
            "ROUNDHOUSE_NATS_URL": nats_url, "ROUNDHOUSE_MODEL_STORE": str(store.root),
            "ROUNDHOUSE_SOURCE_ROOTS": str(sources), "ROUNDHOUSE_HOME": str(tmp_path / "home"),
            "ROUNDHOUSE_WORKER_HEARTBEAT_S": "0.5", "ROUNDHOUSE_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S),
        }, log))
        registry, jobs = await stack.enter_async_context(
            backend(own_db, nats_url, sources, store, tmp_path, [address]))
        bus = await EventBus.connect(nats_url, name="drain-router", ensure_stream=False)
        stack.push_async_callback(bus.close)
        router, _ = await stack.enter_async_context(running_router(RouterSettings(
            router_address="127.0.0.1:0", http_port=0, registry_address=registry.address,
            jobs_address=jobs, worker_addresses=[address], worker_refresh_s=0.5,
            worker_heartbeat_s=0.5, load_timeout_s=10, database_url=own_db, auth="disabled"), bus))
        api = client(f"http://127.0.0.1:{router.http_port}")
        await wait_ready(f"http://127.0.0.1:{router.http_port}", worker, log)
        await api.chat.completions.create(model=TINY_CHAT, messages=HELLO, max_tokens=2)
        streams = Streams(api)
        await streams.started()

        worker.send_signal(signal.SIGTERM)
        async with grpc.aio.insecure_channel(address) as channel:
            control = worker_pb2_grpc.WorkerControlStub(channel)

            async def draining() -> bool:
                return (await control.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest(), timeout=5)).draining

            await wait_until(draining, timeout=10, interval=0.02)
        with pytest.raises(openai.InternalServerError) as refused:
            await api.chat.completions.create(model=TINY_CHAT, messages=HELLO, max_tokens=2)
        assert refused.value.status_code == 503
        assert int(refused.value.response.headers["retry-after"]) >= 1

        assert await streams.outcomes() == [("length", TOKENS)] * STREAMS
        assert await exit_code(worker, log) == 0


@asynccontextmanager
async def jobs_process(name: str, db_dsn: str, nats_url: str, registry_address: str, root: Path,
                       drain_timeout_s: float = DRAIN_TIMEOUT_S,
                       ) -> AsyncIterator[tuple[asyncio.subprocess.Process, jobs_pb2_grpc.JobsStub, Path]]:
    """`roundhouse jobs` as a process whose leases last a minute; yields it, a stub and its log
    once it serves."""
    address, log = f"127.0.0.1:{free_port()}", root / f"{name}.log"
    settings = {"ROUNDHOUSE_DATABASE_URL": db_dsn, "ROUNDHOUSE_NATS_URL": nats_url,
                "ROUNDHOUSE_REGISTRY_ADDRESS": registry_address, "ROUNDHOUSE_JOBS_ADDRESS": address,
                "ROUNDHOUSE_JOBS_INSTANCE_ID": name, "ROUNDHOUSE_JOBS_LEASE_S": "60",
                "ROUNDHOUSE_JOBS_WORKERS": "2", "ROUNDHOUSE_JOBS_POLL_INTERVAL_S": "0.2",
                "ROUNDHOUSE_JOBS_RECONCILE": "false", "ROUNDHOUSE_WORKER_ADDRESSES": "[]",
                "ROUNDHOUSE_HOME": str(root / "home"), "ROUNDHOUSE_MODEL_STORE": str(root / "store"),
                "ROUNDHOUSE_SOURCE_ROOTS": str(root / "sources"),
                "ROUNDHOUSE_DRAIN_TIMEOUT_S": str(drain_timeout_s)}
    async with roundhouse_process("jobs", settings, log) as process, \
            grpc.aio.insecure_channel(address) as channel:
        await asyncio.wait_for(channel.channel_ready(), 60)
        yield process, jobs_pb2_grpc.JobsStub(channel), log


@pytest.mark.usefixtures("no_leftover_operations")
async def test_jobs_finishes_what_it_can_and_hands_back_the_rest_on_sigterm(
    registry: RunningRegistry, events: JobEvents, db_dsn: str, nats_url: str, tiny_llama: Path,
    tmp_path: Path,
) -> None:
    # Two installs, each held still by a FIFO in its source until the test feeds it.
    (quick_folder, quick_fifo), (slow_folder, slow_fifo) = (stalled_model(tiny_llama, tmp_path)
                                                            for _ in range(2))
    quick_id, slow_id = await add_model(registry, quick_folder), await add_model(registry, slow_folder)
    async with jobs_process("drainer", db_dsn, nats_url, registry.address, tmp_path,
                            drain_timeout_s=8) as (drainer, stub, log):
        quick, slow = [await stub.SubmitOperation(submit(asset_id)) for asset_id in (quick_id, slow_id)]
        for operation in (quick, slow):
            await events.wait_for(operation.operation_id, "job.progress")
        drainer.send_signal(signal.SIGTERM)
        await feed_until_done(quick_fifo, stub, quick.operation_id)  # it finishes within the drain

        def stopping() -> bool:  # the drain timeout passed with the slow install still running
            return any(e.type == "job.progress" and "shutdown" in e.job.message
                       for e in events.of(slow.operation_id))

        await wait_until(stopping, timeout=30, interval=0.05)
        os.close(os.open(slow_fifo, os.O_RDWR | os.O_NONBLOCK))  # let its store thread see the stop
        assert await exit_code(drainer, log) == 0

    conn = await asyncpg.connect(db_dsn)
    try:
        handed_back = await conn.fetchrow(
            "SELECT status, lease_owner, attempts, lease_expires_at <= now() AS claimable "
            "FROM operations WHERE operation_id = $1", uuid.UUID(slow.operation_id))
    finally:
        await conn.close()
    assert dict(handed_back) == {"status": "queued", "lease_owner": None, "attempts": 0, "claimable": True}
    # Another instance takes it at once, not after the drained instance's minute-long lease.
    async with jobs_process("rescuer", db_dsn, nats_url, registry.address, tmp_path) as (_, stub, _):
        await feed_until_done(slow_fifo, stub, slow.operation_id, timeout_s=30)
        finals = [await stub.GetOperation(jobs_pb2.GetOperationRequest(operation_id=o.operation_id))
                  for o in (quick, slow)]
    assert [(f.status, f.attempts) for f in finals] == [(jobs_pb2.OPERATION_STATUS_SUCCEEDED, 1)] * 2


SUPERVISED = """
import asyncio, sys
from services.cli.supervisor import ChildSpec, Supervisor
sys.exit(asyncio.run(Supervisor([ChildSpec("child", sys.argv[1:])], grace=600).run()))
"""
DRAINING_CHILD = textwrap.dedent("""
    import os, signal, sys, time
    def drain(*_):
        print("draining")
        while not os.path.exists(sys.argv[1]):  # its work in flight, done when the file appears
            time.sleep(0.01)
        print("drained")
        sys.exit(0)
    signal.signal(signal.SIGTERM, drain)
    print("pid", os.getpid())
    signal.pause()
""")


async def supervised(done_flag: Path) -> tuple[asyncio.subprocess.Process, int]:
    """A supervisor process with one child that drains until `done_flag` exists; yields it
    with the child's pid once the child runs."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SUPERVISED, sys.executable, "-c", DRAINING_CHILD, str(done_flag),
        cwd=REPO, stdout=asyncio.subprocess.PIPE)
    pid = int((await read_until(proc, "child | pid ")).rsplit(" ", 1)[1])
    return proc, pid


async def read_until(proc: asyncio.subprocess.Process, text: str) -> str:
    """The first line of the supervisor's output that holds `text`."""
    assert proc.stdout is not None
    while text not in (line := (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()):
        assert line, f"{text!r} never printed"
    return line.strip()


async def test_ctrl_c_lets_the_children_drain(tmp_path: Path) -> None:
    proc, child = await supervised(tmp_path / "done")
    proc.send_signal(signal.SIGINT)
    stopping = await read_until(proc, "[supervisor] stopping")
    assert "Ctrl-C again stops at once" in stopping
    await read_until(proc, "child | draining")
    (tmp_path / "done").touch()
    await read_until(proc, "child | drained")
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert wait_pid_gone(child, timeout=10)


async def test_a_second_ctrl_c_stops_at_once(tmp_path: Path) -> None:
    proc, child = await supervised(tmp_path / "never")
    proc.send_signal(signal.SIGINT)
    await read_until(proc, "child | draining")
    proc.send_signal(signal.SIGINT)
    await read_until(proc, "[supervisor] stopping at once")
    assert await asyncio.wait_for(proc.wait(), 30) == 0  # far sooner than its 600 s grace
    assert wait_pid_gone(child, timeout=10)
