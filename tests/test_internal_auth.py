"""The internal token and TLS: internal services refuse callers without the token, every
Roundhouse client sends it, and gRPC runs over TLS when certificates are configured."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from jobs_harness import jobs_settings, running_jobs
from registry_harness import running_registry
from stack_harness import TINY_CHAT, running_stack, running_worker, tiny_documents
from tls_files import TlsFiles, make_tls_files

from roundhouse.v1 import (
    inference_pb2,
    jobs_pb2,
    jobs_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from services.common.grpc_client import open_channel
from services.common.grpc_interceptors import INTERNAL_TOKEN_KEY
from services.common.modelstore.store import ModelStore
from services.common.secrets import MASK, SecretFilter
from services.common.settings import CommonSettings

TOKEN = "internal-token-for-tests-0123456789"
# The stack tests use a database of their own: the loads they cause are no other module's business.


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


async def refusal(call: object) -> grpc.StatusCode:
    """The status a call fails with (the test fails if it succeeds)."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value.code()


async def assert_guarded(address: str, call: object) -> None:
    """`call(channel, metadata)` is refused without the token and with a wrong one, works with
    the right one (sent by `open_channel`), and health answers anyone."""
    async with grpc.aio.insecure_channel(address) as bare:
        assert await refusal(call(bare, ())) == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[operator]
        wrong = ((INTERNAL_TOKEN_KEY, TOKEN[:-1] + "x"),)
        assert await refusal(call(bare, wrong)) == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[operator]
        health = await health_pb2_grpc.HealthStub(bare).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    async with open_channel(address, CommonSettings(internal_token=TOKEN)) as trusted:
        await call(trusted, ())  # type: ignore[operator]


def list_assets(channel: grpc.aio.Channel, metadata: tuple) -> object:
    return registry_pb2_grpc.RegistryStub(channel).ListAssets(
        registry_pb2.ListAssetsRequest(), metadata=metadata, timeout=10)


async def test_registry_requires_the_token(db_dsn: str, nats_url: str, tmp_path: Path) -> None:
    async with running_registry(db_dsn, nats_url, [tmp_path],
                                settings=CommonSettings(internal_token=TOKEN)) as registry:
        await assert_guarded(registry.address, list_assets)


async def test_jobs_requires_the_token_and_sends_it_to_the_registry(
        db_dsn: str, nats_url: str, tmp_path: Path) -> None:
    async with running_registry(db_dsn, nats_url, [tmp_path],
                                settings=CommonSettings(internal_token=TOKEN)) as registry, \
            running_jobs(jobs_settings(db_dsn, nats_url, tmp_path, registry.address,
                                       internal_token=TOKEN)) as jobs:
        def list_operations(channel: grpc.aio.Channel, metadata: tuple) -> object:
            return jobs_pb2_grpc.JobsStub(channel).ListOperations(
                jobs_pb2.ListOperationsRequest(), metadata=metadata, timeout=10)

        await assert_guarded(jobs.address, list_operations)
        # A delete asks the registry for the asset first: NotFound, not Unauthenticated.
        missing = jobs.stub.SubmitOperation(jobs_pb2.SubmitOperationRequest(
            type=jobs_pb2.OPERATION_TYPE_DELETE, asset_id="no-such-asset"), timeout=10)
        assert await refusal(missing) == grpc.StatusCode.NOT_FOUND


async def test_worker_requires_the_token(tmp_path: Path) -> None:
    async with running_worker(ModelStore(tmp_path / "store", [tmp_path]), internal_token=TOKEN) as worker:
        def worker_info(channel: grpc.aio.Channel, metadata: tuple) -> object:
            return worker_pb2_grpc.WorkerControlStub(channel).GetWorkerInfo(
                worker_pb2.GetWorkerInfoRequest(), metadata=metadata, timeout=10)

        await assert_guarded(worker.address, worker_info)


def chat() -> inference_pb2.ChatRequest:
    return inference_pb2.ChatRequest(model=TINY_CHAT, max_tokens=4, temperature=0,
                                      messages=[inference_pb2.ChatMessage(role="user", content="hello")])


async def test_stack_with_a_token_serves_a_chat_end_to_end(
        own_db: str, nats_url: str, sources: Path, tmp_path: Path) -> None:
    async with running_stack(own_db, nats_url, sources, tmp_path / "store",
                             internal_token=TOKEN) as stack:
        await stack.apply(*tiny_documents(sources))
        # The front takes no internal token; the router, jobs and workers pass it among themselves.
        chunks = [c async for c in stack.inference.Chat(chat(), timeout=120)]
        assert chunks[-1].usage.completion_tokens == 4
        async with grpc.aio.insecure_channel(stack.workers[0].address) as bare:
            refused = worker_pb2_grpc.WorkerControlStub(bare).GetWorkerInfo(worker_pb2.GetWorkerInfoRequest())
            assert await refusal(refused) == grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture
async def tls_registry(db_dsn: str, nats_url: str, tmp_path: Path, tls: TlsFiles) -> AsyncIterator[str]:
    async with running_registry(db_dsn, nats_url, [tmp_path], settings=CommonSettings(**tls.server())) as registry:
        yield registry.address


async def test_registry_over_tls_needs_the_ca(tls_registry: str, tls: TlsFiles, tmp_path: Path) -> None:
    async with open_channel(tls_registry, CommonSettings(home=tmp_path, **tls.client())) as trusted:
        await list_assets(trusted, ())  # type: ignore[misc]
    untrusting = grpc.aio.secure_channel(tls_registry, grpc.ssl_channel_credentials())
    async with untrusting, grpc.aio.insecure_channel(tls_registry) as plaintext:
        assert await refusal(list_assets(untrusting, ())) == grpc.StatusCode.UNAVAILABLE
        assert await refusal(list_assets(plaintext, ())) == grpc.StatusCode.UNAVAILABLE


async def test_router_front_over_tls_with_an_api_key(
        own_db: str, nats_url: str, sources: Path, tmp_path: Path, tls: TlsFiles) -> None:
    async with running_stack(own_db, nats_url, sources, tmp_path / "store", auth=True,
                             internal_token=TOKEN, tls=tls) as stack:
        await stack.apply(*tiny_documents(sources))
        metadata = (("authorization", f"Bearer {stack.admin_key}"),)
        chunks = [c async for c in stack.inference.Chat(chat(), metadata=metadata, timeout=120)]
        assert chunks[-1].usage.completion_tokens == 4
        assert await refusal(stack.inference.Chat(chat(), timeout=30).read()) \
            == grpc.StatusCode.UNAUTHENTICATED


def test_the_token_is_scrubbed_from_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUNDHOUSE_INTERNAL_TOKEN", TOKEN)
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "sent %s", (TOKEN,), None)
    SecretFilter().filter(record)
    assert record.getMessage() == f"sent {MASK}"
    assert TOKEN not in repr(CommonSettings(internal_token=TOKEN))
