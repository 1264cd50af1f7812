"""Traces and GenAI metrics as an operator's collector receives them from real processes.

Registry, jobs service, worker and router run as `roundhouse` processes exporting over OTLP to
a receiver the test runs (`otlp_receiver`). A chat through the official client must arrive as
one trace: the router's front span at the root, resolve, key check, admission and dispatch
under it, and the worker's queue, prefill and decode under the worker's server span. A chat
that wakes its model must take the load operation into its trace: the jobs service's
operation span and the worker's load. The request id the client sent shows in every log.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from otlp_receiver import OtlpReceiver, ReceivedSpan, Trace, otlp_receiver
from polling import wait_until
from process_harness import ProcessStack, process_stack
from stack_harness import TINY_CHAT, TINY_EMBED, tiny_documents

from services.common.modelstore.store import ModelStore

CHAT_FRONT = "POST /v1/chat/completions"
SLEEPER = "tiny-sleeper"
"""The tiny chat model under a name of its own that only the wake test asks for."""
SERVER, CLIENT = 2, 3
"""OTLP span kinds (`opentelemetry.proto.trace.v1.Span.SpanKind`)."""
HELLO: list[Any] = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with otlp_receiver() as running:
        yield running


@pytest.fixture(scope="module")
async def stack(own_db: str, nats_url: str, store: ModelStore, sources: Path, receiver: OtlpReceiver,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ProcessStack]:
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_METRIC_EXPORT_INTERVAL": "500",
            "OTEL_SEMCONV_STABILITY_OPT_IN": "gen_ai_latest_experimental"}
    async with process_stack(own_db, nats_url, store.root, sources,
                             tmp_path_factory.mktemp("tracing"), otel) as running:
        chat = tiny_documents(sources)[0]
        await running.apply(*tiny_documents(sources), {**chat, "asset_id": SLEEPER, "aliases": []})
        async with httpx.AsyncClient(base_url=running.http_url, headers=running.admin_headers) as http:
            async def listed() -> bool:
                reply = await http.get("/v1/models")
                return reply.status_code == 200 and {TINY_CHAT, SLEEPER} <= {m["id"] for m in reply.json()["data"]}

            await wait_until(listed, timeout=30, interval=0.1)
        yield running


@pytest.fixture
async def client(stack: ProcessStack) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{stack.http_url}/v1", api_key=stack.admin_key,
                                  max_retries=0, timeout=120) as api:
        yield api


def request_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:12]}"


def fronted_by_router(names: set[str], before: set[str]) -> Any:
    """A trace that started after `before` (trace ids seen then), rooted at the router's chat
    front span, holding every span in `names`."""
    def holds(trace: Trace) -> bool:
        if not trace.spans or trace.spans[0].trace_id in before:
            return False
        roots = trace.roots()
        return (len(roots) == 1 and roots[0].name == CHAT_FRONT and roots[0].service == "router"
                and names <= trace.names)

    return holds


def seen_traces(receiver: OtlpReceiver) -> set[str]:
    return {s.trace_id for s in receiver.spans}


def logged(log: Path, text: str) -> Callable[[], bool]:
    """Whether `text` is in the log file yet."""
    return lambda: text in log.read_text()


def under(trace: Trace, span: ReceivedSpan, ancestor: ReceivedSpan) -> bool:
    return ancestor in trace.ancestors(span)


async def test_a_chat_that_wakes_its_model_traces_the_load_operation(
    stack: ProcessStack, client: openai.AsyncOpenAI, receiver: OtlpReceiver,
) -> None:
    before = seen_traces(receiver)
    rid = request_id("wake")
    # Nothing loads a model until asked (no reconciler): this first chat has to wake it.
    reply = await client.chat.completions.create(model=SLEEPER, messages=HELLO, max_tokens=4,
                                                 extra_headers={"x-request-id": rid})
    assert reply.choices[0].message.content is not None
    trace = await receiver.wait_for_trace(
        fronted_by_router({"wake", "operation load", "load", "decode"}, before))
    assert {"router", "jobs", "worker"} <= trace.services, trace.shape()
    root = trace.roots()[0]
    wake = trace.named("wake", "router")
    operation = trace.named("operation load", "jobs")
    load = trace.named("load", "worker")
    assert trace.parent(wake) == root, trace.shape()
    assert under(trace, operation, wake), trace.shape()
    assert under(trace, load, operation), trace.shape()
    for service in ("router", "jobs", "worker-0"):
        await wait_until(logged(stack.logs[service], rid), timeout=10, interval=0.1)


async def test_one_chat_is_one_trace_from_the_router_through_the_worker(
    client: openai.AsyncOpenAI, receiver: OtlpReceiver,
) -> None:
    await client.chat.completions.create(model=TINY_CHAT, messages=HELLO, max_tokens=1)  # awake
    before = seen_traces(receiver)
    rid = request_id("chat")
    raw = await client.chat.completions.with_raw_response.create(
        model=TINY_CHAT, messages=HELLO, max_tokens=6, temperature=0.5,
        extra_headers={"x-request-id": rid})
    assert raw.headers["x-request-id"] == rid
    reply = raw.parse()
    assert reply.usage is not None
    trace = await receiver.wait_for_trace(fronted_by_router(
        {"resolve", "key check", "admission", "dispatch", "queue", "prefill", "decode"}, before))
    assert {"router", "worker"} <= trace.services, trace.shape()
    assert "wake" not in trace.names, "the model was loaded already"
    root = trace.roots()[0]
    assert root.kind == SERVER
    for name in ("resolve", "key check", "admission", "dispatch"):
        assert trace.parent(trace.named(name, "router")) == root, trace.shape()
    dispatch = trace.named("dispatch", "router")
    assert dispatch.kind == CLIENT
    worker_server = trace.parent(trace.named("prefill", "worker"))
    assert worker_server is not None and worker_server.kind == SERVER, trace.shape()
    assert worker_server.service == "worker" and under(trace, worker_server, dispatch), trace.shape()
    for name in ("queue", "decode"):
        assert trace.parent(trace.named(name, "worker")) == worker_server, trace.shape()
    prefill, decode = trace.named("prefill", "worker"), trace.named("decode", "worker")
    assert prefill.end_ns <= decode.end_ns and prefill.start_ns <= decode.start_ns
    assert root.attributes["gen_ai.operation.name"] == "chat"
    assert root.attributes["gen_ai.request.model"] == TINY_CHAT
    assert root.attributes["gen_ai.response.model"] == TINY_CHAT
    assert root.attributes["gen_ai.usage.input_tokens"] == reply.usage.prompt_tokens
    assert root.attributes["gen_ai.usage.output_tokens"] == reply.usage.completion_tokens
    assert root.attributes["gen_ai.request.max_tokens"] == 6
    assert root.attributes["gen_ai.request.temperature"] == pytest.approx(0.5)


async def test_the_genai_metrics_are_exported_under_their_convention_names(
    client: openai.AsyncOpenAI, receiver: OtlpReceiver,
) -> None:
    await client.chat.completions.create(model=TINY_CHAT, messages=HELLO, max_tokens=5)
    await client.embeddings.create(model=TINY_EMBED, input=["one", "two"])
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="no-such-model", messages=HELLO, max_tokens=5)
    names = {"gen_ai.server.request.duration", "gen_ai.server.time_to_first_token",
             "gen_ai.server.time_per_output_token", "gen_ai.client.token.usage"}
    received = await receiver.wait_for_metrics(names)

    def exported_for_this_chat(name: str) -> bool:  # earlier tests' chats may have come first
        return any(p.service == "router" and p.value and p.attributes.get("gen_ai.request.model") == TINY_CHAT
                   and p.attributes.get("gen_ai.operation.name") == "chat" for p in receiver.metric(name))

    await wait_until(lambda: all(exported_for_this_chat(n) for n in names), timeout=30)
    received = {n: receiver.metric(n) for n in names}
    for name, points in received.items():
        chats = [p for p in points if p.service == "router" and p.value
                 and p.attributes.get("gen_ai.operation.name") == "chat"]
        assert chats, f"{name}: {points[-3:]}"
        assert TINY_CHAT in {p.attributes.get("gen_ai.request.model") for p in chats}, name
        assert {p.attributes.get("gen_ai.provider.name") for p in chats} == {"roundhouse"}, name
    token_types = {p.attributes.get("gen_ai.token.type") for p in received["gen_ai.client.token.usage"]
                   if p.value}
    assert {"input", "output"} <= token_types

    def duration_where(**attributes: str) -> bool:
        return any(p.value and attributes.items() <= p.attributes.items()
                   for p in receiver.metric("gen_ai.server.request.duration"))

    await wait_until(lambda: duration_where(**{"gen_ai.operation.name": "embeddings",
                                               "gen_ai.request.model": TINY_EMBED}), timeout=30)
    await wait_until(lambda: any("error.type" in p.attributes and p.value
                                 for p in receiver.metric("gen_ai.server.request.duration")), timeout=30)
