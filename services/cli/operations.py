"""`roundhouse models install|rm|load|unload` and `roundhouse ops`: commands over the Jobs API."""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TextIO

import grpc

from roundhouse.v1 import jobs_pb2, jobs_pb2_grpc
from services.common.grpc_client import open_channel
from services.common.operation_names import STATUSES, TYPES, status_name, type_name
from services.jobs.settings import JobsSettings

TERMINAL = {jobs_pb2.OPERATION_STATUS_SUCCEEDED, jobs_pb2.OPERATION_STATUS_FAILED,
            jobs_pb2.OPERATION_STATUS_CANCELLED}
BAR_WIDTH = 30

JobsCall = Callable[[jobs_pb2_grpc.JobsStub], Awaitable[int]]


def _fail(lines: str) -> int:
    for line in lines.splitlines() or [""]:
        print(f"error: {line}", file=sys.stderr)
    return 1


def _run(call: JobsCall, address: str | None = None) -> int:
    """Open a channel to the jobs service, run `call` on its stub, map gRPC errors to exit 1."""
    settings = JobsSettings()
    address = address or settings.jobs_address

    async def go() -> int:
        async with open_channel(address, settings) as channel:
            return await call(jobs_pb2_grpc.JobsStub(channel))

    try:
        return asyncio.run(go())
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            return _fail(f"cannot reach the jobs service at {address}; is `roundhouse up` "
                         "running (or ROUNDHOUSE_JOBS_ADDRESS set)?")
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            return _fail(f"the jobs service at {address} refused the internal token; is "
                         "ROUNDHOUSE_INTERNAL_TOKEN the one its `roundhouse up` uses?")
        return _fail(exc.details() or exc.code().name)


class ProgressView:
    """Shows an operation's states: one redrawn bar on a terminal, plain lines otherwise."""

    def __init__(self, out: TextIO, tty: bool | None = None) -> None:
        self._out = out
        self._tty = out.isatty() if tty is None else tty
        self._last: tuple[int, int, str] | None = None
        self._drawn = False

    def show(self, op: jobs_pb2.Operation) -> None:
        """Show one state; repeated identical states are skipped."""
        key = (op.status, op.progress, op.message)
        if key == self._last:
            return
        self._last = key
        label = f"{type_name(op.type)} {op.asset_id}"
        if self._tty:
            filled = BAR_WIDTH * min(op.progress, 100) // 100
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            line = f"{label} [{bar}] {op.progress:3d}% {status_name(op.status)} {op.message}"
            width = shutil.get_terminal_size().columns - 1
            self._out.write("\r" + line[:width].ljust(width))
            self._drawn = True
        else:
            message = f" {op.message}" if op.message else ""
            self._out.write(f"{label}: {status_name(op.status)} {op.progress}%{message}\n")
        self._out.flush()

    def close(self) -> None:
        """End the redrawn line, if any."""
        if self._drawn:
            self._out.write("\n")
            self._out.flush()
            self._drawn = False


def outcome(op: jobs_pb2.Operation) -> int:
    """Report a finished operation: 0 if it succeeded, 1 (with an error line) otherwise."""
    what = f"operation {op.operation_id} ({type_name(op.type)} {op.asset_id})"
    if op.status == jobs_pb2.OPERATION_STATUS_SUCCEEDED:
        print(f"{what} succeeded")
        return 0
    if op.status == jobs_pb2.OPERATION_STATUS_FAILED:
        return _fail(f"{what} failed: {op.error or op.message or 'no reason given'}")
    if op.status == jobs_pb2.OPERATION_STATUS_CANCELLED:
        return _fail(f"{what} was cancelled")
    return _fail(f"{what} stopped being watched while {status_name(op.status)}")


async def _watch(stub: jobs_pb2_grpc.JobsStub, operation_id: str) -> int:
    view = ProgressView(sys.stdout)
    last: jobs_pb2.Operation | None = None
    try:
        async for state in stub.WatchOperation(
            jobs_pb2.GetOperationRequest(operation_id=operation_id)
        ):
            last = state
            view.show(state)
            if state.status in TERMINAL:
                break
    finally:
        view.close()
    if last is None:
        return _fail(f"operation {operation_id}: the jobs service sent no state")
    return outcome(last)


def submit(kind: str, asset_id: str, *, wait: bool, force: bool = False,
           address: str | None = None) -> int:
    """Submit an operation on `asset_id`; print its id, and with `wait` follow it to the end."""

    async def call(stub: jobs_pb2_grpc.JobsStub) -> int:
        op = await stub.SubmitOperation(jobs_pb2.SubmitOperationRequest(
            type=TYPES[kind], asset_id=asset_id, force=force), timeout=30)
        print(f"operation {op.operation_id} {status_name(op.status)}: {kind} {asset_id}",
              flush=True)
        if not wait:
            return 0
        return await _watch(stub, op.operation_id)

    return _run(call, address)


def watch(operation_id: str, address: str | None = None) -> int:
    """Follow an operation with a progress view; exit code as `outcome`."""
    return _run(lambda stub: _watch(stub, operation_id), address)


def cancel(operation_id: str, address: str | None = None) -> int:
    """Ask the jobs service to cancel an operation and print where it stands."""

    async def call(stub: jobs_pb2_grpc.JobsStub) -> int:
        op = await stub.CancelOperation(
            jobs_pb2.CancelOperationRequest(operation_id=operation_id), timeout=30)
        print(f"operation {op.operation_id} {status_name(op.status)}: "
              f"{type_name(op.type)} {op.asset_id}")
        return 0

    return _run(call, address)


def age(op: jobs_pb2.Operation, now: datetime) -> str:
    """How long ago the operation was created: `42s`, `5m`, `3h`, `2d`."""
    if not op.created_at.seconds:
        return "-"
    seconds = max(0, int((now - op.created_at.ToDatetime(UTC)).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def render_operations(ops: list[jobs_pb2.Operation], now: datetime | None = None) -> str:
    """The `ops ls` table."""
    now = now or datetime.now(UTC)
    table = [["ID", "TYPE", "ASSET", "STATUS", "PROGRESS", "AGE", "MESSAGE/ERROR"]]
    for op in ops:
        note = op.error or op.message or "-"
        table.append([op.operation_id, type_name(op.type), op.asset_id, status_name(op.status),
                      f"{op.progress}%", age(op, now), " ".join(note.split())])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n"
                   for row in table)


def list_operations(*, asset_id: str = "", status: str = "", kind: str = "", limit: int = 50,
                    address: str | None = None) -> int:
    """Print operations matching the filters, newest first, at most `limit` of them."""

    async def call(stub: jobs_pb2_grpc.JobsStub) -> int:
        ops: list[jobs_pb2.Operation] = []
        token = ""
        while len(ops) < limit:
            page = await stub.ListOperations(jobs_pb2.ListOperationsRequest(
                asset_id=asset_id, status=STATUSES.get(status, 0), type=TYPES.get(kind, 0),
                page_size=min(limit - len(ops), 500), page_token=token), timeout=30)
            ops += page.operations
            token = page.next_page_token
            if not token:
                break
        ops = ops[:limit]
        if ops:
            print(render_operations(ops), end="")
        else:
            print("no operations")
        return 0

    return _run(call, address)
