"""What the admin UI's model buttons do: operations through the jobs service, and disabling (or
enabling) a model by re-applying its asset with another desired state through the registry.

A disabled model (`lifecycle.desired: disabled`) is refused by name and unloaded by the workers'
reconciliation, as when an operator applies the document with that state; enabling it applies
`on-demand` (loaded by its next request). The apply names the revision it read, so an apply that
came in between is not overwritten (the registry answers ABORTED and the operator retries).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import grpc

from roundhouse.v1 import asset_pb2, jobs_pb2, jobs_pb2_grpc, registry_pb2, registry_pb2_grpc
from services.common.grpc_client import domain_error
from services.common.operation_names import TYPES
from services.router.stats import ModelStats

OperationKind = Literal["install", "load", "unload", "profile"]
OPERATIONS: tuple[OperationKind, ...] = ("install", "load", "unload", "profile")
Toggle = Literal["disable", "enable"]


def actions_for(model: ModelStats) -> list[str]:
    """The buttons a model's row offers in its state."""
    return {
        "not_installed": ["install", "disable"],
        "sleeping": ["load", "profile", "disable"],
        "loading": ["unload"],
        "loaded": ["unload", "profile", "disable"],
        "failed": ["load", "unload", "disable"],
        "disabled": ["enable"],
    }.get(model.state, [])


async def _call(call: Any, unavailable: str) -> Any:
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        raise domain_error(exc, unavailable=unavailable) from None


class ModelActions:
    """Model operations and the desired-state toggle, for the UI's buttons."""

    def __init__(self, jobs: jobs_pb2_grpc.JobsStub,
                 registry: Callable[[], registry_pb2_grpc.RegistryStub]) -> None:
        """`registry()`: the registry client to re-apply assets with (asked when needed)."""
        self._jobs = jobs
        self._registry = registry

    async def submit(self, kind: OperationKind, asset_id: str) -> jobs_pb2.Operation:
        """Queue an operation on the model; the operation as queued."""
        return await _call(self._jobs.SubmitOperation(jobs_pb2.SubmitOperationRequest(
            type=TYPES[kind], asset_id=asset_id), timeout=30),
            "the jobs service is unavailable; retry later")

    async def toggle(self, action: Toggle, asset_id: str) -> asset_pb2.Asset:
        """Disable the model, or enable it again (`on-demand`); the asset as stored after."""
        registry = self._registry()
        unavailable = "the registry is unavailable; retry later"
        asset = await _call(registry.GetAsset(registry_pb2.GetAssetRequest(asset_id=asset_id),
                                                    timeout=10), unavailable)
        spec = asset_pb2.AssetSpec()
        spec.CopyFrom(asset.spec)
        if action == "disable":
            spec.lifecycle.desired = asset_pb2.DESIRED_STATE_DISABLED
            spec.lifecycle.ClearField("auto_sleep_min")  # sleeping does not apply to a disabled model
        else:
            spec.lifecycle.desired = asset_pb2.DESIRED_STATE_ON_DEMAND
        reply = await _call(registry.ApplyAssets(registry_pb2.ApplyAssetsRequest(assets=[
            registry_pb2.AssetApply(spec=spec, expected_revision=asset.revision)]), timeout=30),
            unavailable)
        result: asset_pb2.Asset = reply.results[0].asset
        return result
