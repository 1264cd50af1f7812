"""Start a real `roundhouse up` (embedded Postgres and NATS, a temp home) for a benchmark."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from services.common.embedded import free_port

READY_LINE = "Ctrl-C stops everything"


@dataclass(frozen=True)
class Stack:
    """Addresses of a running stack."""

    http_url: str
    router_address: str
    worker_address: str
    model_store: Path


@contextmanager
def running_stack(model_store: Path | None = None, timeout_s: float = 300) -> Iterator[Stack]:
    """`roundhouse up` in a throwaway home; the model store may be shared between runs."""
    home = Path(tempfile.mkdtemp(prefix="roundhouse-bench-"))
    os.chmod(home, 0o755)  # embedded Postgres runs as an unprivileged user
    store = model_store or Path(os.environ.get("ROUNDHOUSE_BENCH_STORE",
                                               Path.home() / ".roundhouse" / "models"))
    ports = {name: free_port() for name in ("registry", "router", "worker", "http", "jobs")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROUNDHOUSE_")}
    env.update({
        "ROUNDHOUSE_HOME": str(home),
        "ROUNDHOUSE_MODEL_STORE": str(store),
        "ROUNDHOUSE_REGISTRY_ADDRESS": f"127.0.0.1:{ports['registry']}",
        "ROUNDHOUSE_ROUTER_ADDRESS": f"127.0.0.1:{ports['router']}",
        "ROUNDHOUSE_WORKER_ADDRESS": f"127.0.0.1:{ports['worker']}",
        "ROUNDHOUSE_WORKER_ADDRESSES": f'["127.0.0.1:{ports["worker"]}"]',
        "ROUNDHOUSE_HTTP_PORT": str(ports["http"]),
        "ROUNDHOUSE_JOBS_ADDRESS": f"127.0.0.1:{ports['jobs']}",
        "ROUNDHOUSE_LOG_LEVEL": "WARNING",
    })
    proc = subprocess.Popen([sys.executable, "-m", "services.cli.main", "up"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ready = threading.Event()
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if READY_LINE in line:
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not ready.wait(0.5):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("roundhouse up did not come up:\n" + "".join(lines[-40:]))
    try:
        yield Stack(f"http://127.0.0.1:{ports['http']}", f"127.0.0.1:{ports['router']}",
                    f"127.0.0.1:{ports['worker']}", store)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


def catalog_folder(store: Path, asset_id: str) -> Path:
    """The installed folder of a catalog model in the store."""
    return store / asset_id


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """A plain aligned table."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    for row in [header, *rows]:
        print("  " + "  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True)))
