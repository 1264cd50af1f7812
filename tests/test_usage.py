"""The usage ledger and per-key limits as a caller sees them: a stack that checks keys, the
official `openai` client, real Postgres; and the ledger writer against a Postgres that goes
away and comes back."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import grpc
import httpx
import openai
import pytest
from limits_harness import clear_of_minute_boundary, ledger_rows, new_key
from openai.types.chat import ChatCompletionMessageParam
from polling import wait_until
from stack_harness import TINY_CHAT, TINY_EMBED, Stack, running_router, running_stack, tiny_documents

from roundhouse.v1 import inference_pb2, worker_pb2
from services.cli.usage import render_usage, show_usage
from services.common.embedded import free_port
from services.common.events import EventBus
from services.router.usage import UsageLedger, UsageTicket

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
PRICES = {"input_per_1m": 1000, "output_per_1m": 3000}
"""Dear on purpose: a handful of tokens costs a visible fraction of a dollar."""


# -- the ledger writer -------------------------------------------------------------------------


class PostgresLink:
    """A TCP relay in front of Postgres that the test can cut and restore."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def up(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def down(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


async def rows_of(db_dsn: str, request_ids: list[str]) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(db_dsn)
    try:
        return await conn.fetch("SELECT * FROM usage_records WHERE request_id = ANY($1::text[]) "
                                "ORDER BY request_id", request_ids)
    finally:
        await conn.close()


def tickets(ledger: UsageLedger, n: int) -> list[str]:
    ids = [f"ledger-{uuid.uuid4().hex}" for _ in range(n)]
    for request_id in ids:
        ticket: UsageTicket = ledger.open(None, "some-model", "llm-runtime", request_id)
        ticket.prompt_tokens, ticket.completion_tokens = 3, 4
        ledger.record(ticket)
    return ids


async def test_rows_are_written_in_the_background_within_a_second(db_dsn: str) -> None:
    pool = await asyncpg.create_pool(db_dsn, min_size=0, max_size=2)
    ledger = UsageLedger(pool, flush_s=0.5)
    ledger.start()
    try:
        ids = tickets(ledger, 3)
        assert ledger.pending == 3  # recording did no I/O

        async def written() -> bool:
            return len(await rows_of(db_dsn, ids)) == 3

        await wait_until(written, timeout=2, interval=0.05)
        row = (await rows_of(db_dsn, ids))[0]
        assert (row["key_id"], row["route"], row["prompt_tokens"], row["completion_tokens"],
                row["status"]) == ("", "some-model", 3, 4, "ok")
    finally:
        await ledger.close()
        await pool.close()


async def test_a_stopped_router_flushes_what_it_holds(db_dsn: str) -> None:
    pool = await asyncpg.create_pool(db_dsn, min_size=0, max_size=2)
    ledger = UsageLedger(pool, flush_s=3600)  # never by the clock in this test
    ledger.start()
    ids = tickets(ledger, 5)
    await ledger.close()
    await pool.close()
    assert len(await rows_of(db_dsn, ids)) == 5


async def test_nothing_is_lost_while_postgres_is_briefly_away_and_the_buffer_is_bounded(
    db_dsn: str,
) -> None:
    parts = urlsplit(db_dsn)
    link = PostgresLink(parts.hostname or "127.0.0.1", parts.port or 5432)
    await link.up()
    pool = await asyncpg.create_pool(parts._replace(netloc=f"{parts.username or ''}"
                                                    f"{':' + parts.password if parts.password else ''}"
                                                    f"@127.0.0.1:{link.port}").geturl(),
                                     min_size=0, max_size=2)
    ledger = UsageLedger(pool, flush_s=0.1, max_buffered=6)
    ledger.start()
    try:
        await link.down()
        ids = tickets(ledger, 4)
        with pytest.raises((OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
            await ledger.flush()
        assert ledger.pending == 4
        dropped = tickets(ledger, 3)  # 7 rows: one over the bound, the oldest goes
        assert (ledger.pending, ledger.dropped) == (6, 1)
        await link.up()
        kept = ids[1:] + dropped

        async def written() -> bool:
            return len(await rows_of(db_dsn, kept)) == 6

        await wait_until(written, timeout=15, interval=0.1)
        assert await rows_of(db_dsn, ids[:1]) == []
    finally:
        await ledger.close()
        await pool.close()
        await link.down()


async def test_a_row_postgres_refuses_does_not_block_the_rows_after_it(db_dsn: str) -> None:
    pool = await asyncpg.create_pool(db_dsn, min_size=0, max_size=2)
    ledger = UsageLedger(pool, flush_s=3600)
    try:
        before = tickets(ledger, 2)
        refused = ledger.open(None, "some-model", "llm-runtime", f"ledger-{uuid.uuid4().hex}")
        refused.prompt_tokens = 2**31  # past the column's integer: Postgres refuses the row
        ledger.record(refused)
        odd = f"ledger-{uuid.uuid4().hex}"
        ledger.record(ledger.open(None, "nul\x00model" + "m" * 10_000, "llm-runtime", odd + "\x00"))
        after = tickets(ledger, 2)
        await ledger.flush()
        assert (ledger.pending, ledger.rejected) == (0, 1)
        assert len(await rows_of(db_dsn, before + after)) == 4
        assert await rows_of(db_dsn, [refused.request_id]) == []
        (cleaned,) = await rows_of(db_dsn, [odd + "\ufffd"])
        assert cleaned["route"].startswith("nul\ufffdmodel") and len(cleaned["route"]) <= 256
    finally:
        await ledger.close()
        await pool.close()


def test_the_cli_table_has_a_line_per_group() -> None:
    text = render_usage("asset", [
        {"group": "tiny-chat", "requests": 3, "errors": 1, "prompt_tokens": 30,
         "completion_tokens": 6, "cost_usd": 0.0123, "p50_latency_ms": 12.3, "p95_latency_ms": 40.0,
         "cache_hits": 2},
        {"group": "", "requests": 1, "errors": 0, "prompt_tokens": 1, "completion_tokens": 0,
         "cost_usd": 0.0, "p50_latency_ms": 1.0, "p95_latency_ms": 1.0},
    ])
    lines = text.splitlines()
    assert lines[0].split() == ["asset", "requests", "errors", "tokens", "in", "tokens", "out",
                                "cost", "usd", "p50", "ms", "p95", "ms", "cache", "hits"]
    assert lines[1].split() == ["tiny-chat", "3", "1", "30", "6", "0.012300", "12.3", "40.0", "2"]
    assert lines[2].startswith("(no key)")


# -- through a stack that checks keys --------------------------------------------------------


@pytest.fixture(scope="module")
async def stack(
    own_db: str, nats_url: str, sources: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    documents = tiny_documents(sources)
    documents[0]["pricing"] = PRICES
    async with running_stack(own_db, nats_url, sources, tmp_path_factory.mktemp("store"),
                             auth=True) as running:
        await running.apply(*documents)
        yield running


def client(url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


async def holds(stack: Stack, asset_id: str) -> bool:
    info = await stack.workers[0].control.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest())
    return any(m.asset_id == asset_id for m in info.models)


async def test_over_rpm_is_429_with_retry_after_and_never_wakes_the_model(
    stack: Stack, admin: httpx.AsyncClient, own_db: str
) -> None:
    assert not await holds(stack, TINY_CHAT)
    await clear_of_minute_boundary()
    key, name = await new_key(admin, "usage", rpm=1)
    async with client(stack.http_url, key) as api:
        served = await api.embeddings.with_raw_response.create(model=TINY_EMBED, input="hi")
        assert served.headers["x-ratelimit-limit-requests"] == "1"
        assert served.headers["x-ratelimit-remaining-requests"] == "0"
        assert served.headers["x-ratelimit-reset-requests"].endswith("s")
        assert "x-ratelimit-limit-tokens" not in served.headers
        with pytest.raises(openai.RateLimitError) as refused:
            await api.chat.completions.create(model=TINY_CHAT, messages=HELLO, max_tokens=2)
    assert refused.value.code == "rate_limit_exceeded"
    assert 1 <= int(refused.value.response.headers["retry-after"]) <= 60
    assert refused.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert not await holds(stack, TINY_CHAT)
    operations = (await admin.get("/operations", params={"asset_id": TINY_CHAT})).json()
    assert operations["operations"] == []

    async def recorded() -> bool:
        return len(await ledger_rows(own_db, name)) == 2

    await wait_until(recorded, timeout=5, interval=0.1)
    ok, limited = await ledger_rows(own_db, name)
    assert (ok["status"], ok["asset_id"], ok["interface"]) == ("ok", TINY_EMBED, "embedding-runtime")
    assert (limited["status"], limited["route"], limited["completion_tokens"], limited["woke"]) == (
        "rate_limited", TINY_CHAT, 0, False)


async def test_usage_rows_match_what_the_clients_saw(
    stack: Stack, admin: httpx.AsyncClient, own_db: str
) -> None:
    key, name = await new_key(admin, "usage", tpm=100_000)
    async with client(stack.http_url, key) as api:
        whole = await api.chat.completions.with_raw_response.create(
            model="tiny-alias", messages=HELLO, max_tokens=3)
        assert whole.headers["x-ratelimit-limit-tokens"] == "100000"
        assert int(whole.headers["x-ratelimit-remaining-tokens"]) < 100_000
        answer = whole.parse()
        stream = await api.chat.completions.create(
            model=TINY_CHAT, messages=HELLO, max_tokens=4, stream=True,
            stream_options={"include_usage": True})
        streamed = [chunk async for chunk in stream]
        vectors = await api.embeddings.create(model=TINY_EMBED, input=["one", "two"])
    seen = [answer.usage, streamed[-1].usage, vectors.usage]
    assert all(u is not None for u in seen)

    async def recorded() -> bool:
        return len(await ledger_rows(own_db, name)) == 3

    await wait_until(recorded, timeout=5, interval=0.1)
    rows = await ledger_rows(own_db, name)
    assert [r["route"] for r in rows] == ["tiny-alias", TINY_CHAT, TINY_EMBED]
    assert [r["asset_id"] for r in rows] == [TINY_CHAT, TINY_CHAT, TINY_EMBED]
    assert [(r["prompt_tokens"], r["completion_tokens"]) for r in rows] == [
        (u.prompt_tokens, getattr(u, "completion_tokens", 0) or 0) for u in seen]  # type: ignore[union-attr]
    assert all(r["status"] == "ok" for r in rows)
    chat_cost = [Decimal(r["prompt_tokens"] * 1000 + r["completion_tokens"] * 3000) / 1_000_000
                 for r in rows[:2]]
    assert [r["cost_usd"] for r in rows[:2]] == chat_cost
    assert rows[2]["cost_usd"] == 0  # the embedding model has no pricing
    assert rows[0]["ttft_ms"] is not None and rows[0]["latency_ms"] >= rows[0]["ttft_ms"]

    report = (await admin.get("/usage", params={"group_by": "key"})).json()
    (mine,) = [r for r in report["rows"] if r["group"] == name]  # keys by name
    assert mine["key_id"] == rows[0]["key_id"]
    assert (mine["requests"], mine["errors"]) == (3, 0)
    assert mine["prompt_tokens"] == sum(r["prompt_tokens"] for r in rows)
    assert mine["completion_tokens"] == sum(r["completion_tokens"] for r in rows)
    assert mine["cost_usd"] == pytest.approx(float(sum(chat_cost)))
    assert 0 < mine["p50_latency_ms"] <= mine["p95_latency_ms"]
    # `roundhouse keys ls` shows the same totals through the key listing.
    (listed,) = [k for k in (await admin.get("/keys")).json()["keys"] if k["name"] == name]
    assert listed["usage"] == {"requests": 3, "prompt_tokens": mine["prompt_tokens"],
                               "completion_tokens": mine["completion_tokens"],
                               "cost_usd": pytest.approx(mine["cost_usd"])}
    by_asset = (await admin.get("/usage", params={"group_by": "asset"})).json()["rows"]
    assert {TINY_CHAT, TINY_EMBED} <= {r["group"] for r in by_asset}
    by_day = (await admin.get("/usage", params={"group_by": "day"})).json()["rows"]
    assert sum(r["requests"] for r in by_day) == sum(r["requests"] for r in by_asset)
    assert (await admin.get("/usage", params={"group_by": "week"})).status_code == 400
    later = await admin.get("/usage", params={"since": "2999-01-01T00:00:00Z"})
    assert later.status_code == 200 and later.json()["rows"] == []  # after until (now): empty


async def test_a_stream_the_client_leaves_is_charged_what_it_streamed(
    stack: Stack, admin: httpx.AsyncClient, own_db: str
) -> None:
    await clear_of_minute_boundary()
    key, name = await new_key(admin, "usage", tpm=100_000)
    async with client(stack.http_url, key) as api:
        stream = await api.chat.completions.create(
            model=TINY_CHAT, messages=HELLO, max_tokens=4000, stream=True)
        seen = 0
        async for chunk in stream:
            seen += bool(chunk.choices and chunk.choices[0].delta.content)
            if seen == 3:
                break
        await stream.close()

        async def recorded() -> bool:
            return len(await ledger_rows(own_db, name)) == 1

        await wait_until(recorded, timeout=30, interval=0.1)
        (row,) = await ledger_rows(own_db, name)
        assert row["status"] == "cancelled"
        assert row["prompt_tokens"] > 0 and 3 <= row["completion_tokens"] < 4000
        assert row["cost_usd"] > 0
        after = await api.chat.completions.with_raw_response.create(
            model=TINY_CHAT, messages=HELLO, max_tokens=1)
    # This minute holds what the left stream was charged plus the new request's estimate
    # ("hello": 2 tokens + 4 for the message, and 1 of completion), not a whole 4000.
    charged = row["prompt_tokens"] + row["completion_tokens"]
    assert int(after.headers["x-ratelimit-remaining-tokens"]) == 100_000 - charged - 7


async def test_a_reused_key_name_starts_from_no_usage(
    stack: Stack, admin: httpx.AsyncClient
) -> None:
    name = f"reused-{uuid.uuid4().hex[:8]}"
    first = await admin.post("/keys", json={"name": name})
    async with client(stack.http_url, first.json()["key"]) as api:
        await api.embeddings.create(model=TINY_EMBED, input="one")
        await api.embeddings.create(model=TINY_EMBED, input="two")
    assert (await admin.delete(f"/keys/{name}")).status_code == 200
    second = await admin.post("/keys", json={"name": name})
    async with client(stack.http_url, second.json()["key"]) as api:
        await api.embeddings.create(model=TINY_EMBED, input="three")
    (listed,) = [k for k in (await admin.get("/keys")).json()["keys"] if k["name"] == name]
    assert listed["usage"]["requests"] == 1
    rows = [r for r in (await admin.get("/usage", params={"group_by": "key"})).json()["rows"]
            if r["group"].startswith(f"{name} (")]
    assert sorted(r["requests"] for r in rows) == [1, 2]
    assert len({r["key_id"] for r in rows}) == 2
    assert all(r["group"] == f"{name} ({r['key_id'][:8]})" for r in rows)


async def test_the_model_routes_carry_the_rate_limit_headers_without_spending_a_request(
    stack: Stack, admin: httpx.AsyncClient
) -> None:
    await clear_of_minute_boundary()
    key, _ = await new_key(admin, "usage", rpm=10, tpm=1000)
    unlimited, _ = await new_key(admin, "usage")
    async with client(stack.http_url, key) as api:
        vectors = await api.embeddings.create(model=TINY_EMBED, input="hello there")
        left = str(1000 - vectors.usage.total_tokens)

        async def settled() -> bool:
            listed = await api.models.with_raw_response.list()
            return listed.headers["x-ratelimit-remaining-tokens"] == left

        await wait_until(settled, timeout=5, interval=0.05)
        for reply in (await api.models.with_raw_response.list(),
                      await api.models.with_raw_response.retrieve(TINY_EMBED)):
            assert reply.headers["x-ratelimit-limit-requests"] == "10"
            assert reply.headers["x-ratelimit-remaining-requests"] == "9"
            assert reply.headers["x-ratelimit-reset-requests"].endswith("s")
            assert reply.headers["x-ratelimit-limit-tokens"] == "1000"
            assert reply.headers["x-ratelimit-remaining-tokens"] == left
    async with client(stack.http_url, unlimited) as api:
        reply = await api.models.with_raw_response.list()
        assert not any(h.startswith("x-ratelimit-") for h in reply.headers)


async def test_a_spent_budget_is_429_insufficient_quota(
    stack: Stack, admin: httpx.AsyncClient
) -> None:
    key, _ = await new_key(admin, "usage", budget_usd=0.05)
    async with client(stack.http_url, key) as api:
        # Each request may cost up to (prompt estimate + 4 tokens) at $1000/$3000 per 1M tokens.
        with pytest.raises(openai.RateLimitError) as refused:
            for _ in range(20):
                await api.chat.completions.create(model=TINY_CHAT, messages=HELLO, max_tokens=4)
    assert refused.value.code == "insufficient_quota"
    assert "does not renew" in refused.value.message
    assert "retry-after" not in refused.value.response.headers


async def test_two_routers_never_let_a_key_past_its_rpm(
    stack: Stack, admin: httpx.AsyncClient, nats_url: str
) -> None:
    assert stack.router_settings is not None
    await clear_of_minute_boundary()
    key, _ = await new_key(admin, "usage", rpm=3)
    bus = await EventBus.connect(nats_url, name="second-router-usage", ensure_stream=False)
    try:
        async with running_router(stack.router_settings, bus) as (second, _):
            urls = [stack.http_url, f"http://127.0.0.1:{second.http_port}"]
            apis = [client(url, key) for url in urls]
            results = await asyncio.gather(
                *(apis[i % 2].embeddings.create(model=TINY_EMBED, input=f"burst {i}")
                  for i in range(10)), return_exceptions=True)
            for api in apis:
                await api.close()
    finally:
        await bus.close()
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(refused) == 7 and all(r.code == "rate_limit_exceeded" for r in refused)
    assert len([r for r in results if not isinstance(r, Exception)]) == 3


async def test_the_grpc_front_refuses_over_the_limit_with_resource_exhausted(
    stack: Stack, admin: httpx.AsyncClient
) -> None:
    await clear_of_minute_boundary()
    key, _ = await new_key(admin, "usage", rpm=1)
    metadata = (("authorization", f"Bearer {key}"),)
    request = inference_pb2.EmbedRequest(model=TINY_EMBED,
                                         inputs=[inference_pb2.EmbedInput(text="hi")])
    assert (await stack.inference.Embed(request, timeout=60, metadata=metadata)).embeddings
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stack.inference.Embed(request, timeout=60, metadata=metadata)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "requests per minute" in (refused.value.details() or "")


async def test_roundhouse_usage_prints_the_ledger_per_asset(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert stack.admin_key is not None
    async with client(stack.http_url, stack.admin_key) as api:
        await api.embeddings.create(model=TINY_EMBED, input="for the table")
    monkeypatch.setenv("ROUNDHOUSE_ROUTER_URL", stack.http_url)
    monkeypatch.setenv("ROUNDHOUSE_ADMIN_KEY", stack.admin_key)
    assert await asyncio.to_thread(show_usage, "asset") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["asset", "requests", "errors"]
    assert any(line.split()[0] == TINY_EMBED and int(line.split()[1]) >= 1 for line in lines[1:])
