"""The registry as operations see it: read an asset, report what was observed, delete it.

Failed calls come back as the domain error the registry raised (`AssetNotFound`...); a
registry that cannot be reached becomes `ModelNotReady`, which operations treat as transient.
"""

from __future__ import annotations

import grpc

from roundhouse.v1 import asset_pb2, registry_pb2, registry_pb2_grpc
from services.common.asset_proto import STATES, AssetRecord, record_from_proto
from services.common.errors import FailedPrecondition
from services.common.grpc_client import domain_error, open_channel
from services.common.registry_reads import list_all_assets
from services.common.route_proto import Stored, route_document_from_proto, stored_from_proto
from services.common.routespec import RouteSpec, parse_route
from services.common.settings import CommonSettings

UNAVAILABLE = "the registry is unavailable"


class RegistryClient:
    """Typed calls to `roundhouse.v1.Registry` over one channel."""

    def __init__(self, address: str, settings: CommonSettings | None = None, *, timeout_s: float = 10.0) -> None:
        """`settings`: TLS and the internal token (see `open_channel`)."""
        self.address = address
        self._timeout_s = timeout_s
        self._channel = open_channel(address, settings)
        self._stub = registry_pb2_grpc.RegistryStub(self._channel)

    async def get_stored(self, asset_id: str) -> Stored:
        """The model or route with that id; `AssetNotFound` when the registry has none."""
        try:
            reply = await self._stub.GetAsset(
                registry_pb2.GetAssetRequest(asset_id=asset_id), timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            raise domain_error(exc, unavailable=UNAVAILABLE) from None
        return stored_from_proto(reply)

    async def get_asset(self, asset_id: str) -> AssetRecord:
        """The model with that id; `AssetNotFound` when the registry has none,
        `FailedPrecondition` for a route (nothing of it is installed or loaded)."""
        stored = await self.get_stored(asset_id)
        if not isinstance(stored, AssetRecord):
            raise FailedPrecondition(f"asset '{asset_id}' is a route: routes are not installed, "
                                     "loaded or unloaded (their targets are)")
        return stored

    async def report_state(
        self, asset_id: str, state: str, *, message: str = "", store_path: str = "",
        worker_ids: list[str] | None = None, capabilities: asset_pb2.Capabilities | None = None,
    ) -> None:
        """Record the asset's observed state (`installing`, `installed`, `loaded`, ...).

        An empty `store_path` keeps the stored one; `worker_ids` replace the stored ones (states
        off every worker clear them); `capabilities`, when given, replace the stored ones.
        """
        status = asset_pb2.AssetStatus(state=STATES[state], message=message, store_path=store_path,
                                       worker_ids=worker_ids or [])
        request = registry_pb2.ReportAssetStatusRequest(asset_id=asset_id, status=status)
        if capabilities is not None:
            request.capabilities.CopyFrom(capabilities)
        try:
            await self._stub.ReportAssetStatus(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise domain_error(exc, unavailable=UNAVAILABLE) from None

    async def list_assets(self) -> list[AssetRecord]:
        """Every model in the registry (routes are left out)."""
        return [record_from_proto(a) for a in await self._list("model")]

    async def list_routes(self) -> list[RouteSpec]:
        """Every route in the registry."""
        return [parse_route(route_document_from_proto(a.spec)) for a in await self._list("route")]

    async def _list(self, asset_class: str) -> list[asset_pb2.Asset]:
        try:
            return await list_all_assets(self._stub, timeout_s=self._timeout_s, asset_class=asset_class)
        except grpc.aio.AioRpcError as exc:
            raise domain_error(exc, unavailable=UNAVAILABLE) from None

    async def delete_asset(self, asset_id: str) -> None:
        """Remove the asset from the registry (`AssetNotFound` when it is already gone)."""
        try:
            await self._stub.DeleteAsset(
                registry_pb2.DeleteAssetRequest(asset_id=asset_id), timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            raise domain_error(exc, unavailable=UNAVAILABLE) from None

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close(grace=None)
