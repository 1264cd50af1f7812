"""What a new API key may ask for: its name, models and limits, checked before anything is
stored, each problem named by its field (`rpm`, `models[2]`, ...)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from services.common.assetspec_fields import ASSET_ID_RE
from services.common.errors import FieldProblem, InvalidArgument
from services.common.keys.model import KeyLimits

KEY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
"""A key's name: it is also a NATS subject token (`roundhouse.events.key.revoked.<name>`).
Match it with `fullmatch` (`$` alone lets a trailing newline through); the anchors are for
pydantic's `pattern`."""
DURATION_RE = re.compile(r"^(?:([1-9][0-9]{0,4})([smh])|([1-9][0-9]{0,3})(d)|([1-9][0-9]{0,2})(w))$")
"""A duration: up to 99999 s, m or h, 9999 d or 999 w (27 years at most); `fullmatch` it."""
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_RATE = 1_000_000_000
MAX_BUDGET_TOKENS = 10**15
MAX_BUDGET_USD = Decimal("1000000000")
USD_STEP = Decimal("0.000001")
"""Budgets in dollars are kept to the micro-dollar (rounded)."""
MAX_MODELS = 256


def parse_duration(text: str, path: str = "duration") -> int:
    """Seconds in `30d`, `12h`, `90m`, `45s`, `2w`; InvalidArgument naming `path` otherwise."""
    match = DURATION_RE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise InvalidArgument.from_problems([FieldProblem(
            path, "must be a number and a unit s, m, h, d or w, such as 30d or 12h "
                  "(at most 99999h, 9999d or 999w)")])
    number, unit = (g for g in match.groups() if g is not None)
    return int(number) * _UNIT_S[unit]


@dataclass(frozen=True)
class NewKey:
    """A key to create, as asked for (durations as text, limits as given)."""

    name: str
    models: tuple[str, ...] = ()
    admin: bool = False
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    budget_tokens: int | None = None
    budget_usd: Decimal | str | float | None = None
    budget_period: str | None = None
    expires_in: str | None = None


@dataclass(frozen=True)
class CheckedKey:
    """A new key that passed every check, durations in seconds."""

    name: str
    models: tuple[str, ...]
    admin: bool
    limits: KeyLimits
    expires_in_s: int | None


def check_new_key(new: NewKey) -> CheckedKey:
    """Every problem of `new` at once (InvalidArgument, one line per field), or the checked key."""
    problems: list[FieldProblem] = []
    if not isinstance(new.name, str) or not KEY_NAME_RE.fullmatch(new.name):
        problems.append(FieldProblem("name", "must be 1 to 64 letters, digits, '-' or '_', "
                                             "starting with a letter or digit"))
    if len(new.models) > MAX_MODELS:
        problems.append(FieldProblem("models", f"at most {MAX_MODELS} models"))
    for i, model in enumerate(new.models[:MAX_MODELS]):
        if not isinstance(model, str) or not ASSET_ID_RE.fullmatch(model):
            problems.append(FieldProblem(f"models[{i}]", "is not an asset id or alias"))
    for name, top in (("rpm", MAX_RATE), ("tpm", MAX_RATE), ("max_parallel", MAX_RATE),
                      ("budget_tokens", MAX_BUDGET_TOKENS)):
        value = getattr(new, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(FieldProblem(name, "must be a whole number"))
        elif not 1 <= value <= top:
            problems.append(FieldProblem(name, f"must be between 1 and {top}"))
    usd = _usd(new.budget_usd, problems)
    durations: dict[str, int | None] = {}
    for name in ("budget_period", "expires_in"):
        value = getattr(new, name)
        durations[name] = None
        if value is not None:
            try:
                durations[name] = parse_duration(value, name)
            except InvalidArgument as exc:
                problems.extend(exc.problems)
    if problems:
        raise InvalidArgument.from_problems(problems)
    limits = KeyLimits(rpm=new.rpm, tpm=new.tpm, max_parallel=new.max_parallel,
                       budget_tokens=new.budget_tokens, budget_usd=usd,
                       budget_period_s=durations["budget_period"])
    return CheckedKey(new.name, tuple(dict.fromkeys(new.models)), bool(new.admin), limits,
                      durations["expires_in"])


def _usd(value: Decimal | str | float | None, problems: list[FieldProblem]) -> Decimal | None:
    if value is None:
        return None
    try:
        usd = Decimal(str(value)) if not isinstance(value, bool) else Decimal("nan")
    except InvalidOperation:
        usd = Decimal("nan")
    if not usd.is_finite() or not USD_STEP <= usd <= MAX_BUDGET_USD:
        problems.append(FieldProblem("budget_usd", f"must be a number from {USD_STEP} to {MAX_BUDGET_USD}"))
        return None
    return usd.quantize(USD_STEP)
