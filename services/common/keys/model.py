"""The domain side of an API key: its identity, scope and limits. No secret is ever held here
(only a hash of it is stored); `prefix` is what may be shown (`rh-abcd…`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from services.common.secrets import ELLIPSIS


@dataclass(frozen=True)
class KeyLimits:
    """What a key may use; None means unlimited."""

    rpm: int | None = None
    """Requests per minute."""
    tpm: int | None = None
    """Tokens (prompt + completion) per minute."""
    max_parallel: int | None = None
    """Requests in flight at once."""
    budget_tokens: int | None = None
    """Tokens per budget period."""
    budget_usd: Decimal | None = None
    """US dollars per budget period, from the assets' `pricing`."""
    budget_period_s: int | None = None
    """Length of a budget period in seconds; None: the budget never renews."""


@dataclass(frozen=True)
class KeyRecord:
    """A stored API key, as the router checks it."""

    key_id: str
    name: str
    prefix: str
    """The start of the secret that may be shown (`rh-abcd`, see `secrets.shown_key_part`)."""
    admin: bool
    models: tuple[str, ...]
    """Asset ids or aliases it may use; empty: every model."""
    limits: KeyLimits = field(default_factory=KeyLimits)
    created_at: datetime | None = None
    expires_at: datetime | None = None
    revoked_at: datetime | None = None

    @property
    def masked(self) -> str:
        """How the key is shown anywhere (logs, the CLI): its prefix and an ellipsis, `rh-abcd…`."""
        return self.prefix + ELLIPSIS
