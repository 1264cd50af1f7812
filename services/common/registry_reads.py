"""Reads of the registry that every caller does the same way."""

from __future__ import annotations

from roundhouse.v1 import asset_pb2, registry_pb2, registry_pb2_grpc

PAGE_SIZE = 500


async def list_all_assets(
    stub: registry_pb2_grpc.RegistryStub, *, timeout_s: float, asset_class: str = ""
) -> list[asset_pb2.Asset]:
    """Every asset (of `asset_class` when given: `model`, `route`), following
    `next_page_token`; each page call gets `timeout_s`.

    Raises `grpc.aio.AioRpcError` as the registry answered; callers map it to their errors.
    """
    assets: list[asset_pb2.Asset] = []
    token = ""
    while True:
        page = await stub.ListAssets(
            registry_pb2.ListAssetsRequest(page_size=PAGE_SIZE, page_token=token, asset_class=asset_class),
            timeout=timeout_s
        )
        assets += page.assets
        token = page.next_page_token
        if not token:
            return assets
