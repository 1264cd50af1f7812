"""Router overhead: one short embed through router→worker vs the worker directly, over gRPC.

Run: .venv/bin/python -m bench.router_overhead [--calls 1000] [--model minilm|remote]
Target: <= 1 ms added at p50 and <= 3 ms at p99.

`--model minilm` (the default) embeds with the catalog's MiniLM in a `roundhouse up` of the
built-in catalog. `--model remote` embeds with a `runtime: openai` asset whose upstream is
`bench.upstream` (answers at once; the stack of `bench.gateway`): the worker's part is then a
fraction of a millisecond instead of MiniLM's ~12 ms, whose spread on a busy machine can hide
what the router adds.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import grpc

from bench.gateway import ASSET, remote_stack, upstream_server
from bench.results import record, summary
from bench.stack import Stack, print_table, running_stack
from roundhouse.v1 import inference_pb2, inference_pb2_grpc

MODEL = "all-minilm-l6-v2"




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




def main() -> None:
    """Measure and print p50/p99 for both paths and the difference."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--model", choices=("minilm", "remote"), default="minilm")
    args = parser.parse_args()
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
