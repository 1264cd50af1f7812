"""The admin API over API keys: `POST /admin/v1/keys` (the secret is shown once, in the reply),
`GET /admin/v1/keys`, `DELETE /admin/v1/keys/{name}` (revoke; every router stops accepting
it at once). An admin key is needed (see `auth`).

The body schema is exactly as strict as `services.common.keys.validation`, so any body it
allows is accepted and any other is a 400 naming the field.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from services.common.assetspec_fields import ASSET_ID_RE
from services.common.errors import ModelNotReady
from services.common.keys import KeyRecord, KeyStore, NewKey
from services.common.keys.validation import (
    DURATION_RE,
    KEY_NAME_RE,
    MAX_BUDGET_TOKENS,
    MAX_BUDGET_USD,
    MAX_MODELS,
    MAX_RATE,
    USD_STEP,
)
from services.router.http.protocol import AS_INT, ErrorResponse
from services.router.usage import UsageLedger

Rate = Annotated[int, Field(ge=1, le=MAX_RATE), AS_INT] | None
Duration = Annotated[str | None, Field(pattern=DURATION_RE.pattern)]


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


class KeyCreate(BaseModel):
    """Body of `POST /admin/v1/keys`. Limits left out (or null) are unlimited. Each value is
    taken only in its JSON type (no `"5"` for 5, no `1` for true; `5.0` is the integer 5, as
    JSON Schema counts it), as the schema says."""

    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)

    name: str = Field(pattern=KEY_NAME_RE.pattern)
    """Unique among unrevoked keys; revoke by it."""
    models: list[Annotated[str, Field(pattern=ASSET_ID_RE.pattern)]] = Field(
        default_factory=list, max_length=MAX_MODELS)
    """Asset ids or aliases the key may use; empty: every model."""
    rpm: Rate = None
    """Requests per minute."""
    tpm: Rate = None
    """Tokens (prompt + completion) per minute."""
    max_parallel: Rate = None
    """Requests in flight at once."""
    budget_tokens: Annotated[int, Field(ge=1, le=MAX_BUDGET_TOKENS), AS_INT] | None = None
    """Tokens per budget period."""
    budget_usd: Annotated[float | None, Field(ge=float(USD_STEP), le=float(MAX_BUDGET_USD))] = None
    """US dollars per budget period (kept to the micro-dollar)."""
    budget_period: Duration = None
    """How often budgets renew (`30d`, `12h`, ...); null: never."""
    expires_in: Duration = None
    """The key stops working this long after creation (`90d`, ...); null: never."""
    admin: bool = False
    """May use the admin API (and create keys)."""


class KeyUsage(BaseModel):
    """What a key has used so far, from the usage ledger (every router's requests)."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0


class KeyView(BaseModel):
    """An API key as the admin API shows it: never its secret, only its prefix."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    name: str
    prefix: str
    """The start of the secret that may be shown (`rh-abcd`), to tell keys apart."""
    admin: bool
    models: list[str]
    rpm: int | None
    tpm: int | None
    max_parallel: int | None
    budget_tokens: int | None
    budget_usd: float | None
    budget_period_s: int | None
    created_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None
    usage: KeyUsage | None = None
    """Usage so far (listings only)."""

    @classmethod
    def from_record(cls, record: KeyRecord) -> KeyView:
        """The view of a stored key."""
        limits = record.limits
        return cls(name=record.name, prefix=record.prefix, admin=record.admin, models=list(record.models),
                   rpm=limits.rpm, tpm=limits.tpm, max_parallel=limits.max_parallel,
                   budget_tokens=limits.budget_tokens,
                   budget_usd=float(limits.budget_usd) if limits.budget_usd is not None else None,
                   budget_period_s=limits.budget_period_s, created_at=record.created_at,
                   expires_at=record.expires_at, revoked_at=record.revoked_at)


class KeyCreated(KeyView):
    """`POST /admin/v1/keys`: the new key, with its secret. The secret is not shown again."""

    key: str
    """The secret (`rh-...`): send it as `Authorization: Bearer <key>`."""


class KeyList(BaseModel):
    """`GET /admin/v1/keys`."""

    keys: list[KeyView]


keys_router = APIRouter(prefix="/admin/v1/keys", tags=["admin"])


def _store(request: Request) -> KeyStore:
    store: KeyStore | None = request.app.state.key_store
    if store is None:
        raise ModelNotReady("API keys are not available: this router has no database", retry_after_s=30)
    return store


NO_STORE: dict[int | str, dict[str, Any]] = {503: _error("This router has no key store.")}


@keys_router.post("", status_code=201, response_model=KeyCreated, responses={
    400: _error("The request is invalid; `error.param` names the field."),
    409: _error("An unrevoked key already has that name."), 413: _error("The body is too large."),
    **NO_STORE})
async def create_key(body: KeyCreate, request: Request) -> JSONResponse:
    """Create a key; the reply holds its secret, shown this once."""
    record, secret = await _store(request).create(NewKey(
        name=body.name, models=tuple(body.models), admin=body.admin, rpm=body.rpm, tpm=body.tpm,
        max_parallel=body.max_parallel, budget_tokens=body.budget_tokens, budget_usd=body.budget_usd,
        budget_period=body.budget_period, expires_in=body.expires_in))
    created = KeyCreated(**KeyView.from_record(record).model_dump(), key=secret)
    return JSONResponse(created.model_dump(mode="json"), status_code=201)


@keys_router.get("", response_model=KeyList, responses={
    400: _error("The request is invalid; `error.param` names the field."), **NO_STORE})
async def list_keys(
    request: Request,
    include_revoked: Annotated[bool, Query(description="List revoked keys too.")] = False,
) -> dict[str, Any]:
    """Every key, oldest first; never a secret."""
    records = await _store(request).list(include_revoked=include_revoked)
    used = await _usage_by_key_id(request, [r.key_id for r in records])
    return {"keys": [KeyView.from_record(r).model_copy(update={"usage": used.get(r.key_id, KeyUsage())})
                     for r in records]}


async def _usage_by_key_id(request: Request, key_ids: list[str]) -> dict[str, KeyUsage]:
    """The usage so far of each key, by key id (a name reused after a revoke starts from
    nothing), from the ledger (this router's pending rows written first)."""
    ledger: UsageLedger = request.app.state.gateway.usage
    totals = await ledger.key_totals(key_ids)
    return {key_id: KeyUsage(requests=t.requests, prompt_tokens=t.prompt_tokens,
                             completion_tokens=t.completion_tokens, cost_usd=float(t.cost_usd))
            for key_id, t in totals.items()}


@keys_router.delete("/{name}", response_model=KeyView, responses={
    404: _error("No unrevoked key has that name."), **NO_STORE})
async def revoke_key(name: Annotated[str, Path(description="The key's name.")],
                     request: Request) -> KeyView:
    """Revoke the key: every router refuses it from now on."""
    record = await _store(request).revoke(name)
    revoked = request.app.state.on_key_revoked
    if revoked is not None:
        revoked(name)
    return KeyView.from_record(record)
