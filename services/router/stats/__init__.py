"""Admin statistics: models with their state and request figures, totals, resources and usage
series (see `AdminStats`). No protobuf here: the sources are converted before they arrive."""

from services.router.stats.model import (
    FailedHere,
    HeldModel,
    ModelState,
    ModelStats,
    RequestFigures,
    Resources,
    SeriesBy,
    SeriesPoint,
    StoreUse,
    Summary,
    WorkerResources,
    WorkerView,
)
from services.router.stats.service import MAX_BUCKETS, AdminStats, capabilities_of, series_bucket

__all__ = [
    "MAX_BUCKETS",
    "AdminStats",
    "FailedHere",
    "HeldModel",
    "ModelState",
    "ModelStats",
    "RequestFigures",
    "Resources",
    "SeriesBy",
    "SeriesPoint",
    "StoreUse",
    "Summary",
    "WorkerResources",
    "WorkerView",
    "capabilities_of",
    "series_bucket",
]
