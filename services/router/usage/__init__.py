"""Usage: the ledger of every request (batched writes off the hot path, flushed on drain)."""

from services.router.usage.ledger import UsageLedger
from services.router.usage.summary import GroupBy, KeyTotals, UsageSummary
from services.router.usage.ticket import UsageTicket

__all__ = ["GroupBy", "KeyTotals", "UsageLedger", "UsageSummary", "UsageTicket"]
