"""What must hold after every fault, each check returning its violations as sentences.

- No request hangs past its deadline, and every error is clean and says "try again later"
  (`chaos_load.judge`); a connection refused or reset is clean only for a request in flight
  while the router itself was dead (SIGKILLed and not yet answering again).
- No slot leaks: once the load stops, the worker has no request in flight or waiting.
- No operation runs twice: no two succeeded loads of one asset on one worker without an
  unload of it there, or the death of that worker's process, in between (a reload after the
  model's engine died there, reason `recover`, aside).
- No load is duplicated: the worker never lists one asset twice.
- Every event committed reaches JetStream: each outbox row is published and its `event_id`
  is the `Nats-Msg-Id` of a message in the `ROUNDHOUSE_EVENTS` stream.
- One `worker.down` per worker death: exactly one when the worker was killed or frozen, none
  otherwise (a NATS outage silences every heartbeat: at most one then).
- The supervisor restarts what died, and nothing else died.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg
import nats
from chaos_faults import Injection
from chaos_load import Outcome
from chaos_probe import Probe
from chaos_stack import REQUEST_TIMEOUT_S, SERVICES
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from polling import wait_until

from roundhouse.v1 import worker_pb2
from services.common.events import ALL_EVENTS, STREAM_NAME

HANG_SLACK_S = 3.0
"""Past the router's request deadline, this much more makes a request hung (the answer has to
travel, and two busy cores are slow)."""
WORKER_DOWN_SUBJECT = "roundhouse.events.worker.down."
LOADED_ON = re.compile(r"^loaded on (?P<worker>\S+) in ")
UNLOADED_FROM = re.compile(r"^unloaded from (?P<workers>.+) \(")


def hang_bound_s(injection: Injection) -> float:
    """The longest a request may take during this fault: the router's deadline and some slack,
    plus the freeze itself when the frozen process is the router."""
    fault = injection.fault
    frozen_router = fault.target == "router" and fault.action == "sigstop"
    return REQUEST_TIMEOUT_S + HANG_SLACK_S + (fault.hold_s if frozen_router else 0.0)


def request_violations(outcomes: list[Outcome], injection: Injection, router_back: float) -> list[str]:
    """Requests that hung or failed uncleanly, at most five of each kind of wrong."""
    bound = hang_bound_s(injection)
    router_dead = injection.fault.target == "router" and injection.fault.action == "sigkill"
    wrong: list[str] = []
    for o in outcomes:
        if o.verdict == "hang":
            wrong.append(f"{o.kind} {o.request_id} hung: {o.detail}")
        elif o.latency_s > bound:
            ended = "answered" if o.verdict == "ok" else f"ended ({o.detail})"
            wrong.append(f"{o.kind} {o.request_id} {ended} only after {o.latency_s:.1f} s, past its "
                         f"deadline ({REQUEST_TIMEOUT_S:g} s, {bound:g} s with slack)")
        elif o.verdict == "unclean":
            wrong.append(f"{o.kind} {o.request_id} failed uncleanly: {o.detail}")
        elif o.verdict == "misleading":
            wrong.append(f"{o.kind} {o.request_id} got an error that is not 'try again later': {o.detail}")
        elif o.verdict == "connection" and not (
                router_dead and o.ended >= injection.started and o.started <= (router_back or o.ended)):
            wrong.append(f"{o.kind} {o.request_id} lost its connection with the router alive: {o.detail}")
    return _at_most(wrong, 5)


async def duplicate_loads(dsn: str, worker_deaths: list[datetime], since: datetime) -> list[str]:
    """Pairs of succeeded loads of one asset on one worker, the second finished after `since`,
    with neither an unload of it there nor a death of the worker process between them."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT operation_id, type, asset_id, message, finished_at, params->>'reason' AS reason FROM operations "
            "WHERE status = 'succeeded' AND type IN ('load', 'unload') ORDER BY finished_at")
    finally:
        await conn.close()
    last_load: dict[tuple[str, str], asyncpg.Record] = {}
    wrong = []
    for row in rows:
        if (unloaded := UNLOADED_FROM.match(row["message"])) and row["type"] == "unload":
            for worker in unloaded["workers"].split(", "):
                last_load.pop((row["asset_id"], worker), None)
            continue
        if not (loaded := LOADED_ON.match(row["message"])):
            continue  # "already loaded on ...": nothing was loaded
        key = (row["asset_id"], loaded["worker"])
        before = last_load.get(key)
        if before is not None and row["finished_at"] >= since and row["reason"] != "recover" and not any(
                before["finished_at"] < t < row["finished_at"] for t in worker_deaths):
            wrong.append(f"{row['asset_id']} loaded twice on {loaded['worker']}: operations "
                         f"{before['operation_id']} ({before['message']}) and {row['operation_id']} "
                         f"({row['message']})")
        last_load[key] = row
    return wrong


async def leaked_slots(probe: Probe) -> list[str]:
    """Models that still count requests in flight or waiting at the worker, 10 s after the
    last request ended."""
    busy: list[str] = []

    async def idle() -> bool:
        info = await probe.worker_info()
        busy[:] = ["no answer"] if info is None else [
            f"{m.asset_id}: {m.in_flight} in flight, {m.waiting} waiting"
            for m in info.models if m.in_flight or m.waiting]
        return not busy

    try:
        await wait_until(idle, timeout=10, interval=0.2)
    except AssertionError:
        return [f"the worker still counts requests after the load stopped: {busy}"]
    return []


def worker_copies(info: worker_pb2.WorkerInfo | None) -> list[str]:
    """Assets the worker lists more than once."""
    if info is None:
        return ["the worker did not answer GetWorkerInfo"]
    counts = Counter(m.asset_id for m in info.models)
    return [f"the worker holds {n} copies of {asset}" for asset, n in counts.items() if n > 1]


@dataclass
class StreamRead:
    """The event stream's message ids read so far (it only grows: each read goes on from here)."""

    ids: set[str] = field(default_factory=set)
    subjects: list[tuple[int, str]] = field(default_factory=list)
    """Each message's stream sequence and subject."""
    last_seq: int = 0

    def worker_downs(self, after_seq: int) -> list[str]:
        """Subjects of the `worker.down` events after that sequence."""
        return [s for seq, s in self.subjects if seq > after_seq and s.startswith(WORKER_DOWN_SUBJECT)]


def worker_down_violations(injection: Injection, stream: StreamRead, before_seq: int) -> list[str]:
    """Anything but one `worker.down` for a worker death (see the module's docstring)."""
    fault, downs = injection.fault, stream.worker_downs(before_seq)
    expected = (1, 1) if fault.target == "worker" else (0, 1) if fault.target == "nats-server" else (0, 0)
    if expected[0] <= len(downs) <= expected[1]:
        return []
    want = "one" if expected == (1, 1) else "at most one" if expected[1] else "none"
    return [f"{len(downs)} worker.down events where {want} should be: {downs}"]


async def lost_events(dsn: str, nats_url: str, stream: StreamRead, after_id: int) -> tuple[list[str], int]:
    """Outbox rows not published within a bound, or (those after `after_id`) published but not
    in the stream; and the last row id checked."""
    conn = await asyncpg.connect(dsn)
    try:
        async def all_published() -> bool:
            return await conn.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0

        try:
            await wait_until(all_published, timeout=30, interval=0.2)
        except AssertionError:
            pending = await conn.fetch("SELECT event_id, subject, attempts FROM outbox "
                                       "WHERE published_at IS NULL ORDER BY id LIMIT 5")
            return [f"outbox row {r['event_id']} ({r['subject']}) unpublished after 30 s, "
                    f"{r['attempts']} failed attempts" for r in pending], after_id
        rows = await conn.fetch("SELECT id, event_id, subject FROM outbox WHERE id > $1 ORDER BY id", after_id)
    finally:
        await conn.close()
    await read_stream(nats_url, stream)
    missing = [f"outbox row {r['event_id']} ({r['subject']}) published but not in {STREAM_NAME}"
               for r in rows if str(r["event_id"]) not in stream.ids]
    return _at_most(missing, 5), max((r["id"] for r in rows), default=after_id)


async def read_stream(nats_url: str, stream: StreamRead) -> None:
    """Add the `Nats-Msg-Id` of every message of the event stream after `stream.last_seq`."""
    nc = await nats.connect(nats_url, connect_timeout=5, max_reconnect_attempts=3)
    try:
        js = nc.jetstream()
        last = (await js.stream_info(STREAM_NAME)).state.last_seq
        if last <= stream.last_seq:
            return
        subscription = await js.pull_subscribe(ALL_EVENTS, stream=STREAM_NAME, config=ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=stream.last_seq + 1,
            ack_policy=AckPolicy.NONE, headers_only=True, inactive_threshold=30))
        while stream.last_seq < last:
            for msg in await subscription.fetch(500, timeout=5):
                stream.last_seq = msg.metadata.sequence.stream
                stream.ids.add((msg.headers or {}).get("Nats-Msg-Id", ""))
                stream.subjects.append((stream.last_seq, msg.subject))
        await subscription.unsubscribe()
    finally:
        await nc.close()


def restart_violations(injection: Injection, new_lines: list[str]) -> list[str]:
    """The supervisor restarted the killed service (and said so); no other service died."""
    fault = injection.fault
    wrong = []
    if fault.action == "sigkill":
        said = f"[supervisor] {fault.target} was killed by SIGKILL; restarting in"
        if not any(line.startswith(said) for line in new_lines):
            wrong.append(f"the supervisor did not report restarting {fault.target}: {new_lines}")
    for name in SERVICES:
        if fault.action == "sigkill" and name == fault.target:
            continue
        wrong += [f"{name} died during the fault: {line}" for line in new_lines
                  if line.startswith(f"[supervisor] {name} ")]
    return wrong


def _at_most(wrong: list[str], count: int) -> list[str]:
    return wrong[:count] + ([f"... and {len(wrong) - count} more"] if len(wrong) > count else [])

