"""Routes as operators keep them: applied, versioned, listed, resolved and deleted in the
registry (real gRPC, Postgres, NATS), guarded at the jobs service, and shown by the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from jobs_harness import (
    RunningJobs,
    clear_operations,
    jobs_settings,
    rpc_error,
    running_jobs,
    submit,
    uid,
    watch_until_done,
)
from nats.js.api import ConsumerConfig, DeliverPolicy
from polling import wait_until
from registry_harness import RunningRegistry, running_registry

from roundhouse.v1 import asset_pb2, events_pb2, jobs_pb2, registry_pb2
from services.common.events import STREAM_NAME, EventBus, decode_event
from services.jobs.registry_client import RegistryClient

LLM = asset_pb2.INTERFACE_LLM_RUNTIME
EMBED = asset_pb2.INTERFACE_EMBEDDING_RUNTIME
INSTALL, LOAD, DELETE = (jobs_pb2.OPERATION_TYPE_INSTALL, jobs_pb2.OPERATION_TYPE_LOAD,
                         jobs_pb2.OPERATION_TYPE_DELETE)


@pytest.fixture(scope="module")
async def registry(db_dsn: str, nats_url: str, tmp_path_factory: pytest.TempPathFactory,
                   ) -> AsyncIterator[RunningRegistry]:
    """One registry for the module: routes hold no files, so no test needs a source of its own."""
    async with running_registry(db_dsn, nats_url, [tmp_path_factory.mktemp("sources")]) as running:
        yield running


@pytest.fixture(scope="module")
async def jobs(registry: RunningRegistry, db_dsn: str, nats_url: str,
               tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningJobs]:
    """A jobs service on the module's registry; operations other modules left are cleared
    first, so its executor runs only this module's."""
    await clear_operations(db_dsn)
    root = tmp_path_factory.mktemp("jobs")
    (root / "sources").mkdir()
    async with running_jobs(jobs_settings(db_dsn, nats_url, root, registry.address)) as running:
        yield running


@dataclass(frozen=True)
class Named:
    """Assets a route test may name: two chat models (one with an alias), an embedding model
    and a route of their own."""

    chat: str
    chat_alias: str
    other_chat: str
    embed: str
    route: str


@pytest.fixture(scope="module")
async def named(registry: RunningRegistry) -> Named:
    """The module's assets for routes to name, applied once."""
    chat, alias, other, embed, route_id = uid("chat"), uid("chat-alias"), uid("chat2"), uid("emb"), uid("r")
    await registry.stub.ApplyAssets(apply(
        model(chat, aliases=[alias]), model(other), model(embed, EMBED), route(route_id, chat)))
    return Named(chat, alias, other, embed, route_id)


def model(asset_id: str, interface: int = LLM, *, aliases: list[str] | None = None,
          labels: dict[str, str] | None = None) -> asset_pb2.AssetSpec:
    """A model's spec (a PyPI source: nothing is installed by these tests)."""
    return asset_pb2.AssetSpec(
        asset_id=asset_id, interfaces=[interface], aliases=aliases or [], labels=labels or {},
        source=asset_pb2.Source(kind=asset_pb2.SOURCE_KIND_PYPI, package="some-model"))


def route(asset_id: str, *targets: str | tuple[str, float], interface: int = LLM,
          aliases: list[str] | None = None, labels: dict[str, str] | None = None,
          sticky: str = "", shadow: list[asset_pb2.RouteShadow] | None = None,
          fallback: list[str] | None = None) -> asset_pb2.AssetSpec:
    """A route's spec; a target is an asset, or an (asset, weight) pair."""
    pairs = [t if isinstance(t, tuple) else (t, None) for t in targets]
    return asset_pb2.AssetSpec(
        asset_id=asset_id, asset_class="route", interfaces=[interface], aliases=aliases or [],
        labels=labels or {},
        route=asset_pb2.Route(
            targets=[asset_pb2.RouteTarget(asset=a, weight=w) for a, w in pairs],
            sticky=sticky, shadow=shadow or [], fallback=fallback or []))


def apply(*specs: asset_pb2.AssetSpec) -> registry_pb2.ApplyAssetsRequest:
    return registry_pb2.ApplyAssetsRequest(assets=[registry_pb2.AssetApply(spec=s) for s in specs])


async def get(registry: RunningRegistry, asset_id: str) -> asset_pb2.Asset:
    return await registry.stub.GetAsset(registry_pb2.GetAssetRequest(asset_id=asset_id))


async def absent(registry: RunningRegistry, asset_id: str) -> bool:
    """Whether the registry answers NOT_FOUND for the asset (False when it has it)."""
    try:
        await get(registry, asset_id)
    except grpc.aio.AioRpcError as err:
        if err.code() != grpc.StatusCode.NOT_FOUND:
            raise
        return True
    return False


def details(err: grpc.aio.AioRpcError) -> str:
    """The status message of a failed call."""
    return err.details() or ""


def error_class(err: grpc.aio.AioRpcError) -> str:
    """The domain error the service raised, as its trailing metadata names it."""
    metadata: Any = err.trailing_metadata() or ()  # grpc.aio.Metadata: (key, value) pairs
    return next((str(value) for key, value in metadata if key == "roundhouse-error"), "")


async def test_a_route_applies_reads_back_and_is_versioned(
    registry: RunningRegistry, named: Named
) -> None:
    route_id = uid("r")
    spec = route(route_id, (named.chat, 90), (named.other_chat, 10), sticky="user")
    first = await registry.stub.ApplyAssets(apply(spec))
    assert first.results[0].outcome == registry_pb2.APPLY_OUTCOME_CREATED
    assert first.results[0].asset.revision == 1
    got = await get(registry, route_id)
    assert got.spec.asset_class == "route" and list(got.spec.interfaces) == [LLM]
    assert [(t.asset, t.weight) for t in got.spec.route.targets] == [(named.chat, 90), (named.other_chat, 10)]
    assert got.spec.route.sticky == "user"
    assert list(got.spec.route.fallback_on) == ["overloaded", "unavailable", "context_length", "upstream_error"]

    again = await registry.stub.ApplyAssets(apply(spec))
    assert again.results[0].outcome == registry_pb2.APPLY_OUTCOME_UNCHANGED
    assert again.results[0].asset.revision == 1

    changed = route(route_id, (named.chat, 50), (named.other_chat, 50), sticky="user")
    updated = await registry.stub.ApplyAssets(apply(changed))
    assert updated.results[0].outcome == registry_pb2.APPLY_OUTCOME_UPDATED
    got = await get(registry, route_id)
    assert got.revision == 2
    assert [t.weight for t in got.spec.route.targets] == [50, 50]


async def test_routes_and_models_are_listed_apart_by_class(
    registry: RunningRegistry, named: Named
) -> None:
    team = {"team": uid("team")}
    model_id, route_id = uid("m"), uid("r")
    await registry.stub.ApplyAssets(apply(
        model(model_id, labels=team), route(route_id, named.chat, labels=team)))

    async def listed(asset_class: str) -> list[str]:
        page = await registry.stub.ListAssets(
            registry_pb2.ListAssetsRequest(labels=team, asset_class=asset_class))
        return [a.spec.asset_id for a in page.assets]

    assert await listed("") == sorted([model_id, route_id])
    assert await listed("route") == [route_id]
    assert await listed("model") == [model_id]
    bad = await rpc_error(listed("widget"))
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT and "asset_class" in details(bad)


async def test_a_route_resolves_by_id_and_alias_for_its_interface_only(
    registry: RunningRegistry, named: Named
) -> None:
    route_id, alias = uid("r"), uid("r-alias")
    await registry.stub.ApplyAssets(apply(route(route_id, named.chat, aliases=[alias])))
    for name in (route_id, alias):
        found = await registry.stub.ResolveAsset(registry_pb2.ResolveAssetRequest(name=name, interface=LLM))
        assert found.spec.asset_id == route_id and found.spec.asset_class == "route"
    found = await registry.stub.ResolveAsset(registry_pb2.ResolveAssetRequest(name=alias))
    assert found.spec.asset_id == route_id

    as_route = await rpc_error(registry.stub.ResolveAsset(
        registry_pb2.ResolveAssetRequest(name=alias, interface=EMBED)))
    as_model = await rpc_error(registry.stub.ResolveAsset(
        registry_pb2.ResolveAssetRequest(name=named.chat_alias, interface=EMBED)))
    assert as_route.code() == as_model.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_class(as_route) == error_class(as_model) == "WrongInterface"
    assert details(as_route) == f"model '{alias}' implements llm-runtime, not embedding-runtime"
    assert details(as_model) == f"model '{named.chat_alias}' implements llm-runtime, not embedding-runtime"


async def read_events(nats_url: str, asset_id: str, count: int) -> list[tuple[str, events_pb2.Event]]:
    """The first `count` `asset.*` events named for the asset, with their subjects."""
    bus = await EventBus.connect(nats_url, name="test-route-events")
    try:
        sub = await bus.js.pull_subscribe(
            f"roundhouse.events.asset.*.{asset_id}", stream=STREAM_NAME,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=30.0))
        msgs: list = []
        while len(msgs) < count:
            msgs += await sub.fetch(count - len(msgs), timeout=10)
        await sub.unsubscribe()
        return [(m.subject, decode_event(m.data)) for m in msgs]
    finally:
        await bus.close()


async def test_a_route_deletes_and_its_events_carry_the_route(
    registry: RunningRegistry, named: Named, nats_url: str
) -> None:
    route_id, alias = uid("r"), uid("r-alias")
    await registry.stub.ApplyAssets(apply(route(route_id, (named.chat, 3), aliases=[alias])))
    gone = await registry.stub.DeleteAsset(registry_pb2.DeleteAssetRequest(asset_id=route_id))
    assert gone.asset.spec.asset_class == "route"
    assert await absent(registry, route_id)
    unknown = await rpc_error(registry.stub.ResolveAsset(registry_pb2.ResolveAssetRequest(name=alias)))
    assert unknown.code() == grpc.StatusCode.NOT_FOUND

    (applied_on, applied), (deleted_on, deleted) = await read_events(nats_url, route_id, 2)
    assert applied_on == f"roundhouse.events.asset.applied.{route_id}"
    assert applied.asset.change == "created" and applied.asset.revision == 1
    assert deleted_on == f"roundhouse.events.asset.deleted.{route_id}"
    for event in (applied, deleted):
        assert event.asset.spec.asset_class == "route"
        assert [(t.asset, t.weight) for t in event.asset.spec.route.targets] == [(named.chat, 3)]
        assert list(event.asset.spec.aliases) == [alias]


REJECTIONS: dict[str, tuple[Callable[[Named, str], asset_pb2.AssetSpec], Callable[[Named, str], str]]] = {
    "unknown asset": (
        lambda s, r: route(r, s.chat, "no-such-asset-x"),
        lambda s, r: "assets[0].spec.targets[1].asset: no asset 'no-such-asset-x'"),
    "the route itself": (
        lambda s, r: route(r, s.chat, r),
        lambda s, r: f"assets[0].spec.targets[1].asset: '{r}' is the route itself"),
    "another route": (
        lambda s, r: route(r, s.chat, s.route),
        lambda s, r: f"assets[0].spec.targets[1].asset: '{s.route}' is a route; routes do not nest"),
    "wrong interface": (
        lambda s, r: route(r, s.chat, s.embed),
        lambda s, r: f"assets[0].spec.targets[1].asset: '{s.embed}' does not offer llm-runtime"),
    "all-zero weights": (
        lambda s, r: route(r, (s.chat, 0), (s.other_chat, 0)),
        lambda s, r: "assets[0].spec.targets: weights must not all be zero"),
    "shadow sample above 1": (
        lambda s, r: route(r, s.chat, shadow=[asset_pb2.RouteShadow(asset=s.other_chat, sample=1.5)]),
        lambda s, r: "assets[0].spec.shadow[0].sample: Input should be less than or equal to 1"),
    "shadow sample below 0": (
        lambda s, r: route(r, s.chat, shadow=[asset_pb2.RouteShadow(asset=s.other_chat, sample=-0.1)]),
        lambda s, r: "assets[0].spec.shadow[0].sample: Input should be greater than or equal to 0"),
    "fallback repeating a target": (
        lambda s, r: route(r, s.chat, s.other_chat, fallback=[s.other_chat]),
        lambda s, r: f"assets[0].spec.fallback[0]: '{s.other_chat}' repeats targets[1].asset"),
    "unknown sticky value": (
        lambda s, r: route(r, s.chat, sticky="session"),
        lambda s, r: "assets[0].spec.sticky: Input should be 'user', 'key' or 'none'"),
}


@pytest.mark.parametrize("case", list(REJECTIONS))
async def test_a_bad_route_is_rejected_with_its_field_path(
    registry: RunningRegistry, named: Named, case: str
) -> None:
    build, expected = REJECTIONS[case]
    route_id, bystander = uid("r"), uid("m")
    err = await rpc_error(registry.stub.ApplyAssets(apply(build(named, route_id), model(bystander))))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected(named, route_id) in details(err), details(err)
    assert await absent(registry, route_id) and await absent(registry, bystander)


async def test_a_route_with_its_target_in_one_apply_and_a_target_by_alias_are_accepted(
    registry: RunningRegistry, named: Named
) -> None:
    route_id, new_model = uid("r"), uid("m")
    done = await registry.stub.ApplyAssets(apply(route(route_id, new_model), model(new_model)))
    assert [r.outcome for r in done.results] == [registry_pb2.APPLY_OUTCOME_CREATED] * 2

    by_alias = uid("r")
    await registry.stub.ApplyAssets(apply(route(by_alias, named.chat_alias)))
    assert [t.asset for t in (await get(registry, by_alias)).spec.route.targets] == [named.chat_alias]


async def test_a_model_does_not_turn_into_a_route_or_back(
    registry: RunningRegistry, named: Named
) -> None:
    model_id, route_id = uid("m"), uid("r")
    await registry.stub.ApplyAssets(apply(model(model_id), route(route_id, named.chat)))

    err = await rpc_error(registry.stub.ApplyAssets(apply(route(model_id, named.chat))))
    assert err.code() == grpc.StatusCode.ABORTED
    assert f"asset '{model_id}' is a model, not a route" in details(err)
    err = await rpc_error(registry.stub.ApplyAssets(apply(model(route_id))))
    assert err.code() == grpc.StatusCode.ABORTED
    assert f"asset '{route_id}' is a route, not a model" in details(err)

    assert (await get(registry, model_id)).spec.asset_class in ("", "model")
    assert (await get(registry, route_id)).spec.asset_class == "route"


async def test_a_model_a_route_uses_cannot_be_deleted_until_the_route_goes(
    registry: RunningRegistry
) -> None:
    by_id, by_alias, alias = uid("m"), uid("m"), uid("m-alias")
    first, second = sorted([uid("r"), uid("r")])
    await registry.stub.ApplyAssets(apply(
        model(by_id), model(by_alias, aliases=[alias]),
        route(first, by_id, fallback=[alias]),
        route(second, by_id)))

    err = await rpc_error(registry.stub.DeleteAsset(registry_pb2.DeleteAssetRequest(asset_id=by_id)))
    assert err.code() == grpc.StatusCode.ABORTED
    assert f"used by routes '{first}', '{second}'" in details(err)
    err = await rpc_error(registry.stub.DeleteAsset(registry_pb2.DeleteAssetRequest(asset_id=by_alias)))
    assert err.code() == grpc.StatusCode.ABORTED
    assert f"asset '{by_alias}' is used by route '{first}'" in details(err)
    assert (await get(registry, by_id)).revision == 1

    for route_id in (first, second):
        await registry.stub.DeleteAsset(registry_pb2.DeleteAssetRequest(asset_id=route_id))
    for model_id in (by_id, by_alias):
        await registry.stub.DeleteAsset(registry_pb2.DeleteAssetRequest(asset_id=model_id))
        assert await absent(registry, model_id)


async def operations_on(jobs: RunningJobs, asset_id: str) -> list[jobs_pb2.Operation]:
    page = await jobs.stub.ListOperations(jobs_pb2.ListOperationsRequest(asset_id=asset_id))
    return list(page.operations)


async def test_jobs_refuse_deleting_a_routed_model_and_delete_a_route(
    registry: RunningRegistry, jobs: RunningJobs
) -> None:
    model_id, alias, route_id = uid("m"), uid("m-alias"), uid("r")
    await registry.stub.ApplyAssets(apply(model(model_id, aliases=[alias]), route(route_id, alias)))

    err = await rpc_error(jobs.stub.SubmitOperation(submit(model_id, DELETE)))
    assert err.code() == grpc.StatusCode.ABORTED
    assert f"asset '{model_id}' is used by route '{route_id}'" in details(err)
    assert await operations_on(jobs, model_id) == []
    assert (await get(registry, model_id)).spec.asset_id == model_id

    queued = await jobs.stub.SubmitOperation(submit(route_id, DELETE))
    final = (await watch_until_done(jobs.stub, queued.operation_id))[-1]
    assert final.status == jobs_pb2.OPERATION_STATUS_SUCCEEDED, final.error
    assert "a route has no files" in final.message
    assert await absent(registry, route_id)

    queued = await jobs.stub.SubmitOperation(submit(model_id, DELETE))
    final = (await watch_until_done(jobs.stub, queued.operation_id))[-1]
    assert final.status == jobs_pb2.OPERATION_STATUS_SUCCEEDED, final.error
    assert await absent(registry, model_id)


async def test_jobs_see_models_only_and_refuse_to_install_or_load_a_route(
    registry: RunningRegistry, jobs: RunningJobs, named: Named
) -> None:
    client = RegistryClient(registry.address)
    try:
        models = {a.spec.asset_id for a in await client.list_assets()}
        routes = {r.asset_id for r in await client.list_routes()}
    finally:
        await client.close()
    assert {named.chat, named.other_chat, named.embed} <= models and named.route not in models
    assert named.route in routes and named.chat not in routes

    for kind in (INSTALL, LOAD):
        err = await rpc_error(jobs.stub.SubmitOperation(submit(named.route, kind)))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"asset '{named.route}' is a route" in details(err)
    err = await rpc_error(jobs.stub.EnsureLoaded(jobs_pb2.EnsureLoadedRequest(asset_id=named.route)))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "is a route" in details(err)
    assert await operations_on(jobs, named.route) == []


async def roundhouse(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI against the registry at `address`."""
    env = {**os.environ, "ROUNDHOUSE_REGISTRY_ADDRESS": address}
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "services.cli.main", *args],
        env=env, capture_output=True, text=True, timeout=60)


async def test_cli_applies_a_route_file_and_lists_routes_in_their_own_table(
    registry: RunningRegistry, tmp_path: Path
) -> None:
    model_id, route_id = uid("cli-m"), uid("cli-r")
    (tmp_path / "route.yaml").write_text(f"""\
asset_id: {model_id}
interface: llm-runtime
source: {{kind: pypi, package: some-model}}
---
asset_id: {route_id}
class: route
interface: llm-runtime
targets: [{{asset: {model_id}, weight: 3}}]
sticky: user
shadow: [{{asset: {model_id}, sample: 0.25}}]
cache: {{ttl_s: 600}}
""")
    applied = await roundhouse(registry.address, "apply", "-f", str(tmp_path / "route.yaml"))
    assert applied.returncode == 0, applied.stderr
    assert f"asset/{route_id} created (revision 1)" in applied.stdout
    listing = await roundhouse(registry.address, "models", "ls")
    assert listing.returncode == 0, listing.stderr
    models, routes = listing.stdout.split("\nRoutes (")
    assert model_id in models and route_id not in models
    header = next(line for line in routes.splitlines() if "TARGETS" in line).split()
    assert header == ["ID", "INTERFACE", "TARGETS", "STICKY", "FALLBACK", "SHADOW", "CACHE"]
    row = next(line for line in routes.splitlines() if line.split()[:1] == [route_id]).split()
    assert row == [route_id, "llm-runtime", f"{model_id}:3", "user", "-", f"{model_id}:0.25", "600s/key"]


@pytest.fixture
async def left_routes(registry: RunningRegistry) -> AsyncIterator[list[str]]:
    """Routes a test may leave naming nothing they may use: deleted after it, so that no later
    test's router or reconciler meets them."""
    route_ids: list[str] = []
    yield route_ids
    for route_id in route_ids:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await registry.stub.DeleteAsset(registry_pb2.DeleteAssetRequest(asset_id=route_id))


async def test_a_model_keeps_the_alias_a_route_names_it_by(
    registry: RunningRegistry, left_routes: list[str]
) -> None:
    model_id, alias, route_id, other = uid("m"), uid("m-alias"), uid("r"), uid("emb")
    left_routes.append(route_id)
    await registry.stub.ApplyAssets(apply(model(model_id, aliases=[alias]), model(other, EMBED),
                                          route(route_id, alias)))
    dropped = await rpc_error(registry.stub.ApplyAssets(apply(model(model_id))))
    moved = await rpc_error(registry.stub.ApplyAssets(apply(model(model_id), model(other, EMBED, aliases=[alias]))))
    for err in (dropped, moved):
        assert err.code() == grpc.StatusCode.ABORTED and f"route '{route_id}'" in details(err)
    found = await registry.stub.ResolveAsset(registry_pb2.ResolveAssetRequest(name=alias, interface=LLM))
    assert found.spec.asset_id == model_id


async def test_a_model_keeps_offering_the_interface_of_a_route_that_uses_it(
    registry: RunningRegistry, left_routes: list[str]
) -> None:
    model_id, route_id = uid("m"), uid("r")
    left_routes.append(route_id)
    await registry.stub.ApplyAssets(apply(model(model_id), route(route_id, model_id)))
    err = await rpc_error(registry.stub.ApplyAssets(apply(model(model_id, EMBED))))
    assert err.code() == grpc.StatusCode.ABORTED and f"route '{route_id}'" in details(err)
    assert list((await get(registry, model_id)).spec.interfaces) == [LLM]


WAITING_ON_LOCKS = """SELECT count(DISTINCT l.pid) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
                      WHERE NOT l.granted AND a.datname = current_database()"""


async def test_a_route_applied_while_its_target_is_deleted_never_outlives_it(
    registry: RunningRegistry, db_dsn: str, left_routes: list[str]
) -> None:
    model_id, route_id = uid("m"), uid("r")
    left_routes.append(route_id)
    await registry.stub.ApplyAssets(apply(model(model_id)))
    # Both writes touch the alias table after their checks (the delete by cascade, the apply
    # when it stores the route's aliases): holding it makes them overlap, whatever the timing.
    holder = await asyncpg.connect(db_dsn)
    watcher = await asyncpg.connect(db_dsn)
    try:
        held = holder.transaction()
        await held.start()
        await holder.execute("LOCK TABLE asset_aliases IN SHARE MODE")
        deleting = asyncio.ensure_future(registry.stub.DeleteAsset(
            registry_pb2.DeleteAssetRequest(asset_id=model_id)))
        applying = asyncio.ensure_future(registry.stub.ApplyAssets(apply(route(route_id, model_id))))
        try:
            async def both_wait() -> bool:
                return await watcher.fetchval(WAITING_ON_LOCKS) >= 2

            await wait_until(both_wait, timeout=30)
        finally:
            await held.rollback()
            await asyncio.gather(deleting, applying, return_exceptions=True)
    finally:
        await holder.close()
        await watcher.close()
    target_gone, route_kept = await absent(registry, model_id), not await absent(registry, route_id)
    assert not (target_gone and route_kept), f"route '{route_id}' is stored but its target is gone"
