"""One request's line in the usage ledger, filled in as the request goes through the router.

The tokens are the worker's count when it reports one (the last chunk of a stream, an
embedding's reply). A request that stops before that (the client went away, the worker
failed mid-stream, an upstream that reports no usage) is charged what it is known to have
used: its estimated prompt (see `limits.estimate`) plus the completion streamed so far, at
its characters / 4 rounded up but never fewer tokens than chunks that carried text (a worker
sends at least one token per chunk). A request that
never produced output is charged its prompt only if the client left once a worker had it (the
worker may have read the prompt); one that a worker refused or failed costs nothing.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from decimal import Decimal

from roundhouse.v1 import inference_pb2
from services.common.asset_proto import AssetRecord
from services.common.errors import status_of
from services.router.limits.estimate import Estimate, chars_tokens, cost
from services.router.limits.limiter import Reservation


class UsageTicket:
    """What the ledger records of one request: who, which model, tokens, cost, timings."""

    __slots__ = ("at", "started", "request_id", "key_id", "route", "interface", "asset",
                 "prompt_tokens", "completion_tokens", "first_token_s", "status", "woke",
                 "latency_s", "reservation", "estimate", "dispatched", "reported",
                 "streamed_chunks", "streamed_chars", "ended", "cache", "route_id", "reached",
                 "inputs")

    def __init__(self, key_id: str, route: str, interface: str, request_id: str) -> None:
        self.at = datetime.now(UTC)
        self.started = time.perf_counter()
        self.request_id, self.key_id, self.route, self.interface = (
            request_id, key_id, route, interface)
        self.asset: AssetRecord | None = None
        self.prompt_tokens = self.completion_tokens = 0
        self.first_token_s: float | None = None
        self.latency_s = 0.0
        self.status = "ok"
        self.woke = False
        self.reservation: Reservation | None = None
        """What the limits reserved for the request, settled when it ends."""
        self.estimate: Estimate | None = None
        """What the request was estimated to use before it ran."""
        self.dispatched = self.reported = self.ended = False
        self.streamed_chunks = self.streamed_chars = 0
        self.cache = ""
        """For a route with a response cache: `hit` (answered from it, no tokens used) or
        `miss`."""
        self.route_id = ""
        """The route the client named (by id or alias); empty when it named a model."""
        self.reached = False
        """Whether a model was tried for the request (`asset` is then the last one tried, or
        the one that answered); a request refused before that has reached none."""
        self.inputs = 0
        """An embedding request's number of inputs."""

    def mark_woke(self) -> None:
        """The request had to wake its model."""
        self.woke = True

    def mark_dispatched(self) -> None:
        """A worker was asked to run the request."""
        self.dispatched = True

    def chunk(self, chunk: inference_pb2.ChatChunk) -> None:
        """A chunk of the answer arrived: the first one times the first token; its text (and
        its tool calls' names and arguments) counts until the worker reports the usage."""
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.started
        chars = len(chunk.delta) + sum(len(p.name) + len(p.arguments) for p in chunk.tool_calls)
        if chars:
            self.streamed_chunks += 1
            self.streamed_chars += chars
        if chunk.HasField("usage"):
            self.used(chunk.usage)

    def used(self, usage: inference_pb2.Usage) -> None:
        """The tokens the worker reports."""
        self.prompt_tokens, self.completion_tokens = usage.prompt_tokens, usage.completion_tokens
        self.reported = True

    def failed(self, exc: BaseException) -> None:
        """The request ended with `exc`."""
        self.status = status_of(exc)

    @property
    def tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    @property
    def cost_usd(self) -> Decimal:
        """What the tokens cost at the answering asset's prices."""
        pricing = self.asset.spec.pricing if self.asset is not None else None
        return cost(pricing, self.prompt_tokens, self.completion_tokens)

    def finish(self) -> None:
        """The request is over: its latency stops here, and without the worker's count its
        tokens are what it is known to have used (see the module's docstring). Only the first
        call counts."""
        if self.ended:
            return
        self.ended = True
        self.latency_s = time.perf_counter() - self.started
        if self.reported:
            return
        if self.streamed_chunks or (self.dispatched and self.status == "cancelled"):
            self.prompt_tokens, self.completion_tokens = self.used_so_far()

    def used_so_far(self) -> tuple[int, int]:
        """The prompt and completion tokens the request is known to have used: the worker's
        count once reported, else the estimated prompt and the completion streamed so far."""
        if self.reported:
            return self.prompt_tokens, self.completion_tokens
        return (self.estimate.prompt_tokens if self.estimate is not None else 0,
                max(self.streamed_chunks, chars_tokens(self.streamed_chars)))

    def mark_cached(self) -> None:
        """The request was answered from the response cache: no model ran, no tokens used."""
        self.cache = "hit"
        self.first_token_s = time.perf_counter() - self.started

    def row(self) -> tuple[object, ...]:
        """The ledger row, in `COLUMNS` order."""
        return (self.at, self.request_id, self.key_id,
                self.asset.spec.asset_id if self.asset is not None else "", self.route,
                self.interface, self.prompt_tokens, self.completion_tokens, self.cost_usd,
                self.latency_s * 1000,
                None if self.first_token_s is None else self.first_token_s * 1000,
                self.status, self.woke, self.cache)


COLUMNS = ("at", "request_id", "key_id", "asset_id", "route", "interface", "prompt_tokens",
           "completion_tokens", "cost_usd", "latency_ms", "ttft_ms", "status", "woke", "cache")
