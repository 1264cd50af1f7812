"""Gateway throughput and added latency: non-streaming chat to a `runtime: openai` asset whose
upstream is `bench.upstream` (answers at once), through the router vs that upstream directly.

Run: .venv/bin/python -m bench.gateway [--connections 64] [--seconds 10] [--calls 1000]
Targets: through the router >= 1,000 req/s with 0 errors for 64 concurrent clients, the load
generator on the same cores; one client at a time, <= 1 ms added at p50.

It starts `bench.upstream` in a process of its own and a `roundhouse up` whose catalog is the
one remote asset (no model weights: the worker only holds the upstream's address), then:

1. latency: one client, `--calls` sequential requests each way, interleaved (the router with
   the admin key, so its cached key check counts), p50/p99 of both and the difference;
2. throughput: `--connections` concurrent clients for `--seconds` against the upstream, then
   against the router: requests/s, errors (non-2xx and socket errors), p50/p99 under load,
   and the CPU each service spent per request;
3. memory: resident set of each service at idle, and the router's peak during the load.

The load generator is `wrk` (a Lua script sets the body) when it is on PATH; run as root with
apt-get available it is installed first. Otherwise an aiohttp client with pooled keep-alive
connections stands in; the table says which ran.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil
import yaml

from bench.results import percentile, record, summary
from bench.stack import SERVICE_NAMES, Stack, print_table, running_stack, stack_processes
from bench.upstream import VECTOR

ASSET = "bench-remote"
KEY_ENV = "OPENAI_API_KEY"
CHAT_PATH = "/v1/chat/completions"
BODY = orjson.dumps({"model": ASSET, "max_tokens": 16,
                     "messages": [{"role": "user", "content": "Say hello."}]})
EXPECTED_TEXT = "Hello there"




@contextmanager
def upstream_server() -> Iterator[tuple[str, psutil.Process]]:
    """`bench.upstream` in its own process while the block runs; its /v1 URL and process."""
    proc = subprocess.Popen([sys.executable, "-m", "bench.upstream"], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("listening on "):
            raise RuntimeError(f"bench.upstream did not start: {line!r}")
        yield line.removeprefix("listening on ").strip(), psutil.Process(proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)


def remote_asset(upstream_url: str) -> dict[str, Any]:
    """The asset the bench serves: `upstream_url` as an `openai` runtime (chat, and embeddings
    for `bench.router_overhead --model remote`), loaded at start, with room for every client at
    once (admission is not what this measures)."""
    return {"asset_id": ASSET, "interface": ["llm-runtime", "embedding-runtime"], "runtime": "openai",
            "source": {"kind": "url", "url": upstream_url, "api_key_env": KEY_ENV,
                       "upstream_model": "bench-upstream"},
            "lifecycle": {"desired": "running"},
            "metadata": {"embedding_dim": len(VECTOR)},
            "policy": {"max_concurrency": 1024, "max_queue": 1024, "queue_timeout_s": 30}}


@contextmanager
def remote_stack(upstream_url: str, timeout_s: float = 300) -> Iterator[tuple[Stack, dict[str, psutil.Process]]]:
    """`roundhouse up` (`bench.stack.running_stack`) with the remote asset as its whole catalog;
    the stack and its service processes by name."""
    with tempfile.TemporaryDirectory(prefix="roundhouse-bench-catalog-") as folder:
        catalog = Path(folder)
        (catalog / "remote.yaml").write_text(yaml.safe_dump(remote_asset(upstream_url)))
        key = {KEY_ENV: "sk-bench-" + secrets.token_hex(8)}  # the upstream takes any key
        with running_stack(timeout_s=timeout_s, catalog=catalog, env=key) as stack:
            # Each part's first process is the service itself; the rest are what it started.
            services = {name: processes[0] for name, processes in stack_processes(stack).items()
                        if name in SERVICE_NAMES}
            yield stack, services


async def wait_served(stack: Stack, timeout_s: float = 120) -> None:
    """Until the router answers a chat for the asset with the upstream's text."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(stack.http_url, headers=stack.auth_headers) as session:
        while True:
            async with session.post(CHAT_PATH, data=BODY,
                                    headers={"Content-Type": "application/json"}) as reply:
                body = await reply.read()
                if reply.status == 200:
                    text = orjson.loads(body)["choices"][0]["message"]["content"]
                    if text != EXPECTED_TEXT:
                        raise RuntimeError(f"unexpected answer through the router: {text!r}")
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the router did not serve {ASSET}: {reply.status} {body[:300]!r}")
            await asyncio.sleep(0.5)


async def sequential(stack: Stack, upstream_url: str, calls: int) -> tuple[list[float], list[float]]:
    """Latencies in ms of `calls` one-at-a-time chats each way, interleaved to share conditions:
    through the router (admin key) and to the upstream directly, each on one kept-alive
    connection."""
    headers = {"Content-Type": "application/json"}
    routed: list[float] = []
    straight: list[float] = []
    router = aiohttp.ClientSession(stack.http_url, headers={**headers, **stack.auth_headers},
                                   connector=aiohttp.TCPConnector(limit=1))
    direct = aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=1))
    target = upstream_url.rstrip("/").removesuffix("/v1") + CHAT_PATH
    async with router, direct:
        async def timed(session: aiohttp.ClientSession, url: str, into: list[float] | None) -> None:
            start = time.perf_counter()
            async with session.post(url, data=BODY) as reply:
                await reply.read()
                if reply.status != 200:
                    raise RuntimeError(f"{url} answered {reply.status}")
            if into is not None:
                into.append((time.perf_counter() - start) * 1000)

        for _ in range(100):
            await timed(router, CHAT_PATH, None)
            await timed(direct, target, None)
        for _ in range(calls):
            await timed(router, CHAT_PATH, routed)
            await timed(direct, target, straight)
    return routed, straight


@dataclass
class Load:
    """What one load run measured."""

    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p99_ms: float
    detail: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Requests per second."""
        return self.requests / self.seconds


def find_wrk() -> str | None:
    """The `wrk` binary: on PATH, or installed with apt-get when running as root; else None."""
    found = shutil.which("wrk")
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    print("installing wrk (apt-get install -y wrk) ...", flush=True)
    with suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True, timeout=600,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return shutil.which("wrk")


_DURATION_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(number) * _DURATION_UNITS[unit]


def run_wrk(wrk: str, url: str, headers: dict[str, str], connections: int, seconds: int) -> Load:
    """`wrk` with one thread (it needs no more here, and leaves the cores to what it measures)
    posting `BODY` over `connections` keep-alive connections for `seconds`."""
    lines = ['wrk.method = "POST"', f"wrk.body = [[{BODY.decode()}]]"]
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in {**headers, "Content-Type": "application/json"}.items()]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write("\n".join(lines) + "\n")
    try:
        out = subprocess.run([wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s",
                              script.name, url], check=True, capture_output=True, text=True).stdout
    finally:
        os.unlink(script.name)
    total = re.search(r"(\d+) requests in ([\d.]+)(\w+),", out)
    assert total is not None, out
    elapsed = float(total[2]) * (60 if total[3] == "m" else 1)
    detail = {"non_2xx": int(m[1]) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0}
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    for name, value in zip(("connect", "read", "write", "timeout"), sockets.groups() if sockets else (0,) * 4,
                           strict=True):
        detail[f"socket_{name}"] = int(value)
    p50 = re.search(r"50%\s+([\d.]+\w+)", out)
    p99 = re.search(r"99%\s+([\d.]+\w+)", out)
    assert p50 is not None and p99 is not None, out
    return Load(int(total[1]), elapsed, sum(detail.values()), _ms(p50[1]), _ms(p99[1]), detail)


async def run_clients(url: str, headers: dict[str, str], connections: int, seconds: int) -> Load:
    """The stand-in for `wrk`: `connections` aiohttp clients, each one request at a time on a
    pooled keep-alive connection, for `seconds`."""
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(headers={**headers, "Content-Type": "application/json"},
                                     connector=connector) as session:
        start = time.perf_counter()
        stop = start + seconds

        async def client() -> None:
            while (now := time.perf_counter()) < stop:
                try:
                    async with session.post(url, data=BODY) as reply:
                        await reply.read()
                        kind = "ok" if reply.status < 300 else "non_2xx"
                except aiohttp.ClientError:
                    kind = "socket"
                statuses[kind] = statuses.get(kind, 0) + 1
                latencies.append((time.perf_counter() - now) * 1000)

        await asyncio.gather(*(client() for _ in range(connections)))
        elapsed = time.perf_counter() - start
    errors = {k: v for k, v in statuses.items() if k != "ok"}
    return Load(len(latencies), elapsed, sum(errors.values()), percentile(latencies, 50),
                percentile(latencies, 99), errors)


def under_load(measure: Any, processes: dict[str, psutil.Process]) -> tuple[Load, dict[str, float], int]:
    """Run `measure()` while sampling the services: the Load, CPU seconds each spent, and the
    router's peak resident set in bytes."""
    before = {name: sum(p.cpu_times()[:2]) for name, p in processes.items()}
    peak = [processes["router"].memory_info().rss] if "router" in processes else [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            with suppress(psutil.Error, KeyError):
                peak[0] = max(peak[0], processes["router"].memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        load = measure()
    finally:
        done.set()
        sampler.join()
    cpu = {name: sum(p.cpu_times()[:2]) - before[name] for name, p in processes.items()}
    return load, cpu, peak[0]




def main() -> None:
    """Measure latency, throughput and memory, print the tables, record the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--no-wrk", action="store_true", help="use the aiohttp clients even if wrk is there")
    args = parser.parse_args()
    wrk = None if args.no_wrk else find_wrk()
    generator = (f"wrk ({wrk}), 1 thread" if wrk else
                 "aiohttp clients in this process (" + ("--no-wrk" if args.no_wrk else "wrk not found") + ")")

    def load(url: str, headers: dict[str, str]) -> Load:
        if wrk:
            return run_wrk(wrk, url, headers, args.connections, args.seconds)
        return asyncio.run(run_clients(url, headers, args.connections, args.seconds))

    with upstream_server() as (upstream_url, upstream_proc), remote_stack(upstream_url) as (stack, procs):
        asyncio.run(wait_served(stack))
        routed, straight = asyncio.run(sequential(stack, upstream_url, args.calls))
        time.sleep(2)  # let the stack settle before reading its idle memory
        idle_rss = {name: p.memory_info().rss for name, p in procs.items()}
        watched = {**procs, "upstream": upstream_proc}
        direct_url = upstream_url.rstrip("/").removesuffix("/v1") + CHAT_PATH
        direct_load, _, _ = under_load(lambda: load(direct_url, {}), watched)
        router_load, router_cpu, router_peak = under_load(
            lambda: load(stack.http_url + CHAT_PATH, stack.auth_headers), watched)

    direct, via = summary(straight), summary(routed)
    added = {stat: via[stat] - direct[stat] for stat in direct}
    print_table(f"Gateway latency, non-streaming chat to a remote (openai) asset, one client, "
                f"{args.calls} calls each way, ms", ["path", "p50", "p99", "mean"],
                [[name, *(f"{v:.2f}" for v in figures.values())]
                 for name, figures in (("upstream direct", direct), ("router -> upstream", via),
                                       ("added by the router (target p50 <= 1 ms)", added))])
    per_request = {name: 1000 * seconds / max(1, router_load.requests) for name, seconds in router_cpu.items()}
    print_table(f"Gateway throughput, {args.connections} concurrent clients, {args.seconds} s each, "
                f"load generator: {generator}", ["target", "req/s", "errors", "p50 ms", "p99 ms"],
                [["upstream direct", f"{direct_load.rate:.0f}", str(direct_load.errors),
                  f"{direct_load.p50_ms:.2f}", f"{direct_load.p99_ms:.2f}"],
                 ["router (target >= 1000 req/s, 0 errors)", f"{router_load.rate:.0f}",
                  str(router_load.errors), f"{router_load.p50_ms:.2f}", f"{router_load.p99_ms:.2f}"]])
    if router_load.errors:
        print(f"  errors through the router: {router_load.detail}")
    print("  CPU ms per request through the router: "
          + ", ".join(f"{name} {ms:.3f}" for name, ms in per_request.items()))
    mib = 1024 * 1024
    print_table("Resident memory, MiB", ["service", "idle", "router load peak"],
                [[name, f"{rss / mib:.0f}", f"{router_peak / mib:.0f}" if name == "router" else ""]
                 for name, rss in idle_rss.items()])
    record("gateway", {
        "asset": ASSET, "calls": args.calls, "connections": args.connections, "seconds": args.seconds,
        "load_generator": "wrk" if wrk else "aiohttp",
        "latency_upstream_direct_ms": direct, "latency_via_router_ms": via, "latency_added_ms": added,
        "load_upstream_direct": {"requests_per_s": direct_load.rate, "errors": direct_load.errors,
                                 "p50_ms": direct_load.p50_ms, "p99_ms": direct_load.p99_ms},
        "load_via_router": {"requests_per_s": router_load.rate, "errors": router_load.errors,
                            "error_detail": router_load.detail, "p50_ms": router_load.p50_ms,
                            "p99_ms": router_load.p99_ms},
        "cpu_ms_per_request_via_router": per_request,
        "rss_idle_mib": {name: rss / mib for name, rss in idle_rss.items()},
        "router_rss_peak_under_load_mib": router_peak / mib,
    })


if __name__ == "__main__":
    main()
