"""Remote upstreams called from the router itself.

An asset of `runtime: openai` is held by a worker like any other (loaded on demand, placed,
put to sleep when idle, evicted, refused when disabled), but serving one of its requests needs
nothing the worker has: the router sends it straight to the upstream, one hop and one process
fewer than through the worker. The worker's hold still gates the request (the gateway places
it first, waking the asset if it sleeps), and the gateway still reserves and settles the key's
limits, records usage and counts the request in its metrics.

A worker learns that an asset is in use only from the requests it serves; its idle clock
decides when the asset sleeps and in which order idle assets are evicted. So one request per
`touch_s` per asset and worker still goes through the worker (see `skips_worker`).

The API key is read from the router's environment (the variable the asset names), after the
asset's key variable and URL pass this router's `UpstreamRules`, as the worker does with its
own environment.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import contextmanager

from roundhouse.v1 import inference_pb2
from services.common.asset_proto import AssetRecord
from services.common.errors import InvalidSpec, UpstreamError
from services.common.openai_upstream import OpenAIUpstream
from services.common.upstreams import DEFAULT_UPSTREAM_RULES, UpstreamRules
from services.router.remote_shapes import request_body, to_chunk

log = logging.getLogger(__name__)

REMOTE_RUNTIME = "openai"
DEFAULT_TOUCH_S = 10.0


class _Client:
    """The upstream client of one asset revision, and the requests using it now."""

    __slots__ = ("revision", "upstream", "in_use", "retired")

    def __init__(self, revision: int, upstream: OpenAIUpstream) -> None:
        self.revision = revision
        self.upstream = upstream
        self.in_use = 0
        self.retired = False


class RemoteUpstreams:
    """The upstream clients of the remote assets this router has served, one per asset,
    replaced when the asset's revision changes."""

    def __init__(self, rules: UpstreamRules = DEFAULT_UPSTREAM_RULES, *,
                 touch_s: float = DEFAULT_TOUCH_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.rules = rules
        self.touch_s = touch_s
        self._clock = clock
        self._clients: dict[str, _Client] = {}
        self._opening: dict[tuple[str, int], asyncio.Task[_Client]] = {}
        self._refused: dict[tuple[str, int], str] = {}
        """Asset revisions whose upstream this router's rules refuse, and why."""
        self._through_worker: dict[tuple[str, str], float] = {}
        """(worker address, asset id) → when a request last went through that worker."""
        self._closing: set[asyncio.Task[None]] = set()

    def skips_worker(self, record: AssetRecord, worker_address: str) -> bool:
        """Whether this request for `record`, placed on the worker at `worker_address`, goes
        straight to the upstream: yes for a remote asset, except one request every `touch_s` per
        worker and asset (the first included), which goes through the worker so that its idle
        clock sees the asset in use."""
        if record.spec.runtime != REMOTE_RUNTIME:
            return False
        key = (worker_address, record.spec.asset_id)
        now = self._clock()
        last = self._through_worker.get(key)
        if last is not None and now - last < self.touch_s:
            return True
        self._through_worker[key] = now
        return False

    async def chat(self, record: AssetRecord, request: inference_pb2.ChatRequest, *,
                   stream: bool, timeout: float | None = None,
                   ) -> AsyncGenerator[inference_pb2.ChatChunk, None]:
        """The answer of the asset's upstream as the worker would stream it (see
        `remote_shapes`): each choice's pieces, its finish, and the usage last. Not `stream`:
        asked for whole, and given as one chunk per choice carrying all of it."""
        asset_id = record.spec.asset_id
        client = await self._client(record)
        with self._using(client):
            path, body = request_body(client.upstream.model, request, stream=stream, asset_id=asset_id)
            if not stream:
                # Every choice whole; the usage (on each) is kept for the last one only.
                answers = await client.upstream.complete_choices(path, body, timeout_s=timeout)
                for n, answer in enumerate(answers):
                    chunk = to_chunk(answer, asset_id)
                    if n < len(answers) - 1:
                        chunk.ClearField("usage")
                    yield chunk
                return
            async for piece in client.upstream.stream(path, body, timeout_s=timeout):
                yield to_chunk(piece, asset_id)

    async def _client(self, record: AssetRecord) -> _Client:
        asset_id = record.spec.asset_id
        client = self._clients.get(asset_id)
        if client is not None and client.revision == record.revision:
            return client
        key = (asset_id, record.revision)
        if key in self._refused:
            raise UpstreamError(self._refused[key])
        task = self._opening.get(key)
        if task is None:
            task = asyncio.create_task(self._open(record), name=f"upstream-{asset_id}")
            self._opening[key] = task
            task.add_done_callback(lambda _: self._opening.pop(key, None))
        return await asyncio.shield(task)

    async def _open(self, record: AssetRecord) -> _Client:
        asset_id = record.spec.asset_id
        try:
            # The upstream's host is looked up (blocking) to refuse metadata addresses.
            upstream = await asyncio.to_thread(OpenAIUpstream, record.spec, upstreams=self.rules)
        except InvalidSpec as exc:
            log.warning("%s: its upstream may not be called from this router: %s", asset_id, exc.message)
            reason = f"model '{asset_id}' cannot be served by this router: {exc.message}"
            self._refused[(asset_id, record.revision)] = reason
            raise UpstreamError(reason) from None
        client = _Client(record.revision, upstream)
        previous = self._clients.get(asset_id)
        if previous is None or previous.revision < record.revision:
            self._clients[asset_id] = client
            if previous is not None:
                self._retire(previous)
        return client

    @contextmanager
    def _using(self, client: _Client) -> Iterator[None]:
        client.in_use += 1
        try:
            yield
        finally:
            client.in_use -= 1
            if client.retired and client.in_use == 0:
                self._close_later(client)

    def _retire(self, client: _Client) -> None:
        """Close a replaced client once its last request is done."""
        client.retired = True
        if client.in_use == 0:
            self._close_later(client)

    def _close_later(self, client: _Client) -> None:
        task = asyncio.get_running_loop().create_task(client.upstream.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Close every client (at shutdown)."""
        for client in self._clients.values():
            await client.upstream.close()
        self._clients.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
