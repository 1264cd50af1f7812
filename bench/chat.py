"""Chat streaming: 1 and 8 concurrent streams over HTTP vs in-process `generate`, same prompts.

Run: .venv/bin/python -m bench.chat [--max-tokens 64]
Reports aggregate tokens/s and time to first token (TTFT).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time

from bench.stack import print_table, running_stack

MODEL = "smollm2-135m-instruct"
PROMPTS = [
    "Explain in two sentences what a load balancer does.",
    "Write a short poem about trains at night.",
    "List three uses of a hash map.",
    "What is the capital of France, and why is it famous?",
    "Describe a roundhouse in railway terms.",
    "Give two tips for writing clear error messages.",
    "Why do databases use write-ahead logs?",
    "Summarise the plot of a heist film in three sentences.",
]


async def http_streams(base_url: str, n: int, max_tokens: int) -> tuple[float, float]:
    """Aggregate completion tokens/s and mean TTFT (s) of `n` concurrent streams."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=300)

    async def one(prompt: str, started: float) -> tuple[float, int]:
        ttft, tokens = 0.0, 0
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], stream=True,
            max_tokens=max_tokens, temperature=0, stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and not ttft:
                ttft = time.perf_counter() - started
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return ttft, tokens

    await one("warm up", time.perf_counter())
    start = time.perf_counter()
    results = await asyncio.gather(*(one(PROMPTS[i % len(PROMPTS)], start) for i in range(n)))
    elapsed = time.perf_counter() - start
    await client.close()
    return sum(t for _, t in results) / elapsed, statistics.mean(t for t, _ in results)


def in_process(folder: str, n: int, max_tokens: int) -> tuple[float, float]:
    """The same prompts through `generate` in this process (batched when n > 1)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                           tokenize=False, add_generation_prompt=True)
             for i in range(n)]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        model.generate(**tokenizer(["warm up"], return_tensors="pt"), max_new_tokens=2)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True) if n == 1 else None
    first: list[float] = []
    start = time.perf_counter()
    if streamer is not None:
        def watch() -> None:
            for piece in streamer:
                if piece and not first:
                    first.append(time.perf_counter() - start)
        threading.Thread(target=watch, daemon=True).start()
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=max_tokens, do_sample=False,
                             streamer=streamer, pad_token_id=tokenizer.pad_token_id)
    elapsed = time.perf_counter() - start
    new = out[:, batch["input_ids"].shape[1]:]
    tokens = int((new != tokenizer.pad_token_id).sum())
    if not first:  # batched generate has no per-token streamer: time one prefill + 1 token
        with torch.inference_mode():
            t0 = time.perf_counter()
            model.generate(**batch, max_new_tokens=1, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)
            first.append(time.perf_counter() - t0)
    return tokens / elapsed, first[0]


def main() -> None:
    """Measure 1 and 8 streams both ways and print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    rows = []
    with running_stack() as stack:
        for n in (1, 8):
            http_tps, http_ttft = asyncio.run(http_streams(stack.http_url, n, args.max_tokens))
            local_tps, local_ttft = in_process(str(stack.model_store / MODEL), n, args.max_tokens)
            rows.append([str(n), f"{local_tps:.1f}", f"{http_tps:.1f}", f"{local_ttft * 1000:.0f}",
                         f"{http_ttft * 1000:.0f}", f"{http_tps / local_tps:.2f}"])
    print_table(
        f"Chat, {MODEL}, max_tokens={args.max_tokens}, greedy",
        ["streams", "in-process tok/s", "HTTP tok/s", "in-process TTFT ms", "HTTP TTFT ms",
         "ratio HTTP / in-process"],
        rows,
    )


if __name__ == "__main__":
    main()
