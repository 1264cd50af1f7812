"""Router overhead: one short embed through router→worker vs the worker directly, over gRPC.

Run: .venv/bin/python -m bench.router_overhead [--calls 1000] [--model minilm|remote] [--route]
Target: <= 1 ms added at p50 and <= 3 ms at p99.

`--model minilm` (the default) embeds with the catalog's MiniLM in a `roundhouse up` of the
built-in catalog. `--model remote` embeds with a `runtime: openai` asset whose upstream is
`bench.upstream` (answers at once; the stack of `bench.gateway`): the worker's part is then a
fraction of a millisecond instead of MiniLM's ~12 ms, whose spread on a busy machine can hide
what the router adds.

`--route` (with `--model remote`) also applies two routes over that asset, `<asset>-route`
(one target, no cache) and `<asset>-route-cached` (the same with `cache: {ttl_s: 600}`), and
measures, interleaved in the same run, the embed by the asset's own name, by the route and by
the cached route (every measured call a cache hit: embeddings are always cacheable, and the
router's cache counters are checked), each as ms added over the asset's own name.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import tempfile
import time
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import grpc
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.gateway import ASSET, KEY_ENV, remote_asset, remote_stack, upstream_server
from bench.results import record, summary
from bench.stack import Stack, print_table, running_stack
from roundhouse.v1 import inference_pb2, inference_pb2_grpc

MODEL = "all-minilm-l6-v2"
ROUTE = f"{ASSET}-route"
CACHED_ROUTE = f"{ASSET}-route-cached"
CACHE_TTL_S = 600
LOOKUPS = "roundhouse_response_cache_lookups"
"""The router's response cache counter (by route and result), read to check the hits."""


async def measure(stack: Stack, calls: int, model: str = MODEL) -> tuple[list[float], list[float]]:
    """Latencies in ms of `calls` sequential embeds each way, interleaved to share conditions.

    The router is called with the admin key (so its key check is part of what it adds), the
    worker with the internal token, both as per-call metadata.
    """
    request = inference_pb2.EmbedRequest(
        model=model, inputs=[inference_pb2.EmbedInput(text="a short input")]
    )
    key, token = stack.key_metadata, stack.internal_metadata
    async with grpc.aio.insecure_channel(stack.router_address) as rc, \
            grpc.aio.insecure_channel(stack.worker_address) as wc:
        via_router = inference_pb2_grpc.InferenceStub(rc)
        direct = inference_pb2_grpc.InferenceStub(wc)
        await via_router.Embed(request, metadata=key, timeout=120)  # loads the model if asleep
        for _ in range(50):
            await via_router.Embed(request, metadata=key)
            await direct.Embed(request, metadata=token)
        routed, straight = [], []
        for _ in range(calls):
            start = time.perf_counter()
            await via_router.Embed(request, metadata=key)
            routed.append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            await direct.Embed(request, metadata=token)
            straight.append((time.perf_counter() - start) * 1000)
    return routed, straight


def route_documents() -> list[dict[str, Any]]:
    """The two routes `--route` measures, over the remote asset alone."""
    route = {"asset_id": ROUTE, "class": "route", "interface": "embedding-runtime",
             "targets": [{"asset": ASSET}]}
    return [route, {**route, "asset_id": CACHED_ROUTE, "cache": {"ttl_s": CACHE_TTL_S}}]


@contextmanager
def route_stack(upstream_url: str) -> Iterator[Stack]:
    """`roundhouse up` whose catalog is the remote asset (`bench.gateway.remote_asset`) and the
    routes over it."""
    with tempfile.TemporaryDirectory(prefix="roundhouse-bench-catalog-") as folder:
        catalog = Path(folder) / "remote.yaml"
        catalog.write_text(yaml.safe_dump_all([remote_asset(upstream_url), *route_documents()]))
        key = {KEY_ENV: "sk-bench-" + secrets.token_hex(8)}  # the upstream takes any key
        with running_stack(catalog=catalog, env=key) as stack:
            yield stack


async def cache_lookups(stack: Stack, route_id: str) -> dict[str, float]:
    """The router's response cache lookups for `route_id` so far, by result (hit, miss)."""
    async with aiohttp.ClientSession(stack.http_url, headers=stack.auth_headers) as session, \
            session.get("/metrics") as reply:
        reply.raise_for_status()
        text = await reply.text()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == LOOKUPS:
            for sample in family.samples:
                if sample.name == f"{LOOKUPS}_total" and sample.labels.get("route") == route_id:
                    found[sample.labels["result"]] = sample.value
    return found


class Embedder(Protocol):
    """One short embed on one path."""

    def __call__(self, timeout: float | None = None) -> Awaitable[inference_pb2.EmbedResponse]: ...


def embedder(stub: inference_pb2_grpc.InferenceStub, model: str,
             metadata: tuple[tuple[str, str], ...]) -> Embedder:
    """An embed of one short input named for `model`, sent through `stub` with `metadata`."""
    request = inference_pb2.EmbedRequest(model=model, inputs=[inference_pb2.EmbedInput(text="a short input")])

    def send(timeout: float | None = None) -> Awaitable[inference_pb2.EmbedResponse]:
        return stub.Embed(request, metadata=metadata, timeout=timeout)

    return send


async def measure_routes(stack: Stack, calls: int) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Latencies in ms of `calls` rounds of one embed each: to the worker directly, and through
    the router by the asset's name, by the route and by the cached route; the paths take turns
    leading a round, so none is always first after the pause between rounds. Also the cached
    route's cache lookups during the measured rounds, by result (all hits, or the run fails)."""
    key, token = stack.key_metadata, stack.internal_metadata
    async with grpc.aio.insecure_channel(stack.router_address) as rc, \
            grpc.aio.insecure_channel(stack.worker_address) as wc:
        via_router, direct = inference_pb2_grpc.InferenceStub(rc), inference_pb2_grpc.InferenceStub(wc)
        paths = {"worker direct": embedder(direct, ASSET, token), "asset": embedder(via_router, ASSET, key),
                 "route": embedder(via_router, ROUTE, key),
                 "cached route": embedder(via_router, CACHED_ROUTE, key)}
        # Through the router first: the asset may still be loading on the worker.
        for name in ("asset", "route", "cached route", "worker direct"):
            reply = await paths[name](timeout=120)
            if reply.asset_id != ASSET:
                raise RuntimeError(f"{name}: answered by {reply.asset_id!r}, not {ASSET!r}")
        for _ in range(50):  # warm up; the cached route's first answer is kept meanwhile
            for send in paths.values():
                await send()
        before = await cache_lookups(stack, CACHED_ROUTE)
        latencies: dict[str, list[float]] = {name: [] for name in paths}
        order = list(paths)
        for n in range(calls):
            for name in order[n % len(order):] + order[:n % len(order)]:
                start = time.perf_counter()
                await paths[name]()
                latencies[name].append((time.perf_counter() - start) * 1000)
        after = await cache_lookups(stack, CACHED_ROUTE)
    lookups = {result: round(after.get(result, 0.0) - before.get(result, 0.0)) for result in ("hit", "miss")}
    if lookups != {"hit": calls, "miss": 0}:
        raise RuntimeError(f"the cached route's measured calls were not all cache hits: {lookups}")
    return latencies, lookups


def report_routes(calls: int) -> None:
    """`--route`: measure, print and record the four paths and what each route adds."""
    with upstream_server() as (upstream_url, _), route_stack(upstream_url) as stack:
        latencies, lookups = asyncio.run(measure_routes(stack, calls))
    figures = {name: summary(values) for name, values in latencies.items()}
    asset = figures["asset"]

    def over(base: dict[str, float], of: str) -> dict[str, float]:
        return {stat: figures[of][stat] - base[stat] for stat in base}

    added = {"router": over(figures["worker direct"], "asset"), "route": over(asset, "route"),
             "cached route": over(asset, "cached route")}
    rows = [[name, *(f"{v:.2f}" for v in values.values())] for name, values in (
        ("worker direct", figures["worker direct"]), (f"router -> worker ({ASSET})", asset),
        (f"route ({ROUTE}, one target)", figures["route"]),
        (f"cached route ({CACHED_ROUTE}, hits)", figures["cached route"]),
        ("added by the router over the worker", added["router"]),
        ("added by the route over the asset's name", added["route"]),
        ("added by the cached route (hit) over the asset's name", added["cached route"]))]
    print_table(f"Route overhead, Embed of one short input, {calls} rounds of each path "
                f"interleaved, ms", ["path", "p50", "p99", "mean"], rows)
    record("router_overhead", {
        "model": ASSET, "calls": calls, "routes": True, "worker_direct_ms": figures["worker direct"],
        "via_router_ms": asset, "added_ms": added["router"], "route_ms": figures["route"],
        "cached_route_ms": figures["cached route"], "route_added_ms": added["route"],
        "cached_route_added_ms": added["cached route"], "cached_route_lookups": lookups})


def main() -> None:
    """Measure and print p50/p99 for both paths and the difference."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--model", choices=("minilm", "remote"), default="minilm")
    parser.add_argument("--route", action="store_true",
                        help="also measure a route and a cached route over the asset (needs --model remote)")
    args = parser.parse_args()
    if args.route:
        if args.model != "remote":
            parser.error("--route needs --model remote (MiniLM's own spread would hide what a route adds)")
        report_routes(args.calls)
        return
    model = MODEL if args.model == "minilm" else ASSET
    if args.model == "minilm":
        with running_stack() as stack:
            routed, straight = asyncio.run(measure(stack, args.calls, model))
    else:
        with upstream_server() as (upstream_url, _), remote_stack(upstream_url) as (stack, _):
            routed, straight = asyncio.run(measure(stack, args.calls, model))
    direct, via = summary(straight), summary(routed)
    added = {stat: via[stat] - direct[stat] for stat in direct}
    rows = [[name, *(f"{v:.2f}" for v in figures.values())]
            for name, figures in (("worker direct", direct), ("router -> worker", via),
                                  ("added by the router (target p50 <= 1, p99 <= 3 ms)", added))]
    print_table(f"Router overhead, Embed of one short input with {model}, {args.calls} calls each, ms",
                ["path", "p50", "p99", "mean"], rows)
    record("router_overhead", {"model": model, "calls": args.calls, "worker_direct_ms": direct,
                               "via_router_ms": via, "added_ms": added})


if __name__ == "__main__":
    main()
