"""Jobs settings (`ROUNDHOUSE_*`)."""

from __future__ import annotations

import socket
import uuid

from pydantic import Field

from services.common.modelstore.settings import StoreSettings
from services.common.settings import FleetSettings


def default_instance_id() -> str:
    """`<hostname>-<random>`: unique per process, readable in `lease_owner`."""
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


class JobsSettings(StoreSettings, FleetSettings):
    """Settings of the jobs service: where it listens, what it talks to, how it runs operations."""

    jobs_address: str = "127.0.0.1:50053"
    """Where the Jobs gRPC server listens (`host:port`; port 0 picks a free one)."""

    registry_address: str = "127.0.0.1:50052"
    """The registry's gRPC address; operations read assets and report observed state there."""

    jobs_instance_id: str = Field(default_factory=default_instance_id)
    """This instance's name in `operations.lease_owner`; must differ between live instances."""

    jobs_workers: int = Field(default=2, ge=1)
    """Operations this instance runs at the same time."""

    jobs_metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """Port of the jobs service's Prometheus `/metrics` (`ROUNDHOUSE_JOBS_METRICS_PORT`; 0 picks
    a free one and logs it). Unset: no metrics port. `roundhouse up` sets one."""

    max_storage_gb: float | None = Field(default=None, gt=0)
    """Quota of the model store in GiB; installs that would exceed it fail. Unset: no quota."""

    jobs_lease_s: float = Field(default=30.0, gt=0)
    """Seconds a claim on a running operation lasts without renewal; renewed every third of it
    (at least every 5 s, which is also how soon a cancel sent to another instance lands).
    Another instance takes the operation over once the lease has expired."""

    jobs_poll_interval_s: float = Field(default=1.0, gt=0)
    """How often the executor looks for work queued by other instances or left by dead ones."""

    jobs_max_attempts: int = Field(default=3, ge=1)
    """Attempts of an operation before a transient failure becomes final."""

    jobs_retry_backoff_s: float = Field(default=2.0, gt=0)
    """Wait before the first retry; doubled for every further attempt."""

    jobs_retry_backoff_max_s: float = Field(default=60.0, gt=0)
    """Longest wait between attempts."""

    jobs_cancel_grace_s: float = Field(default=30.0, gt=0)
    """How long a cancelled or timed-out runner may take to clean up before it is abandoned."""

    jobs_install_timeout_s: float = Field(default=3600.0, gt=0)
    """Longest an install may run (downloads and conversions included)."""

    jobs_load_timeout_s: float = Field(default=600.0, gt=0)
    """Longest a load may run."""

    jobs_unload_timeout_s: float = Field(default=120.0, gt=0)
    """Longest an unload may run."""

    jobs_delete_timeout_s: float = Field(default=300.0, gt=0)
    """Longest a delete may run."""

    jobs_profile_timeout_s: float = Field(default=1800.0, gt=0)
    """Longest a profile may run."""

    jobs_reconcile: bool = True
    """Whether this instance runs the reconciler (several instances may; each is safe)."""

    load_failure_cooldown_s: float = Field(default=60.0, ge=0)
    """After a load fails, seconds during which requests for the model are refused with its
    reason (424 `model_failed`) instead of each trying another load; an install or a new
    revision ends it early. The reconciler retries `running` models when it has passed."""

    reconcile_interval_s: float = Field(default=5.0, gt=0)
    """Seconds between reconciler passes (a lost worker starts one at once)."""

    auto_sleep_unit_s: float = Field(default=60.0, gt=0)
    """Seconds in one unit of an asset's `auto_sleep_min`: 60 in production; tests set 1 so
    that `auto_sleep_min: 2` sleeps a model after two idle seconds."""

    jobs_thrashing_evictions: int = Field(default=3, ge=1)
    """Evictions on one worker that bring back a model evicted there within
    `jobs_thrashing_window_s`, at which the models involved count as thrashing: each gets one
    `model.thrashing` event per episode, and they stay loaded `jobs_thrashing_hold_s` (or twice
    their `min_resident_s`) before one may be evicted again."""

    jobs_thrashing_window_s: float = Field(default=600.0, gt=0)
    """Seconds of evictions looked at to find thrashing; an episode ends once this long has
    passed without another eviction that brings a model back."""

    jobs_thrashing_hold_s: float = Field(default=60.0, ge=0)
    """Seconds a thrashing model stays loaded before it may be evicted again (at least; twice
    its `min_resident_s` when that is longer)."""

    def timeouts(self) -> dict[str, float]:
        """Per operation type, the longest it may run in seconds."""
        return {
            "install": self.jobs_install_timeout_s,
            "load": self.jobs_load_timeout_s,
            "unload": self.jobs_unload_timeout_s,
            "delete": self.jobs_delete_timeout_s,
            "profile": self.jobs_profile_timeout_s,
        }
