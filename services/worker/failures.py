"""The models that failed on a worker: loads that failed, and held models whose engine died."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, MutableMapping
from datetime import UTC, datetime

from services.common.asset_proto import AssetRecord
from services.worker.holdings import FailedModelInfo, FailureStage, HeldModel, mib, not_held_error

log = logging.getLogger(__name__)

Publish = Callable[..., None]
"""Publishes a model event: `publish(kind, asset_id, **detail)`."""


class FailedModels:
    """What failed on this worker, each kept until a load of its asset succeeds.

    A held model whose engine died is dropped from the held models: the requests queued for
    it are refused with `NotFound` (saying why), it is closed in the background, then
    `model.degraded` is published with the memory it freed.
    """

    def __init__(self, publish: Publish, held: MutableMapping[str, HeldModel]) -> None:
        self._publish = publish
        self._held = held
        self._failed: dict[str, FailedModelInfo] = {}
        self._dropping: set[asyncio.Task[None]] = set()

    def get(self, asset_id: str) -> FailedModelInfo | None:
        """Why `asset_id` last failed here, if it did and has not loaded since."""
        return self._failed.get(asset_id)

    def all(self) -> tuple[FailedModelInfo, ...]:
        """Every failure remembered."""
        return tuple(self._failed.values())

    def forget(self, asset_id: str) -> None:
        """`asset_id` loaded: its failure is over."""
        self._failed.pop(asset_id, None)

    def load_failed(self, record: AssetRecord, reason: str) -> None:
        """Remember a failed load and publish `model.load_failed`."""
        self._remember(record, reason, "load")
        self._publish("model.load_failed", record.spec.asset_id, reason=reason)

    def drop(self, held: HeldModel, reason: str, worker_id: str) -> bool:
        """`held`'s engine died (called on the loop): drop it now if it is still held, and say
        whether it was; a model no longer held (replaced, or unloaded) is only logged."""
        asset_id = held.asset_id
        if self._held.get(asset_id) is not held:
            # A replaced revision finishing its last requests, or already unloaded: they failed.
            log.warning("model %s (revision %d), no longer held, failed: %s", asset_id, held.record.revision,
                        reason)
            return False
        del self._held[asset_id]
        failed = self._remember(held.record, reason, "engine")
        held.slots.refuse_waiters(lambda: not_held_error(asset_id, worker_id, failed))
        log.error("model %s (revision %d) failed on worker %s and was dropped, freeing %s: %s", asset_id,
                  held.record.revision, worker_id, mib(held.memory_bytes), reason)
        task = asyncio.create_task(self._close(held, failed), name=f"drop-{asset_id}")
        self._dropping.add(task)
        task.add_done_callback(self._dropping.discard)
        return True

    async def dropped(self) -> None:
        """Wait until every dropped model is closed."""
        await asyncio.gather(*self._dropping, return_exceptions=True)

    def _remember(self, record: AssetRecord, reason: str, stage: FailureStage) -> FailedModelInfo:
        failed = FailedModelInfo(record.spec.asset_id, record.revision, reason, datetime.now(UTC), stage)
        self._failed[failed.asset_id] = failed
        return failed

    async def _close(self, held: HeldModel, failed: FailedModelInfo) -> None:
        """Close a failed model (its requests have ended) and publish `model.degraded`."""
        try:
            await held.model.close()
        except Exception:  # the model is dropped either way; its memory is what is at stake
            log.exception("closing failed model %s", failed.asset_id)
        self._publish("model.degraded", failed.asset_id, reason=failed.reason,
                      memory_bytes=held.memory_bytes)
