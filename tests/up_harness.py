"""`roundhouse up` as a child process for end-to-end tests: its output lines as they come, its
environment on free ports, and what an operator reads from it (the admin key, `models ls`)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from queue import Empty, Queue

import psutil

from services.common.embedded import free_port

READY_LINE = "Ctrl-C stops everything"


class UpProcess:
    """A `roundhouse up` child whose output lines are collected as they come."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli.main", "up"], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: Queue[str] = Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float) -> None:
        """Read output lines until one holds `text` (AssertionError after `timeout` s or an exit)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except Empty:
                if self.proc.poll() is not None:
                    break
                continue
            self.seen.append(line)
            if text in line:
                return
        raise AssertionError(f"{text!r} not printed; output:\n" + "\n".join(self.seen[-60:]))

    def interrupt(self, timeout: float = 60) -> int:
        """Ctrl-C: its exit code, once every descendant is gone."""
        descendants = psutil.Process(self.proc.pid).children(recursive=True)
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout)
        gone, alive = psutil.wait_procs(descendants, timeout=10)
        assert not alive, f"orphans left behind: {[p.pid for p in alive]}"
        return code


def up_environment(home: Path, store: Path) -> dict[str, str]:
    """This process's environment without ROUNDHOUSE_ settings, plus a home, a model store and
    free ports for every service."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROUNDHOUSE_")}
    ports = {name: free_port() for name in ("registry", "router", "worker", "http", "jobs")}
    env.update({
        "ROUNDHOUSE_HOME": str(home),
        "ROUNDHOUSE_MODEL_STORE": str(store),
        "ROUNDHOUSE_REGISTRY_ADDRESS": f"127.0.0.1:{ports['registry']}",
        "ROUNDHOUSE_ROUTER_ADDRESS": f"127.0.0.1:{ports['router']}",
        "ROUNDHOUSE_WORKER_ADDRESS": f"127.0.0.1:{ports['worker']}",
        "ROUNDHOUSE_WORKER_ADDRESSES": f'["127.0.0.1:{ports["worker"]}"]',
        "ROUNDHOUSE_HTTP_PORT": str(ports["http"]),
        "ROUNDHOUSE_JOBS_ADDRESS": f"127.0.0.1:{ports['jobs']}",
        "ROUNDHOUSE_JOBS_METRICS_PORT": str(free_port()),  # the worker's: one `up` picks
    })
    return env


def models_ls(env: dict[str, str]) -> str:
    """`roundhouse models ls` against the stack of `env`."""
    done = subprocess.run([sys.executable, "-m", "services.cli.main", "models", "ls"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def admin_key(up: UpProcess, env: dict[str, str]) -> str:
    """The admin key `roundhouse up` wrote: its path printed, the file private, the key never
    printed."""
    path = Path(env["ROUNDHOUSE_HOME"]) / "admin.key"
    assert any(f"admin key in {path}" in line for line in up.seen), up.seen
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = path.read_text().strip()
    assert key.startswith("rh-") and not any(key in line for line in up.seen)
    return key
