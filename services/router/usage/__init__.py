"""Usage: the ledger of every request (batched writes off the hot path, flushed on drain)."""

from services.router.usage.ledger import UsageLedger
from services.router.usage.summary import GroupBy, UsageSummary
from services.router.usage.ticket import UsageTicket, status_of

__all__ = ["GroupBy", "UsageLedger", "UsageSummary", "UsageTicket", "status_of"]
