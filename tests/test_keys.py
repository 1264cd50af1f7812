"""API keys end to end: a stack that checks keys, the official `openai` client, real Postgres
and NATS. What a caller notices: 401 without a valid key, 403 outside the key's scope, admin
routes for admin keys only, and a revoked key refused at once by every router."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from polling import wait_until
from stack_harness import TINY_CHAT, TINY_EMBED, Stack, running_router, running_stack, tiny_documents

from roundhouse.v1 import inference_pb2, inference_pb2_grpc, worker_pb2
from services.common.db import make_engine, make_sessionmaker
from services.common.db.unavailable import database_unavailable
from services.common.embedded import free_port
from services.common.errors import InvalidArgument, Unauthenticated
from services.common.events import EventBus
from services.common.keys import ADMIN_KEY_NAME, KeyRecord, KeyStore, NewKey, hash_secret, new_secret
from services.common.keys.validation import check_new_key
from services.router.http import create_app
from services.router.keys import KeyAuthenticator

HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
async def stack(
    db_dsn: str, nats_url: str, sources: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    async with running_stack(db_dsn, nats_url, sources, tmp_path_factory.mktemp("store"),
                             auth=True) as running:
        await running.apply(*tiny_documents(sources))
        yield running


_names = iter(range(10_000))


async def new_key(admin: httpx.AsyncClient, **fields: Any) -> str:
    """A fresh key of a fresh name; its secret."""
    reply = await admin.post("/keys", json={"name": f"test-key-{next(_names)}", **fields})
    assert reply.status_code == 201, reply.text
    secret: str = reply.json()["key"]
    return secret


def client(stack: Stack, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stack.http_url}/v1", api_key=key, max_retries=0, timeout=60)


async def holds(stack: Stack, asset_id: str) -> bool:
    info = await stack.workers[0].control.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest())
    return any(m.asset_id == asset_id for m in info.models)


async def test_a_model_outside_the_key_never_reaches_a_worker_nor_wakes_it(
    stack: Stack, admin: httpx.AsyncClient
) -> None:
    assert not await holds(stack, TINY_CHAT)
    # The session database may hold other modules' operations on the same asset id.
    before = (await admin.get("/operations", params={"asset_id": TINY_CHAT})).json()["operations"]
    key = await new_key(admin, models=[TINY_EMBED])
    async with client(stack, key) as api:
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await api.chat.completions.create(model=TINY_CHAT, messages=HELLO, max_tokens=2)
        assert refused.value.code == "model_not_allowed"
        with pytest.raises(openai.PermissionDeniedError):
            await api.chat.completions.create(model="tiny-alias", messages=HELLO, max_tokens=2)
        reply = await api.embeddings.create(model=TINY_EMBED, input="hi")
        assert len(reply.data[0].embedding) > 0
    assert not await holds(stack, TINY_CHAT)
    operations = (await admin.get("/operations", params={"asset_id": TINY_CHAT})).json()["operations"]
    assert [o["operation_id"] for o in operations] == [o["operation_id"] for o in before]  # no new load


async def test_a_key_for_an_alias_may_use_its_model_and_lists_only_it(
    stack: Stack, admin: httpx.AsyncClient
) -> None:
    key = await new_key(admin, models=["tiny-alias"])
    async with client(stack, key) as api:
        reply = await api.chat.completions.create(model=TINY_CHAT, messages=HELLO, max_tokens=2)
        assert reply.model == TINY_CHAT
        assert [m.id for m in (await api.models.list()).data] == [TINY_CHAT]
        assert (await api.models.retrieve("tiny-alias")).id == TINY_CHAT
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await api.embeddings.create(model=TINY_EMBED, input="hi")
        assert refused.value.code == "model_not_allowed"
        with pytest.raises(openai.PermissionDeniedError):
            await api.models.retrieve(TINY_EMBED)
    every = await new_key(admin)
    async with client(stack, every) as api:
        assert {m.id for m in (await api.models.list()).data} >= {TINY_CHAT, TINY_EMBED}


async def test_unknown_revoked_and_expired_keys_are_401(stack: Stack, admin: httpx.AsyncClient) -> None:
    async with client(stack, "rh-not-a-key-we-made") as api:
        with pytest.raises(openai.AuthenticationError) as refused:
            await api.models.list()
        assert refused.value.code == "invalid_api_key"
    reply = await admin.post("/keys", json={"name": "soon-revoked"})
    secret = reply.json()["key"]
    async with client(stack, secret) as api:
        await api.models.list()
        assert (await admin.delete("/keys/soon-revoked")).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            await api.models.list()
    expiring = await new_key(admin, expires_in="1s")
    async with client(stack, expiring) as api:

        async def refused() -> bool:
            try:
                await api.models.list()
            except openai.AuthenticationError:
                return True
            return False

        await wait_until(refused, timeout=10, interval=0.2)


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": ""},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer rh-two words"},
    {"Authorization": "Basic dXNlcjpwYXNz"},
    {"Authorization": "Bearer rh-" + "a" * 10_240},
    {"Authorization": "Bearer rh-' OR 1=1 --"},
    {"Authorization": "Bearer rh-ключ".encode()},
])
async def test_missing_or_malformed_keys_are_401(
    http: httpx.AsyncClient, headers: dict[str, Any]
) -> None:
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                         ("GET", "/admin/v1/workers"), ("GET", "/v1/no-such-route")):
        reply = await http.request(method, path, headers=headers, json={"model": TINY_CHAT, "messages": HELLO})
        assert reply.status_code == 401, reply.text
        assert reply.json()["error"]["code"] == "invalid_api_key"
        assert reply.headers["x-request-id"]


async def test_a_key_header_with_a_control_byte_is_refused_before_the_app(http: httpx.AsyncClient) -> None:
    """RFC 9110 forbids DEL in a header value: the HTTP parser refuses the request (400) before
    any route or key check runs, so such a header can never authenticate anything."""
    reply = await http.get("/v1/models", headers={"x-api-key": "rh-\x7f"})
    assert reply.status_code == 400


async def test_x_api_key_works_like_bearer(stack: Stack, admin: httpx.AsyncClient, http: httpx.AsyncClient) -> None:
    key = await new_key(admin)
    reply = await http.get("/v1/models", headers={"x-api-key": key})
    assert reply.status_code == 200


async def test_admin_routes_and_docs_need_an_admin_key(
    stack: Stack, admin: httpx.AsyncClient, http: httpx.AsyncClient
) -> None:
    key = await new_key(admin)
    plain = {"Authorization": f"Bearer {key}"}
    for path in ("/admin/v1/workers", "/admin/v1/keys", "/docs", "/openapi.json"):
        reply = await http.get(path, headers=plain)
        assert reply.status_code == 403, path
        assert reply.json()["error"]["code"] == "permission_denied"
        assert (await http.get(path)).status_code == 401, path
        assert (await http.get(path, headers=stack.admin_headers)).status_code == 200, path
    refused = await http.post("/admin/v1/keys", headers=plain, json={"name": "by-a-plain-key", "admin": True})
    assert refused.status_code == 403
    names = [k["name"] for k in (await admin.get("/keys")).json()["keys"]]
    assert "by-a-plain-key" not in names


async def test_health_readiness_and_metrics_are_open(http: httpx.AsyncClient) -> None:
    assert (await http.get("/healthz")).status_code == 200
    assert (await http.get("/readyz")).status_code == 200
    assert (await http.get("/metrics")).status_code == 200


async def test_the_grpc_front_takes_the_same_keys(stack: Stack, admin: httpx.AsyncClient) -> None:
    inference = inference_pb2_grpc.InferenceStub(stack.channel)
    request = inference_pb2.EmbedRequest(model=TINY_EMBED, inputs=[inference_pb2.EmbedInput(text="hi")])
    with pytest.raises(grpc.aio.AioRpcError) as unauthenticated:
        await inference.Embed(request, timeout=30)
    assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await inference.Embed(request, timeout=30, metadata=(("authorization", "Bearer rh-unknown"),))
    assert unknown.value.code() == grpc.StatusCode.UNAUTHENTICATED
    chat_only = await new_key(admin, models=[TINY_CHAT])
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await inference.Embed(request, timeout=30, metadata=(("authorization", f"Bearer {chat_only}"),))
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    chat = inference_pb2.ChatRequest(model=TINY_CHAT, max_tokens=2, messages=[
        inference_pb2.ChatMessage(role="user", content="hi")])
    chunks = [c async for c in inference.Chat(chat, timeout=60, metadata=(("authorization", f"Bearer {chat_only}"),))]
    assert chunks[-1].finish_reason
    with pytest.raises(grpc.aio.AioRpcError) as stream_refused:
        [c async for c in inference.Chat(chat, timeout=60)]
    assert stream_refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_revoked_key_stops_at_once_on_every_router(
    stack: Stack, admin: httpx.AsyncClient, nats_url: str
) -> None:
    assert stack.router_settings is not None
    # Router two trusts its cache for ten minutes: only the revocation event can stop the key.
    settings = stack.router_settings.model_copy(update={"key_cache_s": 600.0})
    bus = await EventBus.connect(nats_url, name="second-router", ensure_stream=False)
    try:
        async with running_router(settings, bus) as (second, _):
            urls = [stack.http_url, f"http://127.0.0.1:{second.http_port}"]
            reply = await admin.post("/keys", json={"name": "two-routers"})
            key = reply.json()["key"]
            async with httpx.AsyncClient(timeout=30, headers={"Authorization": f"Bearer {key}"}) as caller:
                for url in urls:
                    assert (await caller.get(f"{url}/v1/models")).status_code == 200
                assert (await admin.delete("/keys/two-routers")).status_code == 200
                assert (await caller.get(f"{urls[0]}/v1/models")).status_code == 401

                async def refused_by_the_second() -> bool:
                    return (await caller.get(f"{urls[1]}/v1/models")).status_code == 401

                await wait_until(refused_by_the_second, timeout=5, interval=0.05)
    finally:
        await bus.close()


async def test_created_keys_show_once_and_list_without_secrets(admin: httpx.AsyncClient) -> None:
    reply = await admin.post("/keys", json={
        "name": "listed", "models": ["tiny-alias"], "rpm": 60, "tpm": 10_000, "max_parallel": 2,
        "budget_tokens": 100_000, "budget_usd": 5.5, "budget_period": "30d", "expires_in": "90d"})
    assert reply.status_code == 201, reply.text
    created = reply.json()
    assert created["key"].startswith("rh-") and created["key"].startswith(created["prefix"])
    assert created["budget_period_s"] == 30 * 86400 and created["budget_usd"] == 5.5
    listing = await admin.get("/keys")
    assert created["key"] not in listing.text
    [listed] = [k for k in listing.json()["keys"] if k["name"] == "listed"]
    assert listed["rpm"] == 60 and listed["models"] == ["tiny-alias"] and listed["expires_at"]


@pytest.mark.parametrize("body, param", [
    ({"name": "x", "rpm": -1}, "rpm"),
    ({"name": "x", "tpm": 0}, "tpm"),
    ({"name": "x", "max_parallel": 10**12}, "max_parallel"),
    ({"name": "x", "budget_usd": -5}, "budget_usd"),
    ({"name": "x", "budget_tokens": 10**20}, "budget_tokens"),
    ({"name": "x", "budget_period": "forever"}, "budget_period"),
    ({"name": "x", "expires_in": "99999d"}, "expires_in"),
    ({"name": "x", "models": ["Not An Id"]}, "models[0]"),
    ({"name": "'; DROP TABLE api_keys; --"}, "name"),
    ({"name": "ключ"}, "name"),
    ({"name": "a" * 65}, "name"),
    ({"name": "x", "colour": "red"}, "colour"),
])
async def test_bad_keys_are_400s_naming_the_field_and_change_nothing(
    admin: httpx.AsyncClient, body: dict[str, Any], param: str
) -> None:
    before = (await admin.get("/keys")).json()
    reply = await admin.post("/keys", json=body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param
    assert (await admin.get("/keys")).json() == before


async def test_a_taken_name_is_409_and_an_unknown_revoke_is_404(admin: httpx.AsyncClient) -> None:
    assert (await admin.post("/keys", json={"name": "taken"})).status_code == 201
    before = (await admin.get("/keys")).json()
    again = await admin.post("/keys", json={"name": "taken"})
    assert again.status_code == 409 and "taken" in again.json()["error"]["message"]
    for name in ("no-such-key", "'; DROP TABLE api_keys; --", "ключ", "a" * 10_000):
        reply = await admin.delete(f"/keys/{name}")
        assert reply.status_code == 404, reply.text
    assert (await admin.get("/keys")).json() == before
    assert (await admin.delete("/keys/taken")).status_code == 200
    assert (await admin.post("/keys", json={"name": "taken"})).status_code == 201


async def test_metrics_auth_and_auth_disabled_are_explicit(
    stack: Stack, admin: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    assert stack.router_settings is not None and stack.bus is not None
    key = await new_key(admin)
    guarded = stack.router_settings.model_copy(update={"metrics_auth": True})
    async with running_router(guarded, stack.bus) as (router, _), httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{router.http_port}", timeout=30) as http:
        assert (await http.get("/metrics")).status_code == 401
        assert (await http.get("/metrics", headers={"Authorization": f"Bearer {key}"})).status_code == 200
        assert (await http.get("/healthz")).status_code == 200
    caplog.set_level("WARNING", logger="services.router.server")
    open_settings = stack.router_settings.model_copy(update={"auth": "disabled"})
    async with running_router(open_settings, stack.bus) as (router, _), httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{router.http_port}", timeout=30) as http:
        assert (await http.get("/v1/models")).status_code == 200
        assert (await http.get("/admin/v1/workers")).status_code == 200
    assert any("ROUNDHOUSE_AUTH=disabled" in r.getMessage() for r in caplog.records)


async def test_routers_starting_together_agree_on_one_admin_key(db_dsn: str) -> None:
    """Several routers start at once with the same `ROUNDHOUSE_ADMIN_KEY` (a Kubernetes rollout):
    all start, one admin key, and the next restart keeps it."""
    secret = new_secret()
    engines = [make_engine(db_dsn) for _ in range(6)]
    try:
        stores = [KeyStore(make_sessionmaker(engine)) for engine in engines]
        records = await asyncio.gather(*(store.ensure_admin(secret) for store in stores))
        assert len({r.key_id for r in records}) == 1
        admins = [k for k in await stores[0].list() if k.name == ADMIN_KEY_NAME]
        assert [k.key_id for k in admins] == [records[0].key_id]
        assert (await stores[1].ensure_admin(secret)).key_id == records[0].key_id
        assert await KeyAuthenticator(stores[2]).authenticate(secret)
    finally:
        for engine in engines:
            await engine.dispose()


async def test_rotating_the_admin_key_revokes_the_old_and_never_brings_it_back(sessionmaker: Any) -> None:
    store = KeyStore(sessionmaker)
    first, second = new_secret(), new_secret()
    await store.ensure_admin(first)
    await store.ensure_admin(second)
    with pytest.raises(Unauthenticated):
        await KeyAuthenticator(store).authenticate(first)
    with pytest.raises(InvalidArgument, match="revoked keys stay revoked, so set ROUNDHOUSE_ADMIN_KEY"):
        await store.ensure_admin(first)
    assert (await KeyAuthenticator(store).authenticate(second)).admin  # the refusal changed nothing


@pytest.mark.parametrize("new", [NewKey(name="ends-in-newline\n"), NewKey(name="x", expires_in="30d\n"),
                                 NewKey(name="x", models=["tiny-chat\n"])])
def test_a_trailing_newline_is_no_valid_name_duration_or_model(new: NewKey) -> None:
    with pytest.raises(InvalidArgument):
        check_new_key(new)


class GatedStore:
    """A key store whose lookups read the row at once but answer only when released, so a test
    can land a revocation between the read and the answer."""

    def __init__(self, record: KeyRecord) -> None:
        self.record = record
        self.lookups = 0
        self.reading = asyncio.Event()
        self.release = asyncio.Event()

    async def find(self, key_hash: str) -> KeyRecord | None:
        self.lookups += 1
        row = self.record
        self.reading.set()
        await self.release.wait()
        return row


@pytest.mark.parametrize("forget", ["forget", "forget_all"])
async def test_a_lookup_racing_a_revocation_does_not_keep_the_key_alive(forget: str) -> None:
    secret = new_secret()
    live = KeyRecord(key_id="k1", name="racing", prefix=secret[:7], admin=False, models=())
    store = GatedStore(live)
    authenticator = KeyAuthenticator(store, cache_s=600)  # type: ignore[arg-type]
    lookup = asyncio.create_task(authenticator.authenticate(secret))
    await store.reading.wait()  # the lookup has read the row from before the revocation
    store.record = replace(live, revoked_at=datetime.now(UTC))
    if forget == "forget":
        authenticator.forget("racing")  # the `key.revoked` event: nothing cached yet to drop
    else:
        authenticator.forget_all()
    store.release.set()
    await lookup  # the request already under way is served
    with pytest.raises(Unauthenticated):
        await authenticator.authenticate(secret)
    assert store.lookups == 2


async def test_a_looked_up_key_is_cached() -> None:
    secret = new_secret()
    store = GatedStore(KeyRecord(key_id="k2", name="cached", prefix=secret[:7], admin=False, models=()))
    store.release.set()
    authenticator = KeyAuthenticator(store, cache_s=600)  # type: ignore[arg-type]
    await authenticator.authenticate(secret)
    await authenticator.authenticate(secret)
    assert store.lookups == 1


class KnownKeys:
    """A key store holding a plain key and an admin key."""

    def __init__(self) -> None:
        self.plain, self.admin = new_secret(), new_secret()
        self.records = {hash_secret(s): KeyRecord(key_id=s[-6:], name=name, prefix=s[:7], admin=admin, models=())
                        for s, name, admin in ((self.plain, "plain", False), (self.admin, "boss", True))}

    async def find(self, key_hash: str) -> KeyRecord | None:
        return self.records.get(key_hash)


class UntouchedGateway:
    """Stands where the gateway goes; any use of it fails the test."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the gateway was used ({name}) on a path that must not reach it")


@dataclass
class Answer:
    status: int
    body_chunks_read: int


async def call_asgi(app: Any, method: str, path: str, *, secret: str | None = None, root_path: str = "",
                    body_chunks: int = 0, content_length: int | None = None) -> Answer:
    """One request straight into the ASGI app, its path exactly as given (no client normalises it)."""
    headers = [(b"authorization", f"Bearer {secret}".encode())] if secret else []
    if content_length is not None:
        headers.append((b"content-length", str(content_length).encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": root_path,
             "query_string": b"", "headers": headers, "client": ("127.0.0.1", 1), "server": ("router", 80)}
    read = 0
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        nonlocal read
        if read < body_chunks:
            read += 1
            return {"type": "http.request", "body": b"x" * 65536, "more_body": read < body_chunks}
        if body_chunks == 0 and read == 0:
            read = -1
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # a client that stays connected
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(scope, receive, send)
    return Answer(statuses[0], max(read, 0))


@pytest.fixture
def keys() -> KnownKeys:
    return KnownKeys()


def keyed_app(keys: KnownKeys, **options: Any) -> Any:
    return create_app(UntouchedGateway(), UntouchedGateway(), max_body_bytes=1024,  # type: ignore[arg-type]
                      authenticator=KeyAuthenticator(keys), **options)  # type: ignore[arg-type]


ADMIN_PATHS = ["/admin/v1/keys", "//admin/v1/keys", "/v1/../admin/v1/keys", "/admin/v1/keys/", "/admin/v1",
               "/admin//v1/workers", "/./admin/v1/workers", "/docs", "/docs/", "/openapi.json", "/redoc"]


@pytest.mark.parametrize("root_path", ["", "/x"])
@pytest.mark.parametrize("path", ADMIN_PATHS)
@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "POST", "DELETE"])
async def test_admin_paths_need_an_admin_key_however_written(
    keys: KnownKeys, root_path: str, path: str, method: str
) -> None:
    app = keyed_app(keys)
    assert (await call_asgi(app, method, root_path + path, root_path=root_path)).status == 401
    assert (await call_asgi(app, method, root_path + path, root_path=root_path, secret=keys.plain)).status == 403
    admitted = await call_asgi(app, method, root_path + path, root_path=root_path, secret=keys.admin)
    assert admitted.status not in (401, 403)


@pytest.mark.parametrize("root_path", ["", "/x"])
@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/", "//v1/models", "/v1", "/unknown", "/healthz/",
                                  "//healthz", "/healthz/../v1/models", "/metrics/", ""])
async def test_every_other_path_needs_a_key(keys: KnownKeys, root_path: str, path: str) -> None:
    app = keyed_app(keys)
    for method in ("GET", "HEAD", "OPTIONS"):
        assert (await call_asgi(app, method, root_path + path, root_path=root_path)).status == 401, method


@pytest.mark.parametrize("root_path", ["", "/x"])
async def test_only_health_readiness_and_metrics_are_open(keys: KnownKeys, root_path: str) -> None:
    app = keyed_app(keys)
    assert (await call_asgi(app, "GET", f"{root_path}/healthz", root_path=root_path)).status == 200
    assert (await call_asgi(app, "GET", f"{root_path}/metrics", root_path=root_path)).status == 200
    guarded = keyed_app(keys, metrics_auth=True)
    assert (await call_asgi(guarded, "GET", f"{root_path}/metrics", root_path=root_path)).status == 401
    metrics = await call_asgi(guarded, "GET", f"{root_path}/metrics", root_path=root_path, secret=keys.plain)
    assert metrics.status == 200


@pytest.mark.parametrize("content_length", [None, 100 * 1024 * 1024])
async def test_a_request_without_a_key_is_refused_before_its_body_is_read(
    keys: KnownKeys, content_length: int | None
) -> None:
    app = keyed_app(keys)
    refused = await call_asgi(app, "POST", "/v1/chat/completions", body_chunks=1600, content_length=content_length)
    assert refused == Answer(401, 0)
    too_large = await call_asgi(app, "POST", "/v1/chat/completions", secret=keys.plain, body_chunks=1600,
                                content_length=content_length)
    assert too_large.status == 413 and too_large.body_chunks_read <= 1


async def test_known_keys_keep_working_while_postgres_does_not_answer(db_dsn: str) -> None:
    engine = make_engine(db_dsn)
    down = make_engine(f"postgresql://nobody@127.0.0.1:{free_port()}/none")
    try:
        store = KeyStore(make_sessionmaker(engine))
        _, secret = await store.create(NewKey(name=f"outage-{next(_names)}"))
        now = [0.0]
        authenticator = KeyAuthenticator(store, cache_s=10, stale_s=300, clock=lambda: now[0])
        assert (await authenticator.authenticate(secret)).name.startswith("outage-")

        authenticator.store = KeyStore(make_sessionmaker(down))  # Postgres stops answering
        now[0] = 60.0  # past the cache period: a lookup is due, and fails
        assert (await authenticator.authenticate(secret)).name.startswith("outage-")
        with pytest.raises(OSError) as unknown:  # a key not seen before is never let in: 503
            await authenticator.authenticate(new_secret())
        assert database_unavailable(unknown.value)

        now[0] = 400.0  # too long since the key was last read: it is not vouched for any more
        with pytest.raises(OSError) as stale:
            await authenticator.authenticate(secret)
        assert database_unavailable(stale.value)
    finally:
        await engine.dispose()
        await down.dispose()
