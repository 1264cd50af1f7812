"""The router's `roundhouse.v1.Admin` gRPC service: the admin statistics for an admin key."""

from __future__ import annotations

import grpc

from roundhouse.v1 import admin_pb2, admin_pb2_grpc
from services.router.admin_converters import (
    model_to_proto,
    resources_to_proto,
    summary_to_proto,
    window_of,
)
from services.router.keys import KeyAuthenticator, check_admin, credential_from_metadata
from services.router.stats import AdminStats

SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name


class AdminServicer(admin_pb2_grpc.AdminServicer):
    """Thin: checks the admin key, asks `AdminStats`, converts.

    The key comes in `authorization` metadata (`Bearer rh-...`, or `x-api-key`): UNAUTHENTICATED
    without a valid one, PERMISSION_DENIED for a key that is not an admin key. Without an
    authenticator (auth off) every caller is let in, as on the HTTP admin API.
    """

    def __init__(self, stats: AdminStats, authenticator: KeyAuthenticator | None) -> None:
        self._stats = stats
        self._authenticator = authenticator

    async def _check_admin(self, context: grpc.aio.ServicerContext) -> None:
        if self._authenticator is None:
            return
        secret = credential_from_metadata(context.invocation_metadata())
        check_admin(await self._authenticator.authenticate(secret))

    async def ListModelStats(
        self, request: admin_pb2.ListModelStatsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListModelStatsResponse:
        await self._check_admin(context)
        window_s = window_of(request.window_s)
        models = await self._stats.models(runtime=request.runtime, capability=request.capability,
                                          state=request.state, interface=request.interface,
                                          window_s=window_s)
        return admin_pb2.ListModelStatsResponse(window_s=window_s, models=[model_to_proto(m) for m in models])

    async def GetSummary(
        self, request: admin_pb2.GetSummaryRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Summary:
        await self._check_admin(context)
        return summary_to_proto(await self._stats.summary(window_of(request.window_s)))

    async def GetResources(
        self, request: admin_pb2.GetResourcesRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ResourceUse:
        await self._check_admin(context)
        return resources_to_proto(await self._stats.resources())
