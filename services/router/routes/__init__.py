"""Routes: picking the asset that answers a request to a route, and what follows if it fails."""

from services.router.routes.split import (
    NoLiveTarget,
    attempts_header,
    fallback_order,
    pick_target,
    rank_targets,
)

__all__ = ["NoLiveTarget", "attempts_header", "fallback_order", "pick_target", "rank_targets"]
