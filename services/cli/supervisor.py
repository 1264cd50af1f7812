"""Keep the service processes of `roundhouse up` running, and stop them all together.

Each child runs in a process group of its own: a terminal's Ctrl-C reaches only the
supervisor, which then stops the children (SIGTERM: each drains, finishing its work in flight)
and waits for them; a second Ctrl-C kills them at once. A stop reaches whatever a child
started too. When a child is gone, its group is SIGKILLed, so a service must stop its own
helpers before it exits. Children carry a parent-death signal (SIGTERM), so they go away
even when the supervisor is SIGKILLed. Every line relayed is scrubbed of secrets
(`services.common.secrets.redact`), whatever the child printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TextIO

from services.common.embedded import die_with_parent
from services.common.secrets import redact

_LINE_LIMIT = 1 << 20


@dataclass(frozen=True)
class ChildSpec:
    """One service process: its name in the output, its command line, extra environment."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    """Laid over the supervisor's own environment."""


class Supervisor:
    """Runs service processes, prefixes their output lines, restarts crashes, stops them all.

    A child that exits on its own is restarted after a delay that doubles with each exit in
    `failure_window` seconds (from `restart_delay` up to `max_restart_delay`); at
    `max_failures` exits within the window the supervisor gives up and stops everything.
    A stop sends SIGTERM, waits `grace` seconds (the children drain meanwhile), then SIGKILLs
    what is left; a second stop request SIGKILLs at once. Output lines are scrubbed of
    recognisable secrets and of each of `secrets` verbatim.
    """

    def __init__(
        self, children: Iterable[ChildSpec], *, out: TextIO | None = None, grace: float = 10.0,
        restart_delay: float = 0.5, max_restart_delay: float = 5.0, max_failures: int = 5,
        failure_window: float = 60.0, secrets: Iterable[str] = (),
    ) -> None:
        self.children = list(children)
        self.grace = grace
        self.restart_delay = restart_delay
        self.max_restart_delay = max_restart_delay
        self.max_failures = max_failures
        self.failure_window = failure_window
        self.gave_up_on: str | None = None
        """Name of the child that kept failing, once the supervisor gave up on it."""
        self._out = out
        self._width = max((len(child.name) for child in self.children), default=0)
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._forced = asyncio.Event()
        self._secrets = sorted(set(secrets), key=len, reverse=True)

    @property
    def pids(self) -> dict[str, int]:
        """Process ids of the children running now, by name."""
        return {name: p.pid for name, p in self._procs.items() if p.returncode is None}

    async def start(self) -> None:
        """Start every child and keep it running until `stop()`."""
        self._tasks = [asyncio.create_task(self._keep_running(c)) for c in self.children]

    def request_stop(self, *, at_once: bool = False) -> None:
        """Ask for a stop without waiting for it (safe from a signal handler); `at_once` kills
        every child now instead of letting it drain."""
        if at_once and not self._forced.is_set():
            self._forced.set()
            self.say("stopping at once")
        self._stopping.set()

    def _on_signal(self) -> None:
        self.request_stop(at_once=self._stopping.is_set())

    async def stop(self) -> None:
        """Stop every child (SIGTERM, `grace` seconds, SIGKILL) and wait until all are gone."""
        self._stopping.set()
        await asyncio.gather(*self._tasks)

    async def run(self) -> int:
        """Run until SIGINT, SIGTERM, `request_stop()` or giving up; 0, or 1 after giving up.
        A second SIGINT or SIGTERM while the children drain kills them at once."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal)
        try:
            await self.start()
            await self._stopping.wait()
            self.say(f"stopping: the services finish their work in flight (up to {self.grace:g}s); "
                     "Ctrl-C again stops at once")
            await self.stop()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        return 0 if self.gave_up_on is None else 1

    def say(self, message: str) -> None:
        """Write one line of the supervisor's own to the output."""
        self._write(f"[supervisor] {message}")

    async def _keep_running(self, child: ChildSpec) -> None:
        exits: deque[float] = deque()
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            outcome = await self._run_once(child)
            if outcome is None:
                return
            now = loop.time()
            exits.append(now)
            while now - exits[0] > self.failure_window:
                exits.popleft()
            if len(exits) >= self.max_failures:
                self.say(f"{child.name} {outcome}; {len(exits)} times within "
                         f"{self.failure_window:g}s, giving up and stopping everything")
                self.gave_up_on = child.name
                self._stopping.set()
                return
            delay = min(self.max_restart_delay, self.restart_delay * 2 ** (len(exits) - 1))
            self.say(f"{child.name} {outcome}; restarting in {delay:g}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=delay)

    async def _run_once(self, child: ChildSpec) -> str | None:
        """Run the child once; how it ended when on its own, None when we stopped it."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **child.env}
        try:
            proc = await asyncio.create_subprocess_exec(
                *child.argv, env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                limit=_LINE_LIMIT, start_new_session=True, preexec_fn=die_with_parent(),
            )
        except OSError as exc:
            return f"could not start ({exc})"
        self._procs[child.name] = proc
        assert proc.stdout is not None and proc.stderr is not None
        pumps = [asyncio.create_task(self._pump(child.name, s)) for s in (proc.stdout, proc.stderr)]
        exited = asyncio.create_task(proc.wait())
        stopping = asyncio.create_task(self._stopping.wait())
        await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        stopped_by_us = not exited.done()
        if stopped_by_us:
            _signal_group(proc.pid, signal.SIGTERM)
            forced = asyncio.create_task(self._forced.wait())
            await asyncio.wait({exited, forced}, timeout=self.grace, return_when=asyncio.FIRST_COMPLETED)
            forced.cancel()
            if not exited.done() and not self._forced.is_set():
                self.say(f"{child.name} still runs {self.grace:g}s after SIGTERM; killing it")
        _signal_group(proc.pid, signal.SIGKILL)
        await exited
        # A helper the child left behind may hold its pipes open: do not wait on it forever.
        _, late = await asyncio.wait(pumps, timeout=1.0)
        for pump in late:
            pump.cancel()
        if stopped_by_us or self._stopping.is_set():
            return None
        code = proc.returncode or 0
        return f"exited with code {code}" if code >= 0 else f"was killed by {_signame(-code)}"

    async def _pump(self, name: str, stream: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await stream.readline()
            except ValueError:
                self._write(f"{name:<{self._width}} | (line over {_LINE_LIMIT} bytes dropped)")
                continue
            if not line:
                return
            text = line.decode(errors="replace").rstrip("\r\n")
            self._write(f"{name:<{self._width}} | {text}")

    def _write(self, line: str) -> None:
        out = self._out or sys.stdout
        out.write(redact(line, self._secrets) + "\n")
        out.flush()


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _signame(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
