"""Model names to assets, through the registry, cached and refreshed on `asset.*` events."""

from __future__ import annotations

import asyncio
import time

import grpc

from roundhouse.v1 import registry_pb2, registry_pb2_grpc
from services.common.assetspec_fields import ASSET_ID_RE
from services.common.errors import AssetNotFound
from services.common.grpc_client import domain_error
from services.common.registry_reads import list_all_assets
from services.common.request_text import shown
from services.common.route_proto import Stored, check_serves, stored_from_proto
from services.router.metrics.spans import step

CACHE_TTL_S = 30.0
SNAPSHOT_TTL_S = 1.0

Records = list[Stored]


class AssetCatalog:
    """Resolves a request's model (id or alias) to its asset.

    Entries live until an `asset.*` event (see `invalidate`) or for `CACHE_TTL_S` as a
    safety net against missed events. Misses are not cached.
    """

    def __init__(self, registry: registry_pb2_grpc.RegistryStub) -> None:
        self._registry = registry
        self._cache: dict[str, tuple[float, Stored]] = {}
        self._snapshot: tuple[float, Records] | None = None
        self._fetching: asyncio.Future[Records] | None = None

    @property
    def registry(self) -> registry_pb2_grpc.RegistryStub:
        """The registry the catalog reads."""
        return self._registry

    async def resolve(self, name: str, interface: str) -> Stored:
        """The model or route `name` designates, checked for `interface`; domain errors otherwise.

        A name no asset id or alias could have (they match `ASSET_ID_RE`) is not found at
        once, without asking the registry. The lookup is a `resolve` span.
        """
        with step("resolve", current=True):
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
                entry = (time.monotonic(), stored_from_proto(reply))
                self._cache[name] = entry
            check_serves(entry[1], name, interface)
            return entry[1]

    async def list(self) -> list[Stored]:
        """Every model and route, from the registry (not cached: listing must be current). The answer is
        kept as the latest `snapshot`."""
        try:
            assets = await list_all_assets(self._registry, timeout_s=10)
        except grpc.aio.AioRpcError as exc:
            raise domain_error(exc, unavailable="the registry is unavailable") from None
        records = [stored_from_proto(a) for a in assets]
        self._snapshot = (time.monotonic(), records)
        return records

    async def snapshot(self) -> Records:
        """Every asset as the registry had it at most `SNAPSHOT_TTL_S` ago, and not before the
        last `asset.*` event: for answers that may be a moment old (a model card's state,
        readiness), at most one registry round trip per `SNAPSHOT_TTL_S` however many ask.
        Callers that find no asset for a name ask `list` again: an asset just applied is found."""
        if self._snapshot is not None and time.monotonic() - self._snapshot[0] < SNAPSHOT_TTL_S:
            return self._snapshot[1]
        if self._fetching is None:
            self._fetching = asyncio.ensure_future(self.list())
            self._fetching.add_done_callback(self._fetched)
        # Shielded: one caller giving up does not cancel the fetch the others wait for.
        return await asyncio.shield(self._fetching)

    def _fetched(self, task: asyncio.Future[Records]) -> None:
        if self._fetching is task:
            self._fetching = None
        if not task.cancelled():
            task.exception()  # retrieved here: a failure is the waiting callers' to report

    def invalidate(self) -> None:
        """Forget every cached entry (an alias may have moved to another asset)."""
        self._cache.clear()
        self._snapshot = None
