"""The Registry service over gRPC, against real Postgres and NATS."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import nats
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from registry_harness import RunningRegistry, running_registry

from roundhouse.v1 import asset_pb2, registry_pb2
from services.common.events import decode_event

LLM = asset_pb2.INTERFACE_LLM_RUNTIME
EMBED = asset_pb2.INTERFACE_EMBEDDING_RUNTIME


@pytest.fixture
async def registry(db_dsn: str, nats_url: str, tmp_path: Path) -> AsyncIterator[RunningRegistry]:
    async with running_registry(db_dsn, nats_url, [tmp_path]) as running:
        yield running


def uid(prefix: str = "m") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def spec(asset_id: str, interface: int = LLM, **fields: object) -> asset_pb2.AssetSpec:
    base = asset_pb2.AssetSpec(
        asset_id=asset_id,
        interfaces=[interface],
        source=asset_pb2.Source(kind=asset_pb2.SOURCE_KIND_PYPI, package="some-model"),
    )
    for name, value in fields.items():
        field = getattr(base, name)
        if hasattr(field, "CopyFrom"):
            field.CopyFrom(value)
        elif hasattr(field, "update"):
            field.update(value)
        elif hasattr(field, "extend"):
            field.extend(value)
        else:
            setattr(base, name, value)
    return base


def apply(*specs: asset_pb2.AssetSpec, expected: int | None = None) -> registry_pb2.ApplyAssetsRequest:
    return registry_pb2.ApplyAssetsRequest(assets=[
        registry_pb2.AssetApply(spec=s, expected_revision=expected) if expected is not None
        else registry_pb2.AssetApply(spec=s)
        for s in specs
    ])


async def rpc_error(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value


async def test_apply_creates_then_is_idempotent_then_updates(registry: RunningRegistry) -> None:
    asset_id = uid()
    first = await registry.stub.ApplyAssets(apply(spec(asset_id)))
    assert first.results[0].outcome == registry_pb2.APPLY_OUTCOME_CREATED
    assert first.results[0].asset.revision == 1
    assert first.results[0].asset.status.state == asset_pb2.ASSET_STATE_REGISTERED

    again = await registry.stub.ApplyAssets(apply(spec(asset_id)))
    assert again.results[0].outcome == registry_pb2.APPLY_OUTCOME_UNCHANGED
    assert again.results[0].asset.revision == 1

    changed = spec(asset_id, display_name="Renamed")
    updated = await registry.stub.ApplyAssets(apply(changed, expected=1))
    assert updated.results[0].outcome == registry_pb2.APPLY_OUTCOME_UPDATED
    got = await registry.stub.GetAsset(registry_pb2.GetAssetRequest(asset_id=asset_id))
    assert (got.revision, got.spec.display_name) == (2, "Renamed")
    assert got.spec.lifecycle.desired == asset_pb2.DESIRED_STATE_ON_DEMAND
    assert got.spec.policy.max_concurrency == 4


async def test_stale_revision_is_aborted_not_overwritten(registry: RunningRegistry) -> None:
    asset_id = uid()
    await registry.stub.ApplyAssets(apply(spec(asset_id)))
    await registry.stub.ApplyAssets(apply(spec(asset_id, display_name="v2"), expected=1))
    err = await rpc_error(registry.stub.ApplyAssets(apply(spec(asset_id, display_name="v3"), expected=1)))
    assert err.code() == grpc.StatusCode.ABORTED
    assert "revision 2" in err.details()
    err = await rpc_error(registry.stub.ApplyAssets(apply(spec(asset_id), expected=0)))
    assert err.code() == grpc.StatusCode.ABORTED
    got = await registry.stub.GetAsset(registry_pb2.GetAssetRequest(asset_id=asset_id))
    assert got.spec.display_name == "v2"


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        (lambda: spec("Not Valid"), "assets[1].spec.asset_id: must match"),
        (lambda: spec(uid(), interface=0), "assets[1].spec.interface[0]"),
        (lambda: spec(uid(), policy=asset_pb2.Policy(max_concurrency=0)),
         "assets[1].spec.policy.max_concurrency"),
        (lambda: spec(uid(), policy=asset_pb2.Policy(max_queue=-3)), "assets[1].spec.policy.max_queue"),
        (lambda: spec(uid(), lifecycle=asset_pb2.Lifecycle(
            desired=asset_pb2.DESIRED_STATE_RUNNING, auto_sleep_min=10)),
         "assets[1].spec.lifecycle.auto_sleep_min"),
        (lambda: spec(uid(), source=asset_pb2.Source(
            kind=asset_pb2.SOURCE_KIND_PATH, path="a/../../etc")), "assets[1].spec.source.path"),
        (lambda: spec(uid(), source=asset_pb2.Source(
            kind=asset_pb2.SOURCE_KIND_PATH, path="/etc")), "assets[1].spec.source.path: absolute"),
        (lambda: spec(uid(), metadata=asset_pb2.Metadata(description="x" * (50 * 1024 * 1024))),
         "assets[1].spec.metadata.description"),
    ],
)
async def test_invalid_spec_rejects_the_whole_apply(
    registry: RunningRegistry, bad: object, expected: str
) -> None:
    good_id = uid("good")
    err = await rpc_error(registry.stub.ApplyAssets(apply(spec(good_id), bad())))  # type: ignore[operator]
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in err.details(), err.details()
    missing = await rpc_error(registry.stub.GetAsset(registry_pb2.GetAssetRequest(asset_id=good_id)))
    assert missing.code() == grpc.StatusCode.NOT_FOUND


async def test_duplicate_ids_in_one_apply_are_rejected(registry: RunningRegistry) -> None:
    asset_id = uid()
    err = await rpc_error(registry.stub.ApplyAssets(apply(spec(asset_id), spec(asset_id))))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"assets[1].spec.asset_id: duplicate id '{asset_id}'" in err.details()


async def test_aliases_are_unique_across_assets(registry: RunningRegistry) -> None:
    a, b, alias = uid(), uid(), uid("alias")
    await registry.stub.ApplyAssets(apply(spec(a, aliases=[alias])))
    err = await rpc_error(registry.stub.ApplyAssets(apply(spec(b, aliases=[alias]))))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"already names asset '{a}'" in err.details()
    err = await rpc_error(registry.stub.ApplyAssets(apply(spec(alias))))
    assert "already uses it as an alias" in err.details()


async def test_resolve_by_name_alias_and_interface(registry: RunningRegistry) -> None:
    chat, emb, alias = uid("chat"), uid("emb"), uid("alias")
    off = uid("off")
    await registry.stub.ApplyAssets(apply(
        spec(chat, aliases=[alias]),
        spec(emb, interface=EMBED),
        spec(off, lifecycle=asset_pb2.Lifecycle(desired=asset_pb2.DESIRED_STATE_DISABLED)),
    ))
    by_alias = await registry.stub.ResolveAsset(registry_pb2.ResolveAssetRequest(name=alias, interface=LLM))
    assert by_alias.spec.asset_id == chat
    wrong = await rpc_error(registry.stub.ResolveAsset(registry_pb2.ResolveAssetRequest(name=emb, interface=LLM)))
    assert wrong.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "embedding-runtime" in wrong.details()
    unknown = await rpc_error(registry.stub.ResolveAsset(registry_pb2.ResolveAssetRequest(name="nope-x")))
    assert unknown.code() == grpc.StatusCode.NOT_FOUND
    disabled = await rpc_error(registry.stub.ResolveAsset(registry_pb2.ResolveAssetRequest(name=off)))
    assert disabled.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "disabled" in disabled.details()


async def test_list_filters_and_pages(registry: RunningRegistry) -> None:
    team = uid("team")
    ids = sorted(uid("page") for _ in range(5))
    await registry.stub.ApplyAssets(apply(*(
        spec(i, interface=EMBED if n % 2 else LLM, labels={"team": team}) for n, i in enumerate(ids)
    )))
    seen, token = [], ""
    while True:
        page = await registry.stub.ListAssets(registry_pb2.ListAssetsRequest(
            labels={"team": team}, page_size=2, page_token=token))
        assert len(page.assets) <= 2
        seen += [a.spec.asset_id for a in page.assets]
        token = page.next_page_token
        if not token:
            break
    assert seen == ids
    embeds = await registry.stub.ListAssets(registry_pb2.ListAssetsRequest(
        labels={"team": team}, interface=EMBED))
    assert [a.spec.asset_id for a in embeds.assets] == ids[1::2]
    chat = await registry.stub.ListAssets(registry_pb2.ListAssetsRequest(
        labels={"team": team}, capability="chat", runtime=asset_pb2.RUNTIME_TRANSFORMERS,
        state=asset_pb2.ASSET_STATE_REGISTERED))
    assert [a.spec.asset_id for a in chat.assets] == ids[0::2]
    bad = await rpc_error(registry.stub.ListAssets(registry_pb2.ListAssetsRequest(page_token="%%%")))
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_delete_and_stale_delete(registry: RunningRegistry) -> None:
    asset_id = uid()
    await registry.stub.ApplyAssets(apply(spec(asset_id)))
    stale = await rpc_error(registry.stub.DeleteAsset(
        registry_pb2.DeleteAssetRequest(asset_id=asset_id, expected_revision=7)))
    assert stale.code() == grpc.StatusCode.ABORTED
    gone = await registry.stub.DeleteAsset(registry_pb2.DeleteAssetRequest(asset_id=asset_id))
    assert gone.asset.spec.asset_id == asset_id
    err = await rpc_error(registry.stub.GetAsset(registry_pb2.GetAssetRequest(asset_id=asset_id)))
    assert err.code() == grpc.StatusCode.NOT_FOUND


async def test_health_serving_and_reflection_lists_services(registry: RunningRegistry) -> None:
    health = health_pb2_grpc.HealthStub(registry.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service="roundhouse.v1.Registry"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(registry.channel)
    call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = []
    async for response in call:
        names = [s.name for s in response.list_services_response.service]
        break
    assert "roundhouse.v1.Registry" in names and "grpc.health.v1.Health" in names


async def test_ops_subscriber_sees_applied_and_deleted_events(
    registry: RunningRegistry, nats_url: str
) -> None:
    asset_id = uid()
    nc = await nats.connect(nats_url)
    received: asyncio.Queue = asyncio.Queue()
    await nc.subscribe("roundhouse.events.>", cb=received.put)
    try:
        await registry.stub.ApplyAssets(apply(spec(asset_id)))
        await registry.stub.DeleteAsset(registry_pb2.DeleteAssetRequest(asset_id=asset_id))
        mine = []
        while len(mine) < 2:
            msg = await asyncio.wait_for(received.get(), timeout=10)
            event = decode_event(msg.data)
            if event.asset_id == asset_id:
                mine.append((msg.subject, event, msg.headers or {}))
        (subject1, applied, headers1), (subject2, deleted, _) = mine
        assert subject1 == f"roundhouse.events.asset.applied.{asset_id}"
        assert applied.asset.change == "created" and applied.asset.revision == 1
        assert headers1.get("Nats-Msg-Id") == applied.event_id
        assert subject2 == f"roundhouse.events.asset.deleted.{asset_id}"
        assert deleted.source == "registry"
    finally:
        await nc.close()


async def test_reported_status_and_capabilities_are_stored(registry: RunningRegistry) -> None:
    asset_id = uid()
    await registry.stub.ApplyAssets(apply(spec(asset_id)))
    reported = await registry.stub.ReportAssetStatus(registry_pb2.ReportAssetStatusRequest(
        asset_id=asset_id,
        status=asset_pb2.AssetStatus(state=asset_pb2.ASSET_STATE_INSTALLED, store_path="/store/x"),
        capabilities=asset_pb2.Capabilities(context_length=2048, supports_system_role=True),
    ))
    assert reported.status.state == asset_pb2.ASSET_STATE_INSTALLED
    got = await registry.stub.GetAsset(registry_pb2.GetAssetRequest(asset_id=asset_id))
    assert got.status.store_path == "/store/x" and got.capabilities.context_length == 2048
    assert got.revision == 1  # observed state never bumps the spec revision
    installed = await registry.stub.ListAssets(registry_pb2.ListAssetsRequest(
        state=asset_pb2.ASSET_STATE_INSTALLED, capability="system_role"))
    assert asset_id in [a.spec.asset_id for a in installed.assets]
