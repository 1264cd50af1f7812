"""The live event feed `GET /admin/v1/events` as an admin's browser or `curl` reads it: server-sent
events from JetStream, filtered by subject, resumable with `Last-Event-ID`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlencode

import httpx
import pytest
from limits_harness import new_key
from polling import wait_until
from stack_harness import TINY_CHAT, TINY_EMBED, Stack, running_router, running_stack, tiny_documents
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp
from starlette.types import Message as AsgiMessage

from services.common.events import STREAM_NAME
from services.router.http import events_feed

CHAT_EVENTS = f"roundhouse.events.model.*.{TINY_CHAT}"
EMBED_EVENTS = f"roundhouse.events.model.*.{TINY_EMBED}"
READ_TIMEOUT_S = 30.0


@dataclass
class Message:
    """One server-sent event."""

    id: int
    event: str
    data: dict[str, Any]


class Feed:
    """The messages of an open feed, read one at a time (heartbeat comments skipped)."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def next(self) -> Message:
        """The next message; fails the test after `READ_TIMEOUT_S`."""
        fields: dict[str, str] = {}
        async with asyncio.timeout(READ_TIMEOUT_S):
            async for line in self._lines:
                if line == "":
                    if fields:
                        return Message(int(fields["id"]), fields["event"], json.loads(fields["data"]))
                    continue
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(": ")
                fields[name] = value
        raise AssertionError("the feed ended")

    async def until(self, event: str) -> list[Message]:
        """Every message up to and including the first of type `event`."""
        seen = [await self.next()]
        while seen[-1].event != event:
            seen.append(await self.next())
        return seen


@pytest.fixture(scope="module")
async def stack(
    own_db: str, nats_url: str, sources: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    async with running_stack(own_db, nats_url, sources, tmp_path_factory.mktemp("store"),
                             auth=True) as running:
        await running.apply(*tiny_documents(sources))
        yield running


@asynccontextmanager
async def feed(stack: Stack, **params: str) -> AsyncIterator[Feed]:
    """An open feed with the admin key; `last_event_id_header` is sent as `Last-Event-ID`."""
    headers = dict(stack.admin_headers)
    if "last_event_id_header" in params:
        headers["Last-Event-ID"] = params.pop("last_event_id_header")
    async with httpx.AsyncClient(base_url=stack.http_url, timeout=READ_TIMEOUT_S) as http, http.stream(
            "GET", "/admin/v1/events", params=params, headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        yield Feed(response)


async def operate(admin: httpx.AsyncClient, asset_id: str, kind: str) -> None:
    reply = await admin.post(f"/models/{asset_id}/{kind}")
    assert reply.status_code == 202, reply.text


async def test_events_arrive_live_filtered_and_resume_after_last_event_id(
    stack: Stack, admin: httpx.AsyncClient
) -> None:
    async with feed(stack, subject=CHAT_EVENTS) as chat_feed, feed(stack, subject=EMBED_EVENTS) as embed_feed:
        await operate(admin, TINY_CHAT, "load")
        loaded = await chat_feed.until("model.loaded")
        await operate(admin, TINY_CHAT, "unload")
        live = loaded + await chat_feed.until("model.unloaded")
        kinds = [m.event for m in live]
        assert kinds[0] == "model.loading" and "model.loaded" in kinds and kinds[-1] == "model.unloaded"
        assert all(m.data["assetId"] == TINY_CHAT and m.data["type"] == m.event for m in live)
        assert [m.id for m in live] == sorted({m.id for m in live})
        # The embedding model's feed saw none of that: its first event is its own.
        await operate(admin, TINY_EMBED, "load")
        first = await embed_feed.next()
        assert first.data["assetId"] == TINY_EMBED and first.id > live[-1].id

    async with feed(stack, subject=CHAT_EVENTS, last_event_id_header=str(live[0].id)) as resumed:
        again = [await resumed.next() for _ in live[1:]]
    assert [(m.id, m.event, m.data) for m in again] == [(m.id, m.event, m.data) for m in live[1:]]
    async with feed(stack, subject=CHAT_EVENTS, last_event_id=str(live[-2].id)) as by_query:
        assert (await by_query.next()).id == live[-1].id
    async with feed(stack, subject=CHAT_EVENTS, since="all") as history:
        assert (await history.next()).id <= live[0].id


@pytest.mark.parametrize("params, headers, param", [
    ({"subject": "foo.>"}, {}, "subject"),
    ({"subject": "roundhouse.events.model loaded"}, {}, "subject"),
    ({"subject": "roundhouse.events.>.x"}, {}, "subject"),
    ({}, {"Last-Event-ID": "abc"}, "Last-Event-ID"),
    ({"last_event_id": "-1"}, {}, "last_event_id"),
])
async def test_bad_subjects_and_event_ids_are_400s(
    stack: Stack, params: dict[str, str], headers: dict[str, str], param: str
) -> None:
    async with httpx.AsyncClient(base_url=stack.http_url, timeout=30) as http:
        reply = await http.get("/admin/v1/events", params=params, headers={**stack.admin_headers, **headers})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


async def test_the_feed_needs_an_admin_key(stack: Stack, admin: httpx.AsyncClient) -> None:
    secret, _ = await new_key(admin, "feed-user")
    async with httpx.AsyncClient(base_url=stack.http_url, timeout=30) as http:
        assert (await http.get("/admin/v1/events")).status_code == 401
        user = await http.get("/admin/v1/events", headers={"Authorization": f"Bearer {secret}"})
        assert user.status_code == 403


async def test_a_feed_whose_client_left_before_it_began_keeps_no_consumer(stack: Stack) -> None:
    """A feed's consumer is let go when the client goes away: mid-stream, and also before the
    response could start (the server fails the first write, as ASGI servers of spec 2.4 do),
    when no event was ever read."""
    assert stack.bus is not None
    subject = f"roundhouse.events.model.*.left-{uuid.uuid4().hex[:8]}"
    jsm = stack.bus.nc.jsm()

    async def consumers() -> list[Any]:
        return [c for c in await jsm.consumers_info(STREAM_NAME) if c.config.filter_subject == subject]

    async def delivering() -> int:
        return len([c for c in await consumers() if c.push_bound])

    async def none_delivering() -> bool:
        return await delivering() == 0

    async with feed(stack, subject=subject):  # an open feed's consumer delivers...
        await wait_until(delivering, timeout=READ_TIMEOUT_S, interval=0.05)
    await wait_until(none_delivering, timeout=READ_TIMEOUT_S, interval=0.05)  # ...until it closes

    starts: list[int] = []

    async def gone() -> AsgiMessage:
        return {"type": "http.disconnect"}

    async def send(message: AsgiMessage) -> None:
        if message["type"] == "http.response.start":
            starts.append(message["status"])
            raise OSError("the client went away")

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "GET", "scheme": "http", "path": "/admin/v1/events", "raw_path": b"/admin/v1/events",
             "root_path": "", "query_string": urlencode({"subject": subject}).encode(),
             "headers": [(b"host", b"router"), *((k.lower().encode(), v.encode())
                                                 for k, v in stack.admin_headers.items())],
             "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 80)}
    with contextlib.suppress(ClientDisconnect):
        app = cast(ASGIApp, stack.router.http_server.config.app)
        await app(scope, gone, send)
    assert starts == [200]

    async def made() -> bool:
        return len(await consumers()) == 2

    await wait_until(made, timeout=READ_TIMEOUT_S, interval=0.05)
    await wait_until(none_delivering, timeout=READ_TIMEOUT_S, interval=0.05)


async def test_the_feed_ends_when_the_router_begins_to_drain(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events_feed, "HEARTBEAT_S", 3600.0)  # only the drain can end this quiet feed
    assert stack.router_settings is not None
    async with running_router(stack.router_settings, stack.bus) as (router, _), httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{router.http_port}", timeout=READ_TIMEOUT_S) as http, http.stream(
            "GET", "/admin/v1/events", params={"subject": CHAT_EVENTS}, headers=stack.admin_headers) as response:
        assert response.status_code == 200
        await router.grpc_server.begin_drain()
        async with asyncio.timeout(READ_TIMEOUT_S):  # the body ends: the feed closed
            async for _ in response.aiter_lines():
                pass
