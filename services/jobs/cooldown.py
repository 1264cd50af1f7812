"""Failed models and their cooldown: one load attempt per cooldown, not one per request.

A model whose load failed (not installed, broken weights, too big for every worker) is
`failed` in the registry, with the reason as its status message and the time of the failure
as its status `updated_at`. Until the cooldown has passed, requests for it are refused at
once with `ModelFailed` (naming the reason) instead of each starting another load that
would fail the same way. An install or a new revision moves the asset out of `failed`, so
the next request (or the reconciler) tries again at once.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

from services.common.asset_proto import AssetRecord
from services.common.errors import ModelFailed


def failed_at(record: AssetRecord) -> datetime | None:
    """When the asset entered `failed` (None when it is not failed)."""
    if record.state != "failed":
        return None
    stamp = record.status.get("updated_at")
    if not stamp:
        return datetime.min.replace(tzinfo=UTC)  # failed long ago, as far as anyone knows
    when = datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def cooldown_left_s(record: AssetRecord, cooldown_s: float, now: datetime | None = None) -> float:
    """Seconds until a failed asset may be loaded again; 0 when it may be loaded now."""
    when = failed_at(record)
    if when is None:
        return 0.0
    elapsed = ((now or datetime.now(UTC)) - when).total_seconds()
    return max(0.0, cooldown_s - elapsed)


def model_failed(asset_id: str, reason: str, retry_in_s: float) -> ModelFailed:
    """The error a request for a failed model gets: the reason, and when it is tried again."""
    reason = reason.strip().rstrip(".") or "its last load failed"
    return ModelFailed(
        f"model '{asset_id}' cannot be served: {reason}. The next load is tried in "
        f"{math.ceil(retry_in_s)}s, or at once after an install or a new revision."
    )


def check_not_cooling(record: AssetRecord, cooldown_s: float) -> None:
    """Raise `ModelFailed` while a failed asset's cooldown runs."""
    left = cooldown_left_s(record, cooldown_s)
    if left > 0:
        raise model_failed(record.spec.asset_id, str(record.status.get("message", "")), left)
