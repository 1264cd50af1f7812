"""Bad input over gRPC, RPC by RPC, for every service: registry, jobs, worker, the router's front.

Empty, ill-formed, oversized, negative, non-finite and unknown-enum values are refused with
INVALID_ARGUMENT and a message that names the field (NOT_FOUND when an id is well-formed but
unknown; RESOURCE_EXHAUSTED for a message over the front's size limit), never INTERNAL or
UNKNOWN, and the service goes on serving. The router's front refuses what the HTTP API
refuses, with the same caps (`services.common.inference_requests`). Every service is real and
in-process (`stack_harness.running_stack`), on Postgres and NATS.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from stack_harness import TINY_CHAT, TINY_EMBED, Stack, asset_message, tiny_spec

from roundhouse.v1 import asset_pb2, inference_pb2, jobs_pb2, registry_pb2, worker_pb2
from services.common.inference_requests import (
    MAX_INPUT_TOKENS,
    MAX_MESSAGES,
    MAX_REQUEST_ID_CHARS,
    MAX_TEXT_CHARS,
    MAX_TOOLS,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
HUGE = "x" * 1_000_000
"""A string far longer than any field takes, yet well inside every gRPC message limit."""
UNKNOWN_ENUM = 99
MIB = 1024 * 1024

Call = Callable[[Stack], Any]


async def answer(call: Any) -> Any:
    """The reply of a unary call, or every message of a streaming one."""
    if hasattr(call, "__aiter__"):
        return [item async for item in call]
    return await call


async def assert_refused(call: Any, code: grpc.StatusCode, field: str) -> None:
    """The call fails with `code`, in a message that names `field` and stays short."""
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await answer(call)
    details = failed.value.details() or ""
    assert failed.value.code() == code, (failed.value.code(), details[:300])
    assert field in details, details[:300]
    assert len(details) < 8192, "the message echoes the input whole"


def spec(**fields: Any) -> asset_pb2.AssetSpec:
    """A valid `AssetSpec` message (a chat model from PyPI) with fields changed: a dict
    replaces that sub-message, a list is added to that repeated field, a value is set."""
    message = asset_pb2.AssetSpec(
        asset_id="bad-input", interfaces=[asset_pb2.INTERFACE_LLM_RUNTIME],
        source=asset_pb2.Source(kind=asset_pb2.SOURCE_KIND_PYPI, package="some-model"))
    for name, value in fields.items():
        if isinstance(value, dict):
            getattr(message, name).CopyFrom(type(getattr(message, name))(**value))
        elif isinstance(value, list):
            getattr(message, name).extend(value)
        else:
            setattr(message, name, value)
    return message


def apply(*specs: asset_pb2.AssetSpec) -> Call:
    """A dry-run apply of `specs` (nothing is written, whatever happens)."""
    return lambda s: s.registry.stub.ApplyAssets(registry_pb2.ApplyAssetsRequest(
        assets=[registry_pb2.AssetApply(spec=x) for x in specs], dry_run=True))


def far_future() -> Timestamp:
    """A `Timestamp` past the year 9999, which no RFC 3339 text can state."""
    stamp = Timestamp()
    stamp.seconds = 2**62
    return stamp


REGISTRY: list[tuple[str, Call, grpc.StatusCode, str]] = [
    ("apply nothing", lambda s: s.registry.stub.ApplyAssets(registry_pb2.ApplyAssetsRequest()),
     INVALID, "assets"),
    ("apply an empty spec", apply(asset_pb2.AssetSpec()), INVALID, "assets[0].spec.asset_id"),
    ("apply an ill-formed id", apply(spec(asset_id="Not An Id")), INVALID, "assets[0].spec.asset_id"),
    ("apply a huge id", apply(spec(asset_id=HUGE)), INVALID, "assets[0].spec.asset_id"),
    ("apply a huge name", apply(spec(display_name=HUGE)), INVALID, "assets[0].spec.display_name"),
    ("apply an unknown interface", apply(spec(interfaces=[UNKNOWN_ENUM])), INVALID, "assets[0].spec.interface"),
    ("apply an unknown runtime", apply(spec(runtime=UNKNOWN_ENUM)), INVALID, "assets[0].spec.runtime"),
    ("apply an unknown source kind", apply(spec(source={"kind": UNKNOWN_ENUM})), INVALID,
     "assets[0].spec.source.kind"),
    ("apply a negative concurrency", apply(spec(policy={"max_concurrency": -1})), INVALID,
     "assets[0].spec.policy.max_concurrency"),
    ("apply a NaN timeout", apply(spec(policy={"queue_timeout_s": math.nan})), INVALID,
     "assets[0].spec.policy.queue_timeout_s"),
    ("apply an infinite memory", apply(spec(resources={"min_vram_gb": math.inf})), INVALID,
     "assets[0].spec.resources.min_vram_gb"),
    ("apply 10,000 aliases", apply(spec(aliases=[f"a{i}" for i in range(10_000)])), INVALID,
     "assets[0].spec.aliases"),
    ("apply 5,000 invalid specs", apply(*[spec(asset_id="") for _ in range(5_000)]), INVALID,
     "assets[0].spec.asset_id"),
    ("apply 5,000 copies", apply(*[spec() for _ in range(5_000)]), INVALID, "assets[1].spec.asset_id"),
    ("get no id", lambda s: s.registry.stub.GetAsset(registry_pb2.GetAssetRequest()), INVALID, "asset_id"),
    ("get an ill-formed id", lambda s: s.registry.stub.GetAsset(registry_pb2.GetAssetRequest(
        asset_id="../etc")), INVALID, "asset_id"),
    ("get a huge id", lambda s: s.registry.stub.GetAsset(registry_pb2.GetAssetRequest(asset_id=HUGE)),
     INVALID, "asset_id"),
    ("get an unknown id", lambda s: s.registry.stub.GetAsset(registry_pb2.GetAssetRequest(
        asset_id="no-such-asset")), NOT_FOUND, "no-such-asset"),
    ("list with a bad token", lambda s: s.registry.stub.ListAssets(registry_pb2.ListAssetsRequest(
        page_token="bogus")), INVALID, "page_token"),
    ("list with a huge token", lambda s: s.registry.stub.ListAssets(registry_pb2.ListAssetsRequest(
        page_token=HUGE)), INVALID, "page_token"),
    ("list by an unknown capability", lambda s: s.registry.stub.ListAssets(registry_pb2.ListAssetsRequest(
        capability="telepathy")), INVALID, "capability"),
    ("list by a huge label", lambda s: s.registry.stub.ListAssets(registry_pb2.ListAssetsRequest(
        labels={HUGE: "x"})), INVALID, "labels"),
    ("delete no id", lambda s: s.registry.stub.DeleteAsset(registry_pb2.DeleteAssetRequest()), INVALID,
     "asset_id"),
    ("delete an ill-formed id", lambda s: s.registry.stub.DeleteAsset(registry_pb2.DeleteAssetRequest(
        asset_id="Tiny Chat")), INVALID, "asset_id"),
    ("delete an unknown id", lambda s: s.registry.stub.DeleteAsset(registry_pb2.DeleteAssetRequest(
        asset_id="no-such-asset")), NOT_FOUND, "no-such-asset"),
    ("resolve a huge name", lambda s: s.registry.stub.ResolveAsset(registry_pb2.ResolveAssetRequest(
        name=HUGE)), INVALID, "name"),
    ("resolve by an unknown interface", lambda s: s.registry.stub.ResolveAsset(registry_pb2.ResolveAssetRequest(
        name=TINY_CHAT, interface=UNKNOWN_ENUM)), INVALID, "interface"),
    ("report for no id", lambda s: s.registry.stub.ReportAssetStatus(registry_pb2.ReportAssetStatusRequest()),
     INVALID, "asset_id"),
    ("report an unknown state", lambda s: s.registry.stub.ReportAssetStatus(registry_pb2.ReportAssetStatusRequest(
        asset_id=TINY_CHAT, status=asset_pb2.AssetStatus(state=UNKNOWN_ENUM))), INVALID, "status.state"),
    ("report an impossible time", lambda s: s.registry.stub.ReportAssetStatus(registry_pb2.ReportAssetStatusRequest(
        asset_id=TINY_CHAT, status=asset_pb2.AssetStatus(last_used_at=far_future()))), INVALID,
     "status.last_used_at"),
    ("report an impossible detection time", lambda s: s.registry.stub.ReportAssetStatus(
        registry_pb2.ReportAssetStatusRequest(asset_id=TINY_CHAT, capabilities=asset_pb2.Capabilities(
            detected_at=far_future()))), INVALID, "capabilities.detected_at"),
    ("report a huge store path", lambda s: s.registry.stub.ReportAssetStatus(registry_pb2.ReportAssetStatusRequest(
        asset_id=TINY_CHAT, status=asset_pb2.AssetStatus(store_path=HUGE))), INVALID, "status.store_path"),
    ("report 100,000 workers", lambda s: s.registry.stub.ReportAssetStatus(registry_pb2.ReportAssetStatusRequest(
        asset_id=TINY_CHAT, status=asset_pb2.AssetStatus(worker_ids=["w"] * 100_000))), INVALID,
     "status.worker_ids"),
]

JOBS: list[tuple[str, Call, grpc.StatusCode, str]] = [
    ("submit no type", lambda s: s.jobs.stub.SubmitOperation(jobs_pb2.SubmitOperationRequest(
        asset_id=TINY_CHAT)), INVALID, "type"),
    ("submit an unknown type", lambda s: s.jobs.stub.SubmitOperation(jobs_pb2.SubmitOperationRequest(
        type=UNKNOWN_ENUM, asset_id=TINY_CHAT)), INVALID, "type"),
    ("submit for no asset", lambda s: s.jobs.stub.SubmitOperation(jobs_pb2.SubmitOperationRequest(
        type=jobs_pb2.OPERATION_TYPE_LOAD)), INVALID, "asset_id"),
    ("submit for an ill-formed asset", lambda s: s.jobs.stub.SubmitOperation(jobs_pb2.SubmitOperationRequest(
        type=jobs_pb2.OPERATION_TYPE_LOAD, asset_id="Tiny Chat")), INVALID, "asset_id"),
    ("submit for a huge asset id", lambda s: s.jobs.stub.SubmitOperation(jobs_pb2.SubmitOperationRequest(
        type=jobs_pb2.OPERATION_TYPE_LOAD, asset_id=HUGE)), INVALID, "asset_id"),
    ("submit with a huge key", lambda s: s.jobs.stub.SubmitOperation(jobs_pb2.SubmitOperationRequest(
        type=jobs_pb2.OPERATION_TYPE_UNLOAD, asset_id=TINY_CHAT, idempotency_key=HUGE)), INVALID,
     "idempotency_key"),
    ("submit for a huge worker id", lambda s: s.jobs.stub.SubmitOperation(jobs_pb2.SubmitOperationRequest(
        type=jobs_pb2.OPERATION_TYPE_UNLOAD, asset_id=TINY_CHAT, worker_id=HUGE)), INVALID, "worker_id"),
    ("submit for an unknown asset", lambda s: s.jobs.stub.SubmitOperation(jobs_pb2.SubmitOperationRequest(
        type=jobs_pb2.OPERATION_TYPE_LOAD, asset_id="no-such-asset")), NOT_FOUND, "no-such-asset"),
    ("get no operation", lambda s: s.jobs.stub.GetOperation(jobs_pb2.GetOperationRequest()), INVALID,
     "operation_id"),
    ("get a huge operation id", lambda s: s.jobs.stub.GetOperation(jobs_pb2.GetOperationRequest(
        operation_id=HUGE)), INVALID, "operation_id"),
    ("get an unknown operation", lambda s: s.jobs.stub.GetOperation(jobs_pb2.GetOperationRequest(
        operation_id="00000000-0000-4000-8000-000000000000")), NOT_FOUND, "not found"),
    ("list with a bad token", lambda s: s.jobs.stub.ListOperations(jobs_pb2.ListOperationsRequest(
        page_token="bogus")), INVALID, "page_token"),
    ("list by a huge asset id", lambda s: s.jobs.stub.ListOperations(jobs_pb2.ListOperationsRequest(
        asset_id=HUGE)), INVALID, "asset_id"),
    ("cancel no operation", lambda s: s.jobs.stub.CancelOperation(jobs_pb2.CancelOperationRequest()), INVALID,
     "operation_id"),
    ("cancel an unknown operation", lambda s: s.jobs.stub.CancelOperation(jobs_pb2.CancelOperationRequest(
        operation_id="00000000-0000-4000-8000-000000000000")), NOT_FOUND, "not found"),
    ("watch no operation", lambda s: s.jobs.stub.WatchOperation(jobs_pb2.GetOperationRequest(), timeout=10),
     INVALID, "operation_id"),
    ("watch an unknown operation", lambda s: s.jobs.stub.WatchOperation(jobs_pb2.GetOperationRequest(
        operation_id="00000000-0000-4000-8000-000000000000"), timeout=10), NOT_FOUND, "not found"),
    ("ensure no asset", lambda s: s.jobs.stub.EnsureLoaded(jobs_pb2.EnsureLoadedRequest()), INVALID, "asset_id"),
    ("ensure an ill-formed asset", lambda s: s.jobs.stub.EnsureLoaded(jobs_pb2.EnsureLoadedRequest(
        asset_id="Tiny Chat")), INVALID, "asset_id"),
    ("ensure with a negative wait", lambda s: s.jobs.stub.EnsureLoaded(jobs_pb2.EnsureLoadedRequest(
        asset_id=TINY_EMBED, wait_s=-1)), INVALID, "wait_s"),
    ("ensure with a NaN wait", lambda s: s.jobs.stub.EnsureLoaded(jobs_pb2.EnsureLoadedRequest(
        asset_id=TINY_EMBED, wait_s=math.nan)), INVALID, "wait_s"),
    ("ensure with an endless wait", lambda s: s.jobs.stub.EnsureLoaded(jobs_pb2.EnsureLoadedRequest(
        asset_id=TINY_EMBED, wait_s=math.inf)), INVALID, "wait_s"),
]


def broken_asset(stack: Stack) -> asset_pb2.Asset:
    """The tiny chat model's `Asset`, its spec without an id."""
    asset = asset_message(tiny_spec(stack.sources, TINY_CHAT))
    asset.spec.asset_id = ""
    return asset


WORKER: list[tuple[str, Call, grpc.StatusCode, str]] = [
    ("load nothing", lambda s: s.workers[0].control.LoadModel(worker_pb2.LoadModelRequest()), INVALID, "asset"),
    ("load a spec without id", lambda s: s.workers[0].control.LoadModel(worker_pb2.LoadModelRequest(
        asset=broken_asset(s))), INVALID, "asset_id"),
    ("unload no id", lambda s: s.workers[0].control.UnloadModel(worker_pb2.UnloadModelRequest()), INVALID,
     "asset_id"),
    ("unload a huge id", lambda s: s.workers[0].control.UnloadModel(worker_pb2.UnloadModelRequest(
        asset_id=HUGE)), INVALID, "asset_id"),
    ("unload an unknown id", lambda s: s.workers[0].control.UnloadModel(worker_pb2.UnloadModelRequest(
        asset_id="no-such-asset")), NOT_FOUND, "no-such-asset"),
]


CONTROL = {"registry": REGISTRY, "jobs": JOBS, "worker": WORKER}
"""Bad input to each service's own RPCs, by service."""


@pytest.mark.parametrize(("call", "code", "field"), [
    pytest.param(*case[1:], id=f"{service}: {case[0]}") for service, cases in CONTROL.items() for case in cases])
async def test_each_service_refuses_bad_input_naming_the_field(
    stack: Stack, call: Call, code: grpc.StatusCode, field: str
) -> None:
    await assert_refused(call(stack), code, field)
    await still_serves(stack)


async def test_a_huge_reported_message_is_kept_cut(stack: Stack) -> None:
    before = await stack.registry_asset(TINY_EMBED)
    reply = await stack.registry.stub.ReportAssetStatus(registry_pb2.ReportAssetStatusRequest(
        asset_id=TINY_EMBED, status=asset_pb2.AssetStatus(message=HUGE)))
    assert 1000 < len(reply.status.message) < len(HUGE) and reply.status.message.startswith("xxx")
    assert reply.status.state == before.status.state, "a report without a state changes none"


def chat(**fields: Any) -> inference_pb2.ChatRequest:
    """A chat request for the tiny model (a few tokens), with fields replaced."""
    values: dict[str, Any] = {"model": TINY_CHAT, "max_tokens": 2,
                              "messages": [inference_pb2.ChatMessage(role="user", content="hello")]}
    return inference_pb2.ChatRequest(**{**values, **fields})


def embed(*inputs: inference_pb2.EmbedInput, **fields: Any) -> inference_pb2.EmbedRequest:
    """An embedding request for the tiny model (one short text unless given), fields replaced."""
    values: dict[str, Any] = {"model": TINY_EMBED, "inputs": inputs or [inference_pb2.EmbedInput(text="hi")]}
    return inference_pb2.EmbedRequest(**{**values, **fields})


MESSAGE = inference_pb2.ChatMessage(role="user", content="hi")
INFERENCE: list[tuple[str, Callable[[], Any], str, str]] = [
    ("Chat", lambda: chat(model=""), "model", "no model"),
    ("Chat", lambda: chat(model=HUGE), "model", "a huge model name"),
    ("Chat", lambda: chat(messages=[]), "messages", "no messages"),
    ("Chat", lambda: chat(messages=[MESSAGE] * (MAX_MESSAGES + 1)), "messages", "too many messages"),
    ("Chat", lambda: chat(messages=[inference_pb2.ChatMessage(role="user", content="x" * (MAX_TEXT_CHARS + 1))]),
     "messages[0].content", "an oversized message"),
    ("Chat", lambda: chat(messages=[inference_pb2.ChatMessage(role="user", content="hi", name=HUGE)]),
     "messages[0].name", "a huge message name"),
    ("Chat", lambda: chat(messages=[inference_pb2.ChatMessage(role=HUGE, content="hi")]), "messages[0].role",
     "a huge role"),
    ("Chat", lambda: chat(messages=[], prompt="x" * (MAX_TEXT_CHARS + 1)), "prompt", "an oversized prompt"),
    ("Chat", lambda: chat(max_tokens=0), "max_tokens", "no tokens"),
    ("Chat", lambda: chat(temperature=math.nan), "temperature", "a NaN temperature"),
    ("Chat", lambda: chat(top_p=-math.inf), "top_p", "an infinite top_p"),
    ("Chat", lambda: chat(stop=["s"] * 10_000), "stop", "10,000 stop sequences"),
    ("Chat", lambda: chat(tools=[inference_pb2.Tool(name="f")] * (MAX_TOOLS + 1)), "tools", "too many tools"),
    ("Chat", lambda: chat(tools=[inference_pb2.Tool(name="f", description="x" * (MAX_TEXT_CHARS + 1))]),
     "tools[0].function.description", "an oversized tool description"),
    ("Chat", lambda: chat(tools=[inference_pb2.Tool(name="f", parameters_json="[" * 100_000)]),
     "tools[0].function.parameters", "deeply nested tool parameters"),
    ("Chat", lambda: chat(user=HUGE), "user", "a huge user"),
    ("Chat", lambda: chat(request_id="r" * (MAX_REQUEST_ID_CHARS + 1)), "request_id", "a long request id"),
    ("Embed", lambda: embed(model=""), "model", "no model"),
    ("Embed", lambda: inference_pb2.EmbedRequest(model=TINY_EMBED), "input", "no input"),
    ("Embed", lambda: embed(*[inference_pb2.EmbedInput()] * 3), "input[0]", "inputs of neither kind"),
    ("Embed", lambda: embed(inference_pb2.EmbedInput(text="x" * (MAX_TEXT_CHARS + 1))), "input[0]",
     "an oversized input"),
    ("Embed", lambda: embed(inference_pb2.EmbedInput(tokens=inference_pb2.TokenIds(ids=[1] * (MAX_INPUT_TOKENS + 1)))),
     "input[0]", "too many token ids"),
    ("Embed", lambda: embed(*[inference_pb2.EmbedInput(text="x")] * 100_000), "input", "100,000 inputs"),
    ("Embed", lambda: embed(request_id="r" * (MAX_REQUEST_ID_CHARS + 1)), "request_id", "a long request id"),
]


async def still_serves(stack: Stack) -> None:
    """Every service answers a good request."""
    assert (await stack.registry.stub.GetAsset(registry_pb2.GetAssetRequest(asset_id=TINY_CHAT))).spec.asset_id
    await stack.jobs.stub.ListOperations(jobs_pb2.ListOperationsRequest(page_size=1))
    assert (await stack.workers[0].control.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest())).worker_id
    reply = await stack.inference.Embed(embed(), timeout=60)
    assert len(reply.embeddings) == 1


@pytest.mark.parametrize(("rpc", "request_of", "field"), [c[:3] for c in INFERENCE],
                         ids=[f"{c[0]} {c[3]}" for c in INFERENCE])
async def test_the_front_and_the_worker_refuse_bad_inference_naming_the_field(
    stack: Stack, rpc: str, request_of: Callable[[], Any], field: str
) -> None:
    request = request_of()
    for stub in (stack.inference, stack.workers[0].inference):
        await assert_refused(getattr(stub, rpc)(request, timeout=60), INVALID, field)
    await still_serves(stack)


async def test_a_message_over_the_body_limit_is_refused_at_both_doors(stack: Stack) -> None:
    assert stack.router_settings is not None
    limit = stack.router_settings.max_body_bytes
    text = "x" * (limit + MIB)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await stack.inference.Embed(embed(inference_pb2.EmbedInput(text=text)), timeout=60)
    assert failed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    async with httpx.AsyncClient(base_url=stack.http_url, timeout=60) as http:
        reply = await http.post("/v1/embeddings", json={"model": TINY_EMBED, "input": text})
    assert reply.status_code == 413
    await still_serves(stack)


async def test_caps_within_the_body_limit_are_the_same_at_both_doors(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.http_url, timeout=60) as http:
        messages = await http.post("/v1/chat/completions", json={
            "model": TINY_CHAT, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}] * (MAX_MESSAGES + 1)})
        tools = await http.post("/v1/chat/completions", json={
            "model": TINY_CHAT, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f"}}] * (MAX_TOOLS + 1)})
        tokens = await http.post("/v1/embeddings", json={"model": TINY_EMBED, "input": [[1] * (MAX_INPUT_TOKENS + 1)]})
    for reply, param in ((messages, "messages"), (tools, "tools"), (tokens, "input[0]")):
        assert reply.status_code == 400, reply.text[:300]
        assert reply.json()["error"]["param"] == param
    await assert_refused(stack.inference.Chat(chat(messages=[MESSAGE] * (MAX_MESSAGES + 1)), timeout=60),
                         INVALID, "messages")


BAD_UTF8 = b"\x0a\x02\xff\xfe"
"""A message whose field 1, a string in every request below, holds bytes that are not UTF-8
(no client library writes it; a hand-made or broken one can)."""


@pytest.mark.parametrize("method", [
    "/roundhouse.v1.Registry/GetAsset", "/roundhouse.v1.Jobs/GetOperation",
    "/roundhouse.v1.WorkerControl/UnloadModel", "/roundhouse.v1.Inference/Embed"])
async def test_text_that_is_not_utf8_is_invalid(stack: Stack, method: str) -> None:
    service = method.split("/")[1].rsplit(".", 1)[1]
    address = {"Registry": stack.registry.address, "Jobs": stack.jobs.address,
               "WorkerControl": stack.workers[0].address, "Inference": stack.router_address}[service]
    async with grpc.aio.insecure_channel(address) as channel:
        raw = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        await assert_refused(raw(BAD_UTF8, timeout=10), INVALID, "UTF-8")
    await still_serves(stack)


async def test_json_nested_deeper_than_any_parser_goes_is_a_400_at_the_http_door(stack: Stack) -> None:
    body = '{"model": "tiny-chat", "messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
    async with httpx.AsyncClient(base_url=stack.http_url, timeout=60) as http:
        reply = await http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert reply.status_code == 400, reply.text[:300]
    await still_serves(stack)


@pytest.mark.parametrize("request_id", ["réq-1", "a\nb", "with space"])
async def test_a_request_id_that_cannot_travel_as_metadata_is_still_served(stack: Stack, request_id: str) -> None:
    # The id is the caller's to choose; one that is no valid header value is not passed on to the
    # worker as metadata (it would make the call fail), and the request is answered all the same.
    request = embed()
    request.request_id = request_id
    reply = await stack.inference.Embed(request, timeout=60)
    assert len(reply.embeddings) == 1
    chat = inference_pb2.ChatRequest(model=TINY_CHAT, request_id=request_id, max_tokens=2,
                                     messages=[inference_pb2.ChatMessage(role="user", content="hi")])
    chunks = [chunk async for chunk in stack.inference.Chat(chat, timeout=60)]
    assert chunks[-1].finish_reason
