"""Registry gRPC servicer: convert, await the domain, convert back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc

from roundhouse.v1 import asset_pb2, registry_pb2, registry_pb2_grpc
from services.common.asset_proto import (
    INTERFACE_NAMES,
    STATE_NAMES,
    capabilities_from_proto,
)
from services.common.assetspec_fields import check_asset_id
from services.common.errors import InvalidArgument
from services.common.request_text import check_message_text
from services.common.route_proto import stored_to_proto
from services.common.upstreams import DEFAULT_UPSTREAM_RULES, UpstreamRules
from services.registry import validation
from services.registry.converters import OUTCOMES, apply_items, asset_filter
from services.registry.service import AssetRegistry

NOT_ON_WORKERS = frozenset({"registered", "installing", "installed", "sleeping", "failed"})
"""States in which no worker holds the asset: reporting one clears `worker_ids`."""


class RegistryServicer(registry_pb2_grpc.RegistryServicer):
    """Implements `roundhouse.v1.Registry` over an `AssetRegistry`.

    Every request is first swept for NUL characters, which Postgres cannot store or compare:
    an id, name, filter or document holding one is INVALID_ARGUMENT, never a failed query.
    Ids, names, filters and reports are then checked (`validation`): an ill-formed one is
    INVALID_ARGUMENT naming its field, a well-formed id no asset has NOT_FOUND.
    """

    def __init__(
        self, registry: AssetRegistry, source_roots: list[Path],
        upstreams: UpstreamRules = DEFAULT_UPSTREAM_RULES,
    ) -> None:
        self._registry = registry
        self._source_roots = source_roots
        self._upstreams = upstreams

    async def ApplyAssets(
        self, request: registry_pb2.ApplyAssetsRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ApplyAssetsResponse:
        check_message_text(request)
        items = apply_items(request, self._source_roots, self._upstreams)
        results = await self._registry.apply(items, dry_run=request.dry_run)
        return registry_pb2.ApplyAssetsResponse(results=[
            registry_pb2.ApplyResult(asset=stored_to_proto(record), outcome=OUTCOMES[outcome])
            for record, outcome in results
        ])

    async def GetAsset(
        self, request: registry_pb2.GetAssetRequest, context: grpc.aio.ServicerContext
    ) -> asset_pb2.Asset:
        check_message_text(request)
        return stored_to_proto(await self._registry.get(check_asset_id(request.asset_id)))

    async def ListAssets(
        self, request: registry_pb2.ListAssetsRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ListAssetsResponse:
        check_message_text(request)
        records, token = await self._registry.list_assets(
            asset_filter(request), page_size=request.page_size, page_token=request.page_token
        )
        return registry_pb2.ListAssetsResponse(
            assets=[stored_to_proto(r) for r in records], next_page_token=token
        )

    async def DeleteAsset(
        self, request: registry_pb2.DeleteAssetRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.DeleteAssetResponse:
        check_message_text(request)
        expected = request.expected_revision if request.HasField("expected_revision") else None
        record = await self._registry.delete(check_asset_id(request.asset_id), expected)
        return registry_pb2.DeleteAssetResponse(asset=stored_to_proto(record))

    async def ResolveAsset(
        self, request: registry_pb2.ResolveAssetRequest, context: grpc.aio.ServicerContext
    ) -> asset_pb2.Asset:
        check_message_text(request)
        name = check_asset_id(request.name, "name")
        if request.interface and request.interface not in INTERFACE_NAMES:
            raise InvalidArgument(f"interface: {request.interface} is not an interface")
        interface = INTERFACE_NAMES.get(request.interface, "")
        return stored_to_proto(await self._registry.resolve(name, interface))

    async def ReportAssetStatus(
        self, request: registry_pb2.ReportAssetStatusRequest, context: grpc.aio.ServicerContext
    ) -> asset_pb2.Asset:
        check_message_text(request)
        asset_id = check_asset_id(request.asset_id)
        status = request.status
        if status.state and status.state not in STATE_NAMES:
            raise InvalidArgument(f"status.state: {status.state} is not an asset state")
        state = STATE_NAMES.get(status.state, "")
        validation.reported_status(status.store_path, status.worker_ids)
        fields: dict[str, Any] = {"message": validation.status_message(status.message)}
        if status.store_path:
            fields["store_path"] = status.store_path
        if status.worker_ids or state in NOT_ON_WORKERS:
            fields["worker_ids"] = list(status.worker_ids)
        if status.HasField("last_used_at"):
            fields["last_used_at"] = validation.timestamp_text(status.last_used_at, "status.last_used_at")
        capabilities = None
        if request.HasField("capabilities"):
            if request.capabilities.HasField("detected_at"):
                validation.timestamp_text(request.capabilities.detected_at, "capabilities.detected_at")
            capabilities = capabilities_from_proto(request.capabilities)
        record = await self._registry.report_status(
            asset_id, state=state, status=fields, capabilities=capabilities)
        return stored_to_proto(record)
