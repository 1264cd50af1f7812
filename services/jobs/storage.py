"""The model store's disk use: what the admin statistics show beside its quota. No protobuf here.

Assets with the same source share one folder in the store (see `ModelStore.folder_for`), so
each of them is shown with that folder's bytes; `used_bytes` counts every byte once, installs
in progress included. Remote (`url`) assets and assets not installed hold nothing and are left
out. Walking the store reads every file's size, so it runs in a thread.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from services.common.modelstore import ModelStore
from services.common.modelstore.files import tree_bytes
from services.jobs.registry_client import RegistryClient


@dataclass(frozen=True)
class AssetBytes:
    """The bytes one asset's installed files take in the store."""

    asset_id: str
    bytes: int


@dataclass(frozen=True)
class StoreUsage:
    """The store's root, the bytes it holds, its quota (None: no quota) and each asset's share."""

    path: str
    used_bytes: int
    quota_bytes: int | None
    assets: list[AssetBytes] = field(default_factory=list)


class StorageReport:
    """Measures the model store against its quota (`ROUNDHOUSE_MAX_STORAGE_GB`)."""

    def __init__(self, store: ModelStore, registry: RegistryClient, quota_bytes: int | None) -> None:
        self._store = store
        self._registry = registry
        self._quota_bytes = quota_bytes

    async def usage(self) -> StoreUsage:
        """The store now: total bytes, quota, and the installed assets, largest first."""
        folders: dict[Path, list[str]] = defaultdict(list)
        for record in await self._registry.list_assets():
            if record.spec.source.kind != "url":
                folders[self._store.folder_for(record.spec.source)].append(record.spec.asset_id)
        used, by_folder = await asyncio.to_thread(self._measure, list(folders))
        assets = [AssetBytes(asset_id, size)
                  for folder, size in by_folder.items() for asset_id in folders[folder]]
        assets.sort(key=lambda a: (-a.bytes, a.asset_id))
        return StoreUsage(str(self._store.root), used, self._quota_bytes, assets)

    def _measure(self, folders: list[Path]) -> tuple[int, dict[Path, int]]:
        sizes = {folder: tree_bytes(folder) for folder in folders if folder.is_dir()}
        return self._store.usage_bytes(), sizes
