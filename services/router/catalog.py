"""Model names to assets, through the registry, cached and refreshed on `asset.*` events."""

from __future__ import annotations

import time

import grpc

from roundhouse.v1 import registry_pb2, registry_pb2_grpc
from services.common.asset_proto import AssetRecord, check_serves, record_from_proto
from services.common.assetspec import ASSET_ID_RE
from services.common.errors import AssetNotFound
from services.common.grpc_client import domain_error
from services.common.registry_reads import list_all_assets
from services.common.request_text import shown

CACHE_TTL_S = 30.0


class AssetCatalog:
    """Resolves a request's model (id or alias) to its asset.

    Entries live until an `asset.*` event (see `invalidate`) or for `CACHE_TTL_S` as a
    safety net against missed events. Misses are not cached.
    """

    def __init__(self, registry: registry_pb2_grpc.RegistryStub) -> None:
        self._registry = registry
        self._cache: dict[str, tuple[float, AssetRecord]] = {}

    async def resolve(self, name: str, interface: str) -> AssetRecord:
        """The asset `name` designates, checked for `interface`; domain errors otherwise.

        A name no asset id or alias could have (they match `ASSET_ID_RE`) is not found at
        once, without asking the registry.
        """
        if not ASSET_ID_RE.fullmatch(name):
            raise AssetNotFound(f"model {shown(name)} not found")
        entry = self._cache.get(name)
        if entry is None or time.monotonic() - entry[0] > CACHE_TTL_S:
            try:
                reply = await self._registry.ResolveAsset(
                    registry_pb2.ResolveAssetRequest(name=name), timeout=10
                )
            except grpc.aio.AioRpcError as exc:
                raise domain_error(exc, unavailable="the registry is unavailable") from None
            entry = (time.monotonic(), record_from_proto(reply))
            self._cache[name] = entry
        check_serves(entry[1], name, interface)
        return entry[1]

    async def list(self) -> list[AssetRecord]:
        """Every asset, from the registry (not cached: listing must be current)."""
        try:
            assets = await list_all_assets(self._registry, timeout_s=10)
        except grpc.aio.AioRpcError as exc:
            raise domain_error(exc, unavailable="the registry is unavailable") from None
        return [record_from_proto(a) for a in assets]

    def invalidate(self) -> None:
        """Forget every cached entry (an alias may have moved to another asset)."""
        self._cache.clear()
