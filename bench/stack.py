"""Start a real `roundhouse up` (embedded Postgres and NATS, a temp home) for a benchmark, and
find the catalog models in the bench model store."""

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

from services.cli.bootstrap import admin_key_path
from services.cli.stack import CATALOG
from services.common.assetspec import AssetSpec
from services.common.documents import load_path
from services.common.embedded import free_port
from services.common.grpc_server import INTERNAL_TOKEN_KEY
from services.common.modelstore.store import ModelStore

READY_LINE = "Ctrl-C stops everything"


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
def running_stack(model_store: Path | None = None, timeout_s: float = 300) -> Iterator[Stack]:
    """`roundhouse up` in a throwaway home; the model store may be shared between runs."""
    home = Path(tempfile.mkdtemp(prefix="roundhouse-bench-"))
    os.chmod(home, 0o755)  # embedded Postgres runs as an unprivileged user
    store = model_store or bench_store()
    ports = {name: free_port() for name in ("registry", "router", "worker", "http", "jobs")}
    # Set rather than left to `roundhouse up`, which would make one the bench cannot see.
    token = secrets.token_urlsafe(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROUNDHOUSE_")}
    env.update({
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
                    f"127.0.0.1:{ports['worker']}", store, admin_key_path(home).read_text().strip(), token)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
        shutil.rmtree(home, ignore_errors=True)


def catalog_spec(asset_id: str) -> AssetSpec:
    """The spec of a model in the built-in catalog (`deploy/catalog`)."""
    for item in load_path(CATALOG):
        if item.spec.asset_id == asset_id:
            return item.spec
    raise KeyError(f"{asset_id} is not in the catalog {CATALOG}")


def catalog_folder(store: Path, asset_id: str) -> Path | None:
    """The folder a catalog model is installed in (the store keeps one folder per source),
    or None when the store does not hold it (complete)."""
    installed = ModelStore(store, []).installed(catalog_spec(asset_id))
    return installed.path if installed is not None else None


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """A plain aligned table."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    for row in [header, *rows]:
        print("  " + "  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True)))
