"""`roundhouse events`: tail lifecycle events from NATS, one readable line each."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Sequence
from datetime import datetime

import nats
import nats.errors
from google.protobuf import json_format
from google.protobuf.message import Message
from nats.aio.msg import Msg

from roundhouse.v1 import events_pb2
from services.common.events import ALL_EVENTS, SUBJECT_PREFIX, decode_event
from services.common.secrets import mask_url
from services.common.settings import CommonSettings

CONNECT_TIMEOUT_S = 5.0
# Fields of a detail that are byte counts, shown as KiB/MiB/GiB.
_BYTE_FIELDS = {"memory_bytes", "memory_budget_bytes", "bytes_done", "bytes_total"}
# Fields shown even when zero.
_ALWAYS_SHOWN = {"progress"}
# Fields too bulky for one line.
_SKIPPED_FIELDS = {"spec"}


def subject_pattern(pattern: str | None) -> str:
    """The NATS subject to tail: full subjects as given, `job.>` style ones under the prefix."""
    if not pattern:
        return ALL_EVENTS
    if pattern.startswith(f"{SUBJECT_PREFIX}.") or pattern == ">":
        return pattern
    return f"{SUBJECT_PREFIX}.{pattern}"


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{n}B"


def _figures(detail: Message) -> list[str]:
    figures: list[str] = []
    for field in detail.DESCRIPTOR.fields:
        name, value = field.name, getattr(detail, field.name)
        if name in _SKIPPED_FIELDS or (not value and name not in _ALWAYS_SHOWN):
            continue
        if name in _BYTE_FIELDS:
            shown = _size(value)
        elif field.enum_type is not None:
            shown = field.enum_type.values_by_number[value].name.split("_")[-1].lower()
        elif isinstance(value, float):
            shown = f"{value:.2f}"
        elif isinstance(value, Sequence) and not isinstance(value, str | bytes):
            shown = ",".join(str(v) for v in value)
        elif isinstance(value, str):
            shown = " ".join(value.split())
            shown = f'"{shown}"' if " " in shown else shown
        else:
            shown = str(value)
        figures.append(f"{name}={shown}")
    return figures


def format_event(event: events_pb2.Event) -> str:
    """`HH:MM:SS.mmm  type  job=... asset=...  figure=value ...` in local time."""
    when = event.time.ToDatetime().astimezone() if event.time.seconds else datetime.now()
    ids = [f"{label}={value}" for label, value in (
        ("job", event.job_id), ("asset", event.asset_id), ("worker", event.worker_id),
        ("request", event.request_id)) if value]
    detail_name = event.WhichOneof("detail")
    figures = _figures(getattr(event, detail_name)) if detail_name else []
    parts = [when.strftime("%H:%M:%S.%f")[:-3], event.type.ljust(16), " ".join(ids)]
    if figures:
        parts.append(" ".join(figures))
    return "  ".join(parts)


async def _quiet(_: Exception) -> None:
    """NATS connection errors: the CLI reports an unreachable server itself."""


async def _tail(url: str, subject: str) -> int:
    try:
        nc = await asyncio.wait_for(
            nats.connect(url, name="roundhouse-cli-events", connect_timeout=CONNECT_TIMEOUT_S,
                         max_reconnect_attempts=-1, error_cb=_quiet),
            2 * CONNECT_TIMEOUT_S,
        )
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        print(f"error: cannot reach NATS at {mask_url(url)} ({type(exc).__name__}); is `roundhouse up` running "
              "(or ROUNDHOUSE_NATS_URL set)?", file=sys.stderr)
        return 1

    async def on_message(msg: Msg) -> None:
        try:
            line = format_event(decode_event(msg.data))
        except json_format.ParseError:
            line = f"(undecodable message on {msg.subject})"
        except Exception as exc:  # a line per event, whatever a newer publisher sends
            line = f"(cannot show the message on {msg.subject}: {exc!r})"
        print(line, flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await nc.subscribe(subject, cb=on_message)
        await nc.flush()
        print(f"tailing {subject} on {mask_url(url)} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await nc.close()
    return 0


def tail_events(pattern: str | None = None) -> int:
    """Print every event on the subject pattern until Ctrl-C; 0 then, 1 if NATS is unreachable."""
    try:
        url = CommonSettings().resolved_nats_url()
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return asyncio.run(_tail(url, subject_pattern(pattern)))
