"""Embeddings throughput: 64 concurrent HTTP clients vs the same model in-process (batches of 32).

Run: .venv/bin/python -m bench.embeddings [--requests 1536]
Target: HTTP throughput >= 0.85 of in-process throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

import aiohttp

from bench.results import record
from bench.stack import print_table, running_stack

SUBJECTS = ["The operator", "A small model", "The router", "Every worker", "Our database",
            "The queue", "A tired engineer", "The cluster", "This request", "The scheduler"]
VERBS = ["loads", "evicts", "serves", "measures", "streams", "batches", "restarts", "routes"]
OBJECTS = ["the embedding model", "a sleeping language model", "thousands of tokens",
           "the nightly report", "a burst of traffic", "the quarterly figures", "every event"]
TAILS = ["before lunch.", "without losing a request.", "on two small cores.",
         "while the cache warms up.", "after the deploy finished.", "in under a second."]

CLIENTS = 64
MODEL = "all-minilm-l6-v2"


def sentences(n: int, seed: int = 7) -> list[str]:
    """`n` varied English sentences."""
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TAILS)}"
            for _ in range(n)]


async def through_http(base_url: str, headers: dict[str, str], texts: list[str]) -> float:
    """Sentences per second with CLIENTS clients, one sentence per request.

    aiohttp keeps the load generator's own CPU use small (it shares the machine's cores
    with the stack); each client holds one keep-alive connection.
    """
    queue: asyncio.Queue[str] = asyncio.Queue()
    for text in texts:
        queue.put_nowait(text)
    connector = aiohttp.TCPConnector(limit=CLIENTS)
    async with aiohttp.ClientSession(base_url, connector=connector, headers=headers) as session:
        async def embed(text: str) -> None:
            async with session.post("/v1/embeddings", json={"model": MODEL, "input": text}) as reply:
                reply.raise_for_status()
                await reply.read()

        async def one_client() -> None:
            while not queue.empty():
                await embed(queue.get_nowait())

        await embed("warm up")
        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(CLIENTS)))
        return len(texts) / (time.perf_counter() - start)


def in_process(folder: str, texts: list[str]) -> float:
    """Sentences per second from the same model folder, encode() with batches of 32."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(folder, device="cpu")
    model.encode(texts[:32], batch_size=32)
    start = time.perf_counter()
    model.encode(texts, batch_size=32)
    return len(texts) / (time.perf_counter() - start)


def main() -> None:
    """Run both measurements in one run and print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=1536)
    args = parser.parse_args()
    texts = sentences(args.requests)
    with running_stack() as stack:
        http_rate = asyncio.run(through_http(stack.http_url, stack.auth_headers, texts))
        local_rate = in_process(str(stack.folder(MODEL)), texts)
    print_table(
        f"Embeddings, {MODEL}, {len(texts)} sentences",
        ["path", "sentences/s"],
        [["in-process encode(batch_size=32)", f"{local_rate:.1f}"],
         [f"HTTP API, {CLIENTS} concurrent clients", f"{http_rate:.1f}"],
         ["ratio HTTP / in-process (target >= 0.85)", f"{http_rate / local_rate:.2f}"]],
    )
    record("embeddings", {"model": MODEL, "sentences": len(texts), "clients": CLIENTS,
                          "in_process_sentences_per_s": local_rate, "http_sentences_per_s": http_rate,
                          "ratio": http_rate / local_rate})


if __name__ == "__main__":
    main()
