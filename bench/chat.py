"""Chat engine throughput: concurrent streams through `ChatEngine` vs one static batched `generate`.

Run: .venv/bin/python -m bench.chat [--device cuda] [--streams 8] [--max-tokens 64]

A random-weight model of SmolLM2-135M's shape (no weights to download) measures speed. Every
stream is forced to `--max-tokens`: the engine is given no end-of-sequence ids and
`generate` has `eos_token_id=None`, so neither stops early. Both run in this process on the
same prompts (random token ids, 24-40 tokens; `generate` left-pads them into one batch).
Reports tokens/s for 1 stream and for `--streams`, the ratio engine / `generate` (targets:
>= 0.9 for 1 stream, >= 0.8 for 8), and the time to first token of requests that join a
running batch (p50/p99). Each side runs `--rounds` times, alternated, and its best run counts.
The `--streams` ratio is printed last.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.results import record
from bench.stack import print_table
from services.worker.models.engine import BatchingSettings, ChatEngine
from services.worker.models.generation import Sampling

GREEDY = Sampling(temperature=0)


def smollm2_shaped(device: str) -> Any:
    """A random-weight Llama with SmolLM2-135M's shape (bf16 on CUDA, fp32 on CPU)."""
    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        tie_word_embeddings=True, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval().requires_grad_(False)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def prompts(n: int) -> list[list[int]]:
    """`n` prompts of random token ids, 24 to 40 tokens long."""
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(100, 49000, (24 + (i * 5) % 17,), generator=generator).tolist() for i in range(n)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def static_generate(model: Any, batch: list[list[int]], tokens: int, device: str) -> float:
    """Tokens/s of one `generate` call over the whole batch, left-padded."""
    width = max(map(len, batch))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
    with torch.inference_mode():
        _sync(device)
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens, do_sample=False)
        _sync(device)
        elapsed = time.perf_counter() - start
    assert out.shape[1] - width == tokens
    return len(batch) * tokens / elapsed


async def through_engine(engine: ChatEngine, batch: list[list[int]], tokens: int) -> float:
    """Tokens/s of the same prompts submitted together to the engine."""

    async def one(prompt: list[int]) -> int:
        return sum([len(ids) async for ids in engine.submit(prompt, GREEDY, tokens)])

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(p) for p in batch))
    elapsed = time.perf_counter() - start
    assert all(c == tokens for c in counts), counts
    return sum(counts) / elapsed


async def joining_ttft(engine: ChatEngine, streams: int, joiners: int) -> list[float]:
    """Seconds to first token of `joiners` requests, one after another, each joining `streams`
    long-running streams. The running streams ask for as many tokens as the cache budget allows
    with one joiner beside them (admission counts every request's whole `max_new`)."""
    held = prompts(streams)
    longest = max(len(p) for p in [*held, *prompts(joiners)])
    running_tokens = engine.capacity_tokens // (streams + 1) - longest - 2
    running = [engine.submit(p, GREEDY, running_tokens) for p in held]
    for stream in running:
        await anext(stream)  # all of them decode
    ttfts = []
    for prompt in prompts(joiners):
        start = time.perf_counter()
        stream = engine.submit(prompt, GREEDY, 2)
        await anext(stream)
        ttfts.append(time.perf_counter() - start)
        stream.cancel()
    for stream in running:
        stream.cancel()
    return ttfts


async def measure(model: Any, streams: int, tokens: int, device: str, rounds: int) -> None:
    """Run every measurement, print the table, the 8-stream ratio last, and record the figures."""
    engine = ChatEngine(model, 8192, [], BatchingSettings(max_requests_per_batch=max(16, streams + 1)))
    try:
        await through_engine(engine, prompts(2), 4)  # warm-up
        static_generate(model, prompts(2), 4, device)
        rows, ratios, figures = [], [], {}
        for n in (1, streams):
            batch = prompts(n)
            reference = ours = 0.0
            for _ in range(rounds):  # alternated, best of each: the cores may be shared
                reference = max(reference, static_generate(model, batch, tokens, device))
                ours = max(ours, await through_engine(engine, batch, tokens))
            ratios.append(ours / reference)
            rows.append([str(n), f"{reference:.1f}", f"{ours:.1f}", f"{ours / reference:.2f}"])
            figures[f"streams_{n}"] = {"generate_tokens_per_s": reference, "engine_tokens_per_s": ours,
                                       "ratio": ours / reference}
        ttft = await joining_ttft(engine, streams, 20)
    finally:
        await engine.close()
    print_table(
        f"Chat engine vs static generate, SmolLM2-135M shape (random weights), {device}, {tokens} forced tokens",
        ["streams", "generate tok/s", "engine tok/s", "ratio engine / generate"],
        rows,
    )
    q = statistics.quantiles(ttft, n=100, method="inclusive")
    print(f"\nTTFT joining {streams} running streams: p50 {q[49] * 1000:.0f} ms, p99 {q[98] * 1000:.0f} ms")
    print(f"ratio engine / generate, {streams} streams: {ratios[-1]:.2f}")
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else None
    record("chat", {"device": device, "gpu": gpu, "forced_tokens": tokens, "rounds": rounds, **figures,
                    f"ttft_joining_{streams}_streams_ms": {"p50": q[49] * 1000, "p99": q[98] * 1000}})


def main() -> None:
    """Parse the options and measure."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="alternated runs of each side; the best counts")
    args = parser.parse_args()
    model = smollm2_shaped(args.device)
    asyncio.run(measure(model, args.streams, args.max_tokens, args.device, args.rounds))


if __name__ == "__main__":
    main()
