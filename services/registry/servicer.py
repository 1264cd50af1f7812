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
    record_to_proto,
)
from services.common.errors import InvalidArgument
from services.common.request_text import check_message_text
from services.common.upstreams import DEFAULT_UPSTREAM_RULES, UpstreamRules
from services.registry.converters import OUTCOMES, apply_items, asset_filter
from services.registry.service import AssetRegistry

NOT_ON_WORKERS = frozenset({"registered", "installing", "installed", "sleeping", "failed"})
"""States in which no worker holds the asset: reporting one clears `worker_ids`."""


class RegistryServicer(registry_pb2_grpc.RegistryServicer):
    """Implements `roundhouse.v1.Registry` over an `AssetRegistry`.

    Every request is first swept for NUL characters, which Postgres cannot store or compare:
    an id, name, filter or document holding one is INVALID_ARGUMENT, never a failed query.
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
            registry_pb2.ApplyResult(asset=record_to_proto(record), outcome=OUTCOMES[outcome])
            for record, outcome in results
        ])

    async def GetAsset(
        self, request: registry_pb2.GetAssetRequest, context: grpc.aio.ServicerContext
    ) -> asset_pb2.Asset:
        check_message_text(request)
        return record_to_proto(await self._registry.get(request.asset_id))

    async def ListAssets(
        self, request: registry_pb2.ListAssetsRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ListAssetsResponse:
        check_message_text(request)
        records, token = await self._registry.list_assets(
            asset_filter(request), page_size=request.page_size, page_token=request.page_token
        )
        return registry_pb2.ListAssetsResponse(
            assets=[record_to_proto(r) for r in records], next_page_token=token
        )

    async def DeleteAsset(
        self, request: registry_pb2.DeleteAssetRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.DeleteAssetResponse:
        check_message_text(request)
        expected = request.expected_revision if request.HasField("expected_revision") else None
        record = await self._registry.delete(request.asset_id, expected)
        return registry_pb2.DeleteAssetResponse(asset=record_to_proto(record))

    async def ResolveAsset(
        self, request: registry_pb2.ResolveAssetRequest, context: grpc.aio.ServicerContext
    ) -> asset_pb2.Asset:
        check_message_text(request)
        if not request.name:
            raise InvalidArgument("name: required")
        interface = INTERFACE_NAMES.get(request.interface, "") if request.interface else ""
        return record_to_proto(await self._registry.resolve(request.name, interface))

    async def ReportAssetStatus(
        self, request: registry_pb2.ReportAssetStatusRequest, context: grpc.aio.ServicerContext
    ) -> asset_pb2.Asset:
        check_message_text(request)
        status = request.status
        state = STATE_NAMES.get(status.state, "")
        fields: dict[str, Any] = {"message": status.message}
        if status.store_path:
            fields["store_path"] = status.store_path
        if status.worker_ids or state in NOT_ON_WORKERS:
            fields["worker_ids"] = list(status.worker_ids)
        if status.HasField("last_used_at"):
            fields["last_used_at"] = status.last_used_at.ToJsonString()
        record = await self._registry.report_status(
            request.asset_id,
            state=state,
            status=fields,
            capabilities=capabilities_from_proto(request.capabilities)
            if request.HasField("capabilities") else None,
        )
        return record_to_proto(record)
