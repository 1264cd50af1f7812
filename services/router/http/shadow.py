"""`GET /admin/v1/routes/{route_id}/shadow`: what the copies of a route's requests to its
shadow assets showed, one summary per shadow asset (an admin key is needed, as for every
`/admin/v1` route; see `auth`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Path
from pydantic import BaseModel, ConfigDict

from services.common.assetspec_fields import ASSET_ID_RE
from services.common.errors import NotFound
from services.router.http.admin import INVALID, Responses
from services.router.http.protocol import ErrorResponse
from services.router.routes.shadow import AgreementKind, ShadowTraffic

RouteKnown = Callable[[str], Awaitable[bool]]
"""`known(route_id)`: whether an asset of class `route` has that id."""
RouteId = Annotated[str, Path(pattern=ASSET_ID_RE.pattern,
                              description="The route's asset id (no aliases here).")]

RESPONSES: Responses = {
    **INVALID,
    404: {"model": ErrorResponse, "description": "No route has that id."},
    503: {"model": ErrorResponse, "description": "Whether the route exists cannot be checked now "
                                                 "(the registry is unavailable); see Retry-After."},
}


class LatencyView(BaseModel):
    """Latency percentiles over the most recent answers; null before the first."""

    p50: float | None
    p95: float | None


class SideView(BaseModel):
    """One side's answers (the primary's, or the shadow's) over the copies."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    latency_ms: LatencyView
    prompt_tokens: int
    """Total over the answers."""
    completion_tokens: int
    """Total over the answers."""


class AgreementView(BaseModel):
    """How far the shadow's answers agree with the primary's."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    kind: AgreementKind | None
    """`exact_match` (chat: the share of greedy answers that are the same text) or `cosine`
    (embeddings: the cosine similarity of the vectors, mean over inputs, mean over copies);
    null before the first answered pair."""
    compared: int
    """Pairs of answers compared."""
    not_compared: int
    """Pairs that could not be: sampled (not greedy) chat answers, vectors of other shapes."""
    value: float | None
    """The exact-match rate or the mean cosine similarity; null before the first comparison."""


class ShadowTargetView(BaseModel):
    """The copies of a route's requests to one shadow asset."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    asset: str
    copies: int
    """Copies finished, answered or failed."""
    running: int
    """Copies the shadow asset is answering now."""
    dropped: dict[str, int]
    """Copies not made, by reason: `saturated` (too many running), `asleep` (the shadow asset
    was asleep and the route may not wake it)..."""
    errors: int
    """Copies the shadow asset failed."""
    primary: SideView
    """The primary's answers to the copied requests (failed or abandoned ones left out)."""
    shadow: SideView
    """The shadow's answers (failed ones left out)."""
    agreement: AgreementView


class RouteShadow(BaseModel):
    """`GET /admin/v1/routes/{route_id}/shadow`."""

    route: str
    shadow: list[ShadowTargetView]


def shadow_router(traffic: ShadowTraffic, known: RouteKnown) -> APIRouter:
    """The admin route over `traffic`'s summaries; `known` says whether a route id without
    any shadow data exists (an empty list) or not (404)."""
    router = APIRouter(prefix="/admin/v1", tags=["admin"])

    @router.get("/routes/{route_id}/shadow", response_model=RouteShadow, responses=RESPONSES)
    async def route_shadow(route_id: RouteId) -> dict[str, Any]:
        """What the copies of the route's requests to each shadow asset showed: copies made,
        running and dropped, errors, latency and tokens on each side, and agreement."""
        summary = traffic.summary(route_id)
        if not summary and not await known(route_id):
            raise NotFound(f"No route {route_id!r}.")
        return {"route": route_id, "shadow": summary}

    return router
