"""OpenAI wire shapes shared by every endpoint: base model, usage, errors, model objects.

Endpoint-specific requests and responses live beside their serving code
(`chat/protocol.py`, `completion/protocol.py`, `embedding/protocol.py`).
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from roundhouse.v1 import inference_pb2
from services.common.request_text import SURROGATE_REASON, surrogate_path
from services.common.route_proto import RouteRecord, Stored

FINISH_REASONS = {
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
}

FinishReason = Literal["stop", "length", "tool_calls"]


NO_NUL = "^[^\\u0000]*$"
"""Schema pattern of text that is recorded (and may be stored): no NUL characters."""


def integral(value: Any) -> Any:
    """An integral float (`5.0`) as the int it is: JSON Schema counts it as an integer."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


AS_INT = BeforeValidator(integral)
"""Field metadata: an int or an integral float, never a bool or a string. Put it after any
bounds (`Annotated[int, Field(ge=1), AS_INT]`) so the schema shows `minimum`/`maximum`."""
Integer = Annotated[int, AS_INT]


class OpenAIRequest(BaseModel):
    """Base of every request body: unknown fields are accepted and ignored, as OpenAI does.

    Strict: a value is taken only in the JSON type the published schema gives it (no `"5"`
    for 5, no `false` for 0), so the schema says exactly what the server accepts.
    """

    model_config = ConfigDict(extra="ignore", strict=True)


class OpenAIRequestBody(OpenAIRequest):
    """Base of a whole request body: text no UTF-8 encoder takes (a lone UTF-16 surrogate,
    which JSON admits as `\\ud800`) is refused before anything else, naming where it is."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        path = surrogate_path(data)
        if path is not None:
            raise ValueError(f"{path}: {SURROGATE_REASON}" if path else
                             f"the request body is {SURROGATE_REASON}")
        return data


class OpenAIResponse(BaseModel):
    """Base of every response body."""

    model_config = ConfigDict(extra="forbid")


class StreamOptions(OpenAIRequest):
    """`stream_options` of a streamed chat or completion request."""

    include_usage: bool = False


class UsageInfo(OpenAIResponse):
    """Token counts of one request, as OpenAI reports them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def from_proto(cls, usage: inference_pb2.Usage) -> UsageInfo:
        """Counts reported by the worker → OpenAI usage."""
        total = usage.total_tokens or usage.prompt_tokens + usage.completion_tokens
        return cls(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=total,
        )


def finish_reason(value: int) -> FinishReason:
    """Worker finish reason → OpenAI's; an unspecified one reads as a normal stop."""
    return FINISH_REASONS.get(value, "stop")  # type: ignore[return-value]


def new_id(prefix: str) -> str:
    """A response id in OpenAI's style, e.g. `chatcmpl-…` and 32 random hex digits."""
    return f"{prefix}-{os.urandom(16).hex()}"


def now() -> int:
    """Unix seconds, for `created` fields."""
    return int(time.time())


class ErrorInfo(BaseModel):
    """The body of an OpenAI error."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """`{"error": {...}}`, OpenAI's error envelope."""

    error: ErrorInfo


ROUTE_FIELDS = ("targets", "sticky", "shadow", "fallback", "fallback_on", "cache")
"""What a route's model object shows of it."""


class ModelCard(OpenAIResponse):
    """An OpenAI `model` object, with Roundhouse's facts about the asset added."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "roundhouse"
    display_name: str | None = None
    interfaces: list[str] = Field(default_factory=list)
    state: str
    desired: str
    aliases: list[str] = Field(default_factory=list)
    context_length: int | None = None
    embedding_dim: int | None = None
    tool_calling: Literal["template", "constrained", "upstream"] | None = None
    """How the model calls tools, once it has been loaded: `template` (its chat template has a
    tool slot), `constrained` (no slot: Roundhouse describes the tools; every `tool_choice`,
    `auto` included, is decoded under the tools' grammar), `upstream` (a remote upstream
    decides); null for a model that takes no tools or was never loaded."""
    structured_output: bool | None = None
    """Whether `response_format` is enforced (local) or passed on (remote); null until loaded."""
    route: dict[str, Any] | None = None
    """For a route: its targets and weights, stickiness, fallbacks, shadows and cache."""

    @classmethod
    def from_record(cls, record: Stored) -> ModelCard:
        """A stored asset → its model object; declared metadata wins over detected values. A
        route's state is `ready`: it answers whenever its targets do."""
        if isinstance(record, RouteRecord):
            route = record.spec
            return cls(id=route.asset_id, created=_unix(record.created_at),
                       display_name=route.display_name or None, interfaces=route.interfaces,
                       state="ready", desired="running", aliases=list(route.aliases),
                       route={k: v for k, v in route.to_document().items() if k in ROUTE_FIELDS})
        spec = record.spec
        detected: dict[str, Any] = record.capabilities or {}
        return cls(
            id=spec.asset_id,
            created=_unix(record.created_at),
            display_name=spec.display_name or None,
            interfaces=list(spec.interface),
            state=record.state,
            desired=spec.desired,
            aliases=list(spec.aliases),
            context_length=spec.metadata.context_length or detected.get("context_length") or None,
            embedding_dim=spec.metadata.embedding_dim or detected.get("embedding_dim") or None,
            tool_calling=detected.get("tool_calling") or None,
            structured_output=detected.get("supports_structured_output", False if detected else None),
        )


class ModelList(OpenAIResponse):
    """`GET /v1/models`."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


def _unix(value: datetime) -> int:
    # Timestamps converted from protobuf are naive UTC.
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp())
