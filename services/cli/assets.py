"""`roundhouse apply` and `roundhouse models ls`: asset commands over the Registry API."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc

from roundhouse.v1 import asset_pb2, registry_pb2, registry_pb2_grpc
from services.common.documents import load_path
from services.common.errors import InvalidSpec
from services.common.grpc_client import open_channel
from services.common.registry_reads import list_all_assets
from services.common.route_proto import declared_to_proto
from services.common.settings import CommonSettings
from services.registry.settings import RegistrySettings

OUTCOME_WORDS = {
    registry_pb2.APPLY_OUTCOME_CREATED: "created",
    registry_pb2.APPLY_OUTCOME_UPDATED: "updated",
    registry_pb2.APPLY_OUTCOME_UNCHANGED: "unchanged",
}


def _rpc_failure(what: str, address: str, exc: grpc.aio.AioRpcError) -> int:
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        return _fail(f"cannot reach the registry at {address}; is `roundhouse up` running "
                     "(or ROUNDHOUSE_REGISTRY_ADDRESS set)?")
    if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
        return _fail(f"the registry at {address} refused the internal token; is "
                     "ROUNDHOUSE_INTERNAL_TOKEN the one its `roundhouse up` uses?")
    return _fail(f"{what} ({exc.code().name}):\n{exc.details()}")


def _fail(lines: str) -> int:
    for line in lines.splitlines():
        print(f"error: {line}", file=sys.stderr)
    return 1


async def apply_specs(
    address: str, request: registry_pb2.ApplyAssetsRequest, settings: CommonSettings, timeout: float = 30.0
) -> registry_pb2.ApplyAssetsResponse:
    """Send one ApplyAssets request to the registry at `address` (TLS and token per `settings`)."""
    async with open_channel(address, settings) as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        return await stub.ApplyAssets(request, timeout=timeout)


def apply_files(path: Path, *, dry_run: bool = False, address: str | None = None) -> int:
    """Validate every document under `path`, then apply them all at once; 0 on success."""
    settings = RegistrySettings()
    if not path.exists():
        return _fail(f"{path}: no such file or folder")
    try:
        loaded = load_path(path, source_roots=settings.resolved_source_roots(),
                           upstreams=settings.upstream_rules())
    except InvalidSpec as exc:
        return _fail(exc.message)
    if not loaded:
        return _fail(f"{path}: no asset documents found")
    request = registry_pb2.ApplyAssetsRequest(
        assets=[registry_pb2.AssetApply(spec=declared_to_proto(item.spec)) for item in loaded],
        dry_run=dry_run,
    )
    address = address or settings.registry_address
    try:
        response = asyncio.run(apply_specs(address, request, settings))
    except grpc.aio.AioRpcError as exc:
        return _rpc_failure("the registry refused the apply", address, exc)
    suffix = " (dry run)" if dry_run else ""
    for result in response.results:
        asset = result.asset
        print(f"asset/{asset.spec.asset_id} {OUTCOME_WORDS[result.outcome]} "
              f"(revision {asset.revision}){suffix}")
    return 0


async def fetch_all(address: str, settings: CommonSettings) -> list[asset_pb2.Asset]:
    """Every asset, following pagination."""
    async with open_channel(address, settings) as channel:
        return await list_all_assets(registry_pb2_grpc.RegistryStub(channel), timeout_s=30)


def render_models(assets: list[asset_pb2.Asset]) -> str:
    """The admin view: language models, embedding models and routes as three tables."""
    groups = [
        ("Language models", asset_pb2.INTERFACE_LLM_RUNTIME, "CONTEXT", _context),
        ("Embedding models", asset_pb2.INTERFACE_EMBEDDING_RUNTIME, "DIMS", _dims),
    ]
    out: list[str] = []
    for title, interface, figure, value in groups:
        rows = [a for a in assets if interface in a.spec.interfaces and a.spec.asset_class != "route"]
        out.append(f"{title} ({len(rows)})")
        table = [["ID", "STATE", "DESIRED", "RUNTIME", figure, "CONCURRENCY", "ALIASES"]]
        for a in rows:
            table.append([
                a.spec.asset_id,
                asset_pb2.AssetState.Name(a.status.state).removeprefix("ASSET_STATE_").lower(),
                asset_pb2.DesiredState.Name(a.spec.lifecycle.desired)
                .removeprefix("DESIRED_STATE_").lower().replace("_", "-"),
                asset_pb2.Runtime.Name(a.spec.runtime).removeprefix("RUNTIME_").lower(),
                value(a),
                str(a.spec.policy.max_concurrency),
                ",".join(a.spec.aliases) or "-",
            ])
        out += _table(table) if rows else ["  (none)"]
        out.append("")
    routes = [a for a in assets if a.spec.asset_class == "route"]
    out.append(f"Routes ({len(routes)})")
    table = [["ID", "INTERFACE", "TARGETS", "STICKY", "FALLBACK", "SHADOW", "CACHE"]]
    for a in routes:
        route = a.spec.route
        table.append([
            a.spec.asset_id,
            asset_pb2.Interface.Name(a.spec.interfaces[0]).removeprefix("INTERFACE_").lower()
            .replace("_", "-") if a.spec.interfaces else "-",
            ",".join(f"{t.asset}:{t.weight:g}" for t in route.targets),
            route.sticky or "none",
            ",".join(route.fallback) or "-",
            ",".join(f"{s.asset}:{s.sample:g}" for s in route.shadow) or "-",
            f"{route.cache.ttl_s}s/{route.cache.scope}" if route.HasField("cache") else "-",
        ])
    out += _table(table) if routes else ["  (none)"]
    return "\n".join(out).rstrip() + "\n"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _context(a: asset_pb2.Asset) -> str:
    n = a.capabilities.context_length or a.spec.metadata.context_length
    return str(n) if n else "-"


def _dims(a: asset_pb2.Asset) -> str:
    n = a.capabilities.embedding_dim or a.spec.metadata.embedding_dim
    return str(n) if n else "-"


def list_models(address: str | None = None) -> int:
    """Print the admin view of every asset, read from the registry (and so from Postgres)."""
    settings = RegistrySettings()
    address = address or settings.registry_address
    try:
        assets = asyncio.run(fetch_all(address, settings))
    except grpc.aio.AioRpcError as exc:
        return _rpc_failure("cannot list assets", address, exc)
    print(render_models(assets), end="")
    return 0
