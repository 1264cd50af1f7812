"""The labels that name a model on every per-model Prometheus series, the router's and the
workers' alike: `asset_id`, `interface` (the asset's interfaces, comma-joined, as the worker
writes them) and `model_type` (the asset's runtime).

A request that reached no model (the router) or came for one the worker does not hold is
counted with an empty id and type, so a made-up name never opens a series of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import Counter

from services.common.asset_proto import AssetRecord
from services.common.assetspec import AssetSpec

MODEL_LABELS = ("asset_id", "interface", "model_type")
ModelLabels = tuple[str, str, str]


def model_labels(asset: AssetSpec | AssetRecord | None, interface: str = "") -> ModelLabels:
    """The values of `MODEL_LABELS` for an asset (its spec or its record); for none, the
    `interface` the request asked for (if any) and an empty id and type."""
    if asset is None:
        return "", interface, ""
    spec = asset.spec if isinstance(asset, AssetRecord) else asset
    return spec.asset_id, ",".join(spec.interface), spec.runtime


class StatusCounters:
    """The series of a request counter (labelled `*labels, status`) for one model, one per
    status, each resolved at its first use: counting a request is then a dict lookup and an
    `inc`. Statuses are a closed set (`ok`, `cancelled`, the failures' names), so the series
    stay few."""

    __slots__ = ("_counter", "_labels", "_by_status")

    def __init__(self, counter: Counter, labels: Sequence[str]) -> None:
        self._counter = counter
        self._labels = tuple(labels)
        self._by_status: dict[str, Counter] = {}

    def of(self, status: str) -> Counter:
        """The counter of requests that ended with `status`."""
        counter = self._by_status.get(status)
        if counter is None:
            counter = self._by_status[status] = self._counter.labels(*self._labels, status)
        return counter
