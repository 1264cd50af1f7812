"""Sending the sampled copies of a route's requests to its shadow assets.

A copy starts once the primary was admitted and answered its first chunk, in a background
task: nothing of it runs in the primary's path, and its answer goes to nobody. A shadow that
no worker holds is not woken unless it says `wake: true` (the copy is dropped as `asleep`);
copies are bounded per shadow (see `ShadowTraffic`); they carry no API key, so no key is
billed and no limit is spent. What both sides answered is compared and kept by
`ShadowTraffic`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from google.protobuf.message import Message

from roundhouse.v1 import inference_pb2
from services.common.asset_proto import AssetRecord
from services.common.errors import RoundhouseError
from services.common.routespec import RouteSpec, Shadow
from services.router.routes.plan import Resolve
from services.router.routes.shadow import ShadowTraffic, SideOutcome

log = logging.getLogger(__name__)

R = TypeVar("R", bound=Message)
Send = Callable[[AssetRecord, R, bool], Awaitable[SideOutcome]]
"""Runs a copy on an asset (`may_wake`), timing it from its start."""


class PrimarySide:
    """The primary's answer as its shadow copies compare it: fed as the primary streams."""

    def __init__(self, greedy: bool, started: float) -> None:
        """`started`: when the primary request arrived (`time.perf_counter`), so that its
        latency counts its queue wait and first token as the copy's does."""
        self.outcome: asyncio.Future[SideOutcome] = asyncio.get_running_loop().create_future()
        self._started = started
        self._greedy = greedy
        self._text: list[str] = []

    def chunk(self, chunk: inference_pb2.ChatChunk) -> None:
        """A chunk of the primary's chat answer."""
        self._text.append(chunk.delta)
        if chunk.HasField("usage"):
            self._done(SideOutcome(time.perf_counter() - self._started, chunk.usage.prompt_tokens,
                                   chunk.usage.completion_tokens, text="".join(self._text),
                                   greedy=self._greedy))

    def embedded(self, reply: inference_pb2.EmbedResponse) -> None:
        """The primary's embedding reply."""
        self._done(SideOutcome(time.perf_counter() - self._started, reply.usage.prompt_tokens,
                               vectors=[list(e.values) for e in reply.embeddings]))

    def ended(self) -> None:
        """The primary ended; without an answer, its copies count for the shadow alone."""
        if not self.outcome.done():
            self.outcome.cancel()

    def _done(self, outcome: SideOutcome) -> None:
        if not self.outcome.done():
            self.outcome.set_result(outcome)


class Mirror:
    """Starts the copies of one router's route requests."""

    def __init__(self, traffic: ShadowTraffic, resolve: Resolve,
                 is_loaded: Callable[[str], bool]) -> None:
        self.traffic = traffic
        self._resolve = resolve
        self._is_loaded = is_loaded
        self._starting: set[asyncio.Task[None]] = set()

    def copy(self, route: RouteSpec | None, request: R, send: Send[R], *, answering: str,
             started: float, greedy: bool = True) -> PrimarySide | None:
        """Copy `request` to each of the route's shadows its sample draws, but the asset
        `answering` it (a shadow that is also a target compares only with the others); the
        `PrimarySide` to feed with the primary's answer, or None when nothing was copied."""
        if route is None or not route.shadow:
            return None
        drawn = [s for s in route.shadow if self.traffic.sampled(s)]
        if not drawn:
            return None
        primary = PrimarySide(greedy, started)
        starting = asyncio.ensure_future(self._start(route, drawn, request, send, primary, answering))
        self._starting.add(starting)
        starting.add_done_callback(self._starting.discard)
        return primary

    async def _start(self, route: RouteSpec, drawn: list[Shadow], request: R, send: Send[R],
                     primary: PrimarySide, answering: str) -> None:
        for shadow in drawn:
            try:
                record = await self._resolve(shadow.asset)
            except RoundhouseError as exc:
                # Counted under the name the route gives: it resolves to no asset now.
                log.info("route %s: shadow %s not copied: %s", route.asset_id, shadow.asset, exc)
                self.traffic.skipped(route.asset_id, shadow.asset, "unavailable")
                continue
            asset_id = record.spec.asset_id
            if asset_id == answering:
                continue
            if not shadow.wake and not self._is_loaded(asset_id):
                self.traffic.skipped(route.asset_id, asset_id, "asleep")
                continue
            copy = type(request)()
            copy.CopyFrom(request)

            def run(record: AssetRecord = record, copy: R = copy, wake: bool = shadow.wake,
                    ) -> Awaitable[SideOutcome]:
                return send(record, copy, wake)

            self.traffic.submit(route.asset_id, asset_id, primary.outcome, run)

    async def close(self) -> None:
        """Stop starting copies and cancel those running (router shutdown)."""
        for task in list(self._starting):
            task.cancel()
        await asyncio.gather(*self._starting, return_exceptions=True)
        await self.traffic.close()
