"""Router overhead: one short embed through router→worker vs the worker directly, over gRPC.

Run: .venv/bin/python -m bench.router_overhead [--calls 1000]
Target: <= 2 ms added at p50.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import grpc

from bench.stack import print_table, running_stack
from roundhouse.v1 import inference_pb2, inference_pb2_grpc

MODEL = "all-minilm-l6-v2"


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def measure(router: str, worker: str, calls: int) -> tuple[list[float], list[float]]:
    """Latencies in ms of `calls` sequential embeds each way, interleaved to share conditions."""
    request = inference_pb2.EmbedRequest(
        model=MODEL, inputs=[inference_pb2.EmbedInput(text="a short input")]
    )
    async with grpc.aio.insecure_channel(router) as rc, grpc.aio.insecure_channel(worker) as wc:
        via_router = inference_pb2_grpc.InferenceStub(rc)
        direct = inference_pb2_grpc.InferenceStub(wc)
        await via_router.Embed(request, timeout=120)  # loads the model if asleep
        for _ in range(50):
            await via_router.Embed(request)
            await direct.Embed(request)
        routed, straight = [], []
        for _ in range(calls):
            start = time.perf_counter()
            await via_router.Embed(request)
            routed.append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            await direct.Embed(request)
            straight.append((time.perf_counter() - start) * 1000)
    return routed, straight


def main() -> None:
    """Measure and print p50/p99 for both paths and the difference."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=1000)
    args = parser.parse_args()
    with running_stack() as stack:
        routed, straight = asyncio.run(measure(stack.router_address, stack.worker_address,
                                               args.calls))
    rows = []
    for name, values in (("worker direct", straight), ("router -> worker", routed)):
        rows.append([name, f"{percentile(values, 50):.2f}", f"{percentile(values, 99):.2f}",
                     f"{statistics.mean(values):.2f}"])
    rows.append(["added by the router (target p50 <= 2 ms)",
                 f"{percentile(routed, 50) - percentile(straight, 50):.2f}",
                 f"{percentile(routed, 99) - percentile(straight, 99):.2f}",
                 f"{statistics.mean(routed) - statistics.mean(straight):.2f}"])
    print_table(f"Router overhead, Embed of one short input, {args.calls} calls each, ms",
                ["path", "p50", "p99", "mean"], rows)


if __name__ == "__main__":
    main()
