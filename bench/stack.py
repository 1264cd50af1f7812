"""Start a real `roundhouse up` (embedded Postgres and NATS, a temp home) for a benchmark, find
the catalog models in the bench model store, and measure the stack's resident memory."""

from __future__ import annotations

import os
import secrets
import shutil
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

import psutil

from services.cli.bootstrap import admin_key_path
from services.cli.stack import CATALOG
from services.common.assetspec import AssetSpec
from services.common.documents import load_path
from services.common.embedded import free_port
from services.common.grpc_interceptors import INTERNAL_TOKEN_KEY
from services.common.modelstore.store import ModelStore

READY_LINE = "Ctrl-C stops everything"
MIB = 1024 * 1024


@dataclass(frozen=True)
class Stack:
    """Addresses and credentials of a running stack.

    `admin_key` is the key `roundhouse up` wrote to its home (an API key that may call every
    route); `internal_token` the shared secret the registry, jobs and workers require.
    """

    http_url: str
    router_address: str
    worker_address: str
    model_store: Path
    admin_key: str
    internal_token: str
    pid: int = 0
    """The `roundhouse up` process (its children are the services, Postgres and NATS)."""

    @property
    def auth_headers(self) -> dict[str, str]:
        """HTTP headers that carry the admin key."""
        return {"Authorization": f"Bearer {self.admin_key}"}

    @property
    def key_metadata(self) -> tuple[tuple[str, str], ...]:
        """gRPC metadata for the router's `Inference` front: the admin key."""
        return (("authorization", f"Bearer {self.admin_key}"),)

    @property
    def internal_metadata(self) -> tuple[tuple[str, str], ...]:
        """gRPC metadata for the internal services (a worker called directly): the token."""
        return ((INTERNAL_TOKEN_KEY, self.internal_token),)

    def folder(self, asset_id: str) -> Path:
        """The store folder `roundhouse up` installed a catalog model in."""
        found = catalog_folder(self.model_store, asset_id)
        if found is None:
            raise RuntimeError(f"{asset_id} is not installed in {self.model_store}")
        return found


def bench_store() -> Path:
    """The model store benchmarks share: `ROUNDHOUSE_BENCH_STORE`, else `~/.roundhouse/models`."""
    return Path(os.environ.get("ROUNDHOUSE_BENCH_STORE", Path.home() / ".roundhouse" / "models"))


@contextmanager
def running_stack(
    model_store: Path | None = None, timeout_s: float = 300, *, catalog: Path | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[Stack]:
    """`roundhouse up` in a throwaway home; the model store may be shared between runs.

    `catalog` replaces the built-in catalog (`roundhouse up --catalog`), and `env` adds
    `ROUNDHOUSE_*` settings (say `ROUNDHOUSE_SOURCE_ROOTS` for a `path` source).
    """
    home = Path(tempfile.mkdtemp(prefix="roundhouse-bench-"))
    os.chmod(home, 0o755)  # embedded Postgres runs as an unprivileged user
    store = model_store or bench_store()
    ports = {name: free_port() for name in ("registry", "router", "worker", "http", "jobs")}
    # Set rather than left to `roundhouse up`, which would make one the bench cannot see.
    token = secrets.token_urlsafe(32)
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("ROUNDHOUSE_")}
    child_env.update({
        "ROUNDHOUSE_HOME": str(home),
        "ROUNDHOUSE_MODEL_STORE": str(store),
        "ROUNDHOUSE_INTERNAL_TOKEN": token,
        "ROUNDHOUSE_REGISTRY_ADDRESS": f"127.0.0.1:{ports['registry']}",
        "ROUNDHOUSE_ROUTER_ADDRESS": f"127.0.0.1:{ports['router']}",
        "ROUNDHOUSE_WORKER_ADDRESS": f"127.0.0.1:{ports['worker']}",
        "ROUNDHOUSE_WORKER_ADDRESSES": f'["127.0.0.1:{ports["worker"]}"]',
        "ROUNDHOUSE_HTTP_PORT": str(ports["http"]),
        "ROUNDHOUSE_JOBS_ADDRESS": f"127.0.0.1:{ports['jobs']}",
        "ROUNDHOUSE_LOG_LEVEL": "WARNING",
        **(env or {}),
    })
    command = [sys.executable, "-m", "services.cli.main", "up"]
    if catalog is not None:
        command += ["--catalog", str(catalog)]
    proc = subprocess.Popen(command, env=child_env,
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
                    f"127.0.0.1:{ports['worker']}", store, admin_key_path(home).read_text().strip(), token,
                    proc.pid)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
        shutil.rmtree(home, ignore_errors=True)


def catalog_spec(asset_id: str) -> AssetSpec:
    """The spec of a model in the built-in catalog (`deploy/catalog`)."""
    for item in load_path(CATALOG):
        if item.spec.asset_id == asset_id and isinstance(item.spec, AssetSpec):
            return item.spec
    raise KeyError(f"{asset_id} is not in the catalog {CATALOG}")


def catalog_folder(store: Path, asset_id: str) -> Path | None:
    """The folder a catalog model is installed in (the store keeps one folder per source),
    or None when the store does not hold it (complete)."""
    installed = ModelStore(store, []).installed(catalog_spec(asset_id))
    return installed.path if installed is not None else None


SERVICE_NAMES = ("registry", "router", "worker", "jobs")


def stack_processes(stack: Stack) -> dict[str, list[psutil.Process]]:
    """The processes of a running stack by part: each service (with any process it started),
    `postgres` (the embedded server and its backends) and `nats`."""
    parts: dict[str, list[psutil.Process]] = {}
    names: dict[int, str | None] = {}
    # One walk of the process table (each `children()` call is one): it runs every second.
    for proc in psutil.Process(stack.pid).children(recursive=True):
        try:
            parent, argv = proc.ppid(), proc.cmdline()
        except psutil.Error:
            continue
        if parent in names:  # started by a part: counted with it
            names[proc.pid] = names[parent]
        elif parent == stack.pid:
            name = next((n for n in SERVICE_NAMES if argv[-1:] == [n] and "services.cli.main" in argv), None)
            if name is None:
                executable = Path(argv[0]).name if argv else ""
                name = "postgres" if "postgres" in executable else "nats" if "nats" in executable else None
            names[proc.pid] = name
        part = names.get(proc.pid)
        if part is not None:
            parts.setdefault(part, []).append(proc)
    return parts


def resident_memory(stack: Stack, *, pss: bool = True) -> dict[str, dict[str, float]]:
    """Resident memory of each part of the stack now, in MiB: `rss` summed over the part's
    processes, `processes` their count, and with `pss` for Postgres also `pss` (its shared
    buffers are in the RSS of every backend that touched them; PSS counts them once, but reading
    it walks every mapping of every backend, which costs CPU)."""
    figures: dict[str, dict[str, float]] = {}
    for name, procs in stack_processes(stack).items():
        shared = pss and name == "postgres"
        rss = proportional = 0.0
        alive = 0
        for proc in procs:
            try:
                if shared:
                    info = proc.memory_full_info()
                    proportional += info.pss
                else:
                    info = proc.memory_info()
                rss += info.rss
                alive += 1
            except psutil.Error:  # a backend that ended meanwhile
                continue
        figures[name] = {"rss": rss / MIB, "processes": alive, **({"pss": proportional / MIB} if shared else {})}
    return figures


def cpu_seconds(stack: Stack) -> dict[str, float]:
    """CPU seconds (user + system) each part of the stack has used so far. The worker's main
    thread (its event loop: the gRPC servicer, detokenizing) is also given alone, as
    `worker loop`; `worker` counts all its threads (the engine's and torch's included)."""
    used: dict[str, float] = {}
    for name, procs in stack_processes(stack).items():
        for proc in procs:
            try:
                times = proc.cpu_times()
                used[name] = used.get(name, 0.0) + times.user + times.system
                if name == "worker" and proc.pid == procs[0].pid:
                    main = next(t for t in proc.threads() if t.id == proc.pid)
                    used["worker loop"] = main.user_time + main.system_time
            except (psutil.Error, StopIteration):
                continue
    return used


class MemorySampler:
    """Samples `resident_memory` (RSS only, which is cheap to read) every `interval_s` in a thread
    and keeps each figure's maximum."""

    def __init__(self, stack: Stack, interval_s: float = 2.0) -> None:
        self.peak: dict[str, dict[str, float]] = {}
        self._stack, self._interval = stack, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            for name, figures in resident_memory(self._stack, pss=False).items():
                peak = self.peak.setdefault(name, {})
                for key, value in figures.items():
                    peak[key] = max(peak.get(key, 0.0), value)
            if self._stop.wait(self._interval):
                return


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """A plain aligned table."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    for row in [header, *rows]:
        print("  " + "  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True)))
