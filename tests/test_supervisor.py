"""The supervisor with real child processes: output, restarts, giving up, no orphans."""

from __future__ import annotations

import asyncio
import io
import re
import signal
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from services.cli.supervisor import ChildSpec, Supervisor
from services.common.embedded import wait_pid_gone

REPO_ROOT = Path(__file__).resolve().parents[1]


def python(code: str) -> list[str]:
    """argv running `code` in a fresh interpreter."""
    return [sys.executable, "-c", textwrap.dedent(code)]


STEADY = python("""
    import os, signal
    print("pid", os.getpid())
    signal.pause()
""")


class Output(io.StringIO):
    """The supervisor's output; a test waits for the lines it expects."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = asyncio.Event()

    def write(self, text: str) -> int:
        self._changed.set()
        return super().write(text)

    @property
    def lines(self) -> list[str]:
        return self.getvalue().splitlines()

    async def wait_for(self, holds: Callable[[list[str]], bool], timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while not holds(self.lines):
                self._changed.clear()
                await self._changed.wait()

    def pids(self, name: str) -> list[int]:
        """The pids children named `name` printed as `pid N`."""
        found = (re.fullmatch(rf"{name} *\| pid (\d+)", line) for line in self.lines)
        return [int(match[1]) for match in found if match]


async def test_a_crashed_child_is_restarted_and_reported() -> None:
    out = Output()
    crasher = ChildSpec("crasher", python("print('crasher up'); raise SystemExit(1)"))
    supervisor = Supervisor(
        [crasher, ChildSpec("steady", STEADY)], out=out, restart_delay=0.05, max_failures=100
    )
    await supervisor.start()
    try:
        await out.wait_for(lambda lines: lines.count("crasher | crasher up") >= 3)
        await out.wait_for(lambda lines: len(out.pids("steady")) == 1)
    finally:
        await supervisor.stop()
    reports = [line for line in out.lines if line.startswith("[supervisor] crasher")]
    assert reports[:2] == [
        "[supervisor] crasher exited with code 1; restarting in 0.05s",
        "[supervisor] crasher exited with code 1; restarting in 0.1s",
    ]
    assert len(out.pids("steady")) == 1


async def test_stop_leaves_no_process_behind() -> None:
    out = Output()
    parent = python("""
        import os, signal, subprocess, sys
        helper = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
        print("pid", os.getpid())
        print("pid", helper.pid)
        signal.pause()
    """)
    stubborn = python("""
        import os, signal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("pid", os.getpid())
        signal.pause()
    """)
    children = [ChildSpec("parent", parent), ChildSpec("stubborn", stubborn)]
    supervisor = Supervisor(children, out=out, grace=0.5)
    await supervisor.start()
    await out.wait_for(lambda _: len(out.pids("parent")) == 2 and len(out.pids("stubborn")) == 1)
    assert set(supervisor.pids) == {"parent", "stubborn"}

    await supervisor.stop()
    assert supervisor.pids == {}
    assert "[supervisor] stubborn still runs 0.5s after SIGTERM; killing it" in out.lines
    for pid in out.pids("parent") + out.pids("stubborn"):
        assert wait_pid_gone(pid, timeout=10), f"pid {pid} outlived the supervisor"


async def test_gives_up_on_a_child_that_keeps_failing() -> None:
    out = Output()
    failing = ChildSpec("failing", python("raise SystemExit(3)"))
    supervisor = Supervisor(
        [failing, ChildSpec("steady", STEADY)], out=out, restart_delay=0.01, max_failures=3
    )
    assert await asyncio.wait_for(supervisor.run(), timeout=30) == 1
    assert supervisor.gave_up_on == "failing"
    assert out.lines.count("[supervisor] failing exited with code 3; restarting in 0.01s") == 1
    assert (
        "[supervisor] failing exited with code 3; 3 times within 60s, giving up and stopping"
        " everything" in out.lines
    )
    assert supervisor.pids == {}
    for pid in out.pids("steady"):
        assert wait_pid_gone(pid, timeout=10)


SUPERVISOR_SCRIPT = """
import asyncio, sys
from services.cli.supervisor import ChildSpec, Supervisor
steady = ChildSpec("steady", sys.argv[1:])
sys.exit(asyncio.run(Supervisor([steady]).run()))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
async def test_children_go_when_the_supervisor_is_signalled(sig: signal.Signals) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SUPERVISOR_SCRIPT, *STEADY,
        cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout=20)
    match = re.fullmatch(rb"steady \| pid (\d+)\n", line)
    assert match, line
    child = int(match[1])

    proc.send_signal(sig)
    rest, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 0)
    assert wait_pid_gone(child, timeout=10)
    if sig != signal.SIGKILL:
        assert rest.decode().splitlines() == [
            "[supervisor] stopping: the services finish their work in flight (up to 10s); "
            "Ctrl-C again stops at once"]
