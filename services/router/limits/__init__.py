"""Limit: a key's rpm, tpm, max_parallel and budgets, shared by every router (reserve, settle)."""

from services.router.limits.estimate import Estimate, cost, estimate_chat, estimate_embed
from services.router.limits.limiter import Limiter, Reservation, create_pool, is_limited
from services.router.limits.report import LimitReport, LimitStatus, open_report

__all__ = ["Estimate", "LimitReport", "LimitStatus", "Limiter", "Reservation", "cost",
           "create_pool", "estimate_chat", "estimate_embed", "is_limited", "open_report"]
