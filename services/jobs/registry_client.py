"""The registry as operations see it: read an asset, report what was observed, delete it.

Failed calls come back as the domain error the registry raised (`AssetNotFound`...); a
registry that cannot be reached becomes `ModelNotReady`, which operations treat as transient.
"""

from __future__ import annotations

import grpc

from roundhouse.v1 import asset_pb2, registry_pb2, registry_pb2_grpc
from services.common.asset_proto import STATES, AssetRecord, record_from_proto
from services.common.grpc_client import domain_error, open_channel
from services.common.registry_reads import list_all_assets
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

    async def get_asset(self, asset_id: str) -> AssetRecord:
        """The asset with that id; `AssetNotFound` when the registry has none."""
        try:
            reply = await self._stub.GetAsset(
                registry_pb2.GetAssetRequest(asset_id=asset_id), timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            raise domain_error(exc, unavailable=UNAVAILABLE) from None
        return record_from_proto(reply)

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
        """Every asset in the registry."""
        try:
            assets = await list_all_assets(self._stub, timeout_s=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise domain_error(exc, unavailable=UNAVAILABLE) from None
        return [record_from_proto(a) for a in assets]

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
