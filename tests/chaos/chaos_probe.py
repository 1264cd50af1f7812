"""Looking at the stack from outside: is every service serving, is the `running` model back?

`Probe` asks each service's gRPC health, the worker what it holds, the registry what it
observed, and the router's `/readyz`. `wait_recovered` polls them, with the steady load's own
answers, until the whole stack serves again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import grpc
import httpx
from chaos_faults import Injection
from chaos_load import SteadyLoad
from chaos_stack import SERVICES, ChaosStack
from grpc_health.v1 import health_pb2, health_pb2_grpc
from polling import wait_until
from pydantic import SecretStr
from stack_harness import TINY_EMBED

from roundhouse.v1 import (
    asset_pb2,
    jobs_pb2,
    jobs_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from services.common.grpc_client import open_channel
from services.common.settings import CommonSettings

RECOVERY_S = 60.0
"""The bound within which the stack must serve again once a fault is lifted."""
PROBE_CALL_S = 1.0


class Probe:
    """Channels to every service (with the internal token) and the questions the suite asks."""

    def __init__(self, stack: ChaosStack) -> None:
        settings = CommonSettings(internal_token=SecretStr(stack.internal_token), home=stack.log.parent)
        self._stack = stack
        self._channels = {name: open_channel(address, settings) for name, address in stack.addresses.items()}
        self._http = httpx.AsyncClient(timeout=PROBE_CALL_S)

    async def close(self) -> None:
        """Close every channel."""
        for channel in self._channels.values():
            await channel.close(grace=None)
        await self._http.aclose()

    async def serving(self, service: str) -> bool:
        """Whether the service's gRPC health says SERVING."""
        health = health_pb2_grpc.HealthStub(self._channels[service])
        try:
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=PROBE_CALL_S)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def router_ready(self) -> bool:
        """Whether the router's HTTP `/readyz` answers 200."""
        try:
            reply = await self._http.get(self._stack.http_url.removesuffix("/v1") + "/readyz")
        except httpx.HTTPError:
            return False
        return reply.status_code == 200

    async def worker_info(self) -> worker_pb2.WorkerInfo | None:
        """What the worker says it holds; None when it does not answer."""
        control = worker_pb2_grpc.WorkerControlStub(self._channels["worker"])
        try:
            return await control.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest(), timeout=PROBE_CALL_S)
        except grpc.aio.AioRpcError:
            return None

    async def asset_state(self, asset_id: str) -> str:
        """The registry's observed state of the asset (`LOADED`...), `unknown` when it does not
        answer."""
        registry = registry_pb2_grpc.RegistryStub(self._channels["registry"])
        try:
            asset = await registry.GetAsset(registry_pb2.GetAssetRequest(asset_id=asset_id),
                                            timeout=PROBE_CALL_S)
        except grpc.aio.AioRpcError:
            return "unknown"
        return asset_pb2.AssetState.Name(asset.status.state).removeprefix("ASSET_STATE_")


    async def put_to_sleep(self, asset_id: str) -> None:
        """Unload the asset from every worker (forced) through the jobs service, and wait until
        that operation has succeeded: its next request has to wake it."""
        jobs = jobs_pb2_grpc.JobsStub(self._channels["jobs"])
        submit = jobs_pb2.SubmitOperationRequest(type=jobs_pb2.OPERATION_TYPE_UNLOAD,
                                                 asset_id=asset_id, force=True)
        operation = jobs_pb2.Operation()

        async def submitted() -> bool:
            # UNAVAILABLE says "retry": a peer of the jobs service may still be reconnecting
            # after the previous fault.
            nonlocal operation
            try:
                operation = await jobs.SubmitOperation(submit, timeout=10)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                return False
            return True

        await wait_until(submitted, timeout=30, interval=0.2)
        request = jobs_pb2.GetOperationRequest(operation_id=operation.operation_id)
        finished = (jobs_pb2.OPERATION_STATUS_SUCCEEDED, jobs_pb2.OPERATION_STATUS_FAILED,
                    jobs_pb2.OPERATION_STATUS_CANCELLED)

        async def done() -> bool:
            nonlocal operation
            operation = await jobs.GetOperation(request, timeout=PROBE_CALL_S * 5)
            return operation.status in finished

        await wait_until(done, timeout=30, interval=0.1)
        assert operation.status == jobs_pb2.OPERATION_STATUS_SUCCEEDED, f"the unload failed: {operation}"


@dataclass
class Recovery:
    """When the stack served again after a fault, and what was still missing meanwhile."""

    at: float = 0.0
    """`time.monotonic()` when every condition held (0 while not yet)."""
    router_back: float = 0.0
    """When the router answered again (its gRPC health and `/readyz`)."""
    missing: list[str] = field(default_factory=list)


async def missing_parts(probe: Probe, stack: ChaosStack, load: SteadyLoad, since: float,
                        replaced_pid: int | None = None) -> list[str]:
    """What keeps the stack from serving: each service running (`replaced_pid` by another
    process) and serving, the router ready, the `running` model held and `LOADED`, and a chat
    and an embedding sent after `since` answered."""
    missing = []
    pids = stack.service_pids()
    missing += [f"{name} not running" for name in SERVICES if name not in pids]
    if replaced_pid is not None and replaced_pid in pids.values():
        missing.append(f"the killed process {replaced_pid} still listed")
    missing += [f"{name} not serving" for name in SERVICES if not await probe.serving(name)]
    if not await probe.router_ready():
        missing.append("router /readyz not 200")
    info = await probe.worker_info()
    if info is None or TINY_EMBED not in {m.asset_id for m in info.models}:
        missing.append(f"worker does not hold {TINY_EMBED}")
    state = await probe.asset_state(TINY_EMBED)
    if state != "LOADED":
        missing.append(f"registry says {TINY_EMBED} is {state}")
    for kind in ("chat", "embedding"):
        if not load.successes(kind, since):
            missing.append(f"no {kind} answered since the fault was lifted")
    return missing


async def wait_recovered(probe: Probe, stack: ChaosStack, load: SteadyLoad, injection: Injection) -> Recovery:
    """Poll until the stack serves again (`missing_parts` empty), at most `RECOVERY_S` after the
    fault was lifted; the recovery says when, or what was still missing at the bound."""
    recovery = Recovery()
    replaced = injection.old_pid if injection.fault.action == "sigkill" else None

    async def recovered() -> bool:
        if not recovery.router_back and await probe.serving("router") and await probe.router_ready():
            recovery.router_back = time.monotonic()
        recovery.missing = await missing_parts(probe, stack, load, injection.lifted, replaced)
        if recovery.missing:
            return False
        recovery.at = time.monotonic()
        return True

    try:
        await wait_until(recovered, timeout=RECOVERY_S, interval=0.25)
    except AssertionError:
        pass  # `missing` says what never came back
    return recovery
