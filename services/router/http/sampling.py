"""Fields that chat and text completion requests share: the model, sampling, choices and
streaming.

Both convert into one `roundhouse.v1.ChatRequest`; `SamplingFields.sampling_proto` fills
everything but the conversation or prompt. Bounds come from
`services.common.inference_requests`, which the gateway applies to every request, HTTP or
gRPC. OpenAI parameters Roundhouse does not implement are declared with `Unsupported`: only
a value that changes nothing passes, anything else is a 400 naming the parameter, and the
published schema says exactly that.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, ClassVar

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError, core_schema

from roundhouse.v1 import inference_pb2
from services.common.inference_requests import (
    LOGIT_BIAS_MAX,
    LOGIT_BIAS_MIN,
    MAX_CHOICES,
    MAX_LOGIT_BIASES,
    MAX_NAME_CHARS,
    MAX_STOP_SEQUENCES,
    MAX_TOKENS_LIMIT,
    PENALTY_MAX,
    PENALTY_MIN,
    TEMPERATURE_MAX,
    TEMPERATURE_MIN,
    TOP_P_MAX,
    TOP_P_MIN,
)
from services.router.http.errors import UNSUPPORTED
from services.router.http.protocol import AS_INT, NO_NUL, OpenAIRequestBody, StreamOptions

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
NULL: dict[str, Any] = {"type": "null"}
STOP_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOP_SEQUENCES},
        NULL,
    ],
    "description": f"Up to {MAX_STOP_SEQUENCES} non-empty sequences; generation stops before any of "
                   "them, and they are not returned.",
}
TOKEN_ID = "^(0|[1-9][0-9]{0,8})$"
"""A token id as `logit_bias` names it: a decimal integer, no sign nor leading zero."""
LOGIT_BIAS_SCHEMA: dict[str, Any] = {
    "anyOf": [{"type": "object", "propertyNames": {"pattern": TOKEN_ID},
               "additionalProperties": {"type": "number", "minimum": LOGIT_BIAS_MIN,
                                        "maximum": LOGIT_BIAS_MAX},
               "maxProperties": MAX_LOGIT_BIASES}, {"type": "null"}],
    "description": f"Token id (in the model's tokenizer, as a string) -> a bias from {LOGIT_BIAS_MIN:g} "
                   f"to {LOGIT_BIAS_MAX:g} added to its logit before sampling; up to {MAX_LOGIT_BIASES} "
                   "ids. -100 bans a token, 100 all but forces it. An id beyond the model's "
                   "vocabulary is refused.",
}
STREAM_OPTIONS_RULE: dict[str, Any] = {
    "if": {"required": ["stream_options"], "properties": {"stream_options": {"type": "object"}}},
    "then": {"required": ["stream"], "properties": {"stream": {"const": True}}},
}


def as_int64(value: int) -> int:
    """`value` modulo 2^64, as a signed 64-bit integer (the seed's type on the wire).

    Seeds are not bounded in the schema: OpenAI's are not, and the document's numbers are
    doubles, which cannot state 2^63 - 1 exactly."""
    return (value - INT64_MIN) % 2**64 + INT64_MIN


class Unsupported:
    """Field metadata of an OpenAI parameter Roundhouse does not implement yet:
    `Annotated[T | None, Unsupported(*neutral, accepted=..., hint=...)]`.

    Null and the `neutral` values (those that change nothing; `accepted` are their JSON
    Schemas) pass; anything else fails validation as `unsupported_parameter`, which the error
    handler turns into a 400 naming the parameter. The field's published schema is exactly
    `accepted` or null; `hint` says what to send instead.
    """

    def __init__(self, *neutral: Any, accepted: Sequence[dict[str, Any]] = (), hint: str) -> None:
        self.neutral, self.accepted, self.hint = neutral, list(accepted), hint

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_after_validator_function(self._only_neutral, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        published: dict[str, Any] = {"anyOf": [*self.accepted, NULL]} if self.accepted else dict(NULL)
        published["description"] = f"Not supported yet. {self.hint[0].upper()}{self.hint[1:]}."
        return published

    def _only_neutral(self, value: Any) -> Any:
        if value is None or any(value == n and type(value) is type(n) for n in self.neutral):
            return value
        raise PydanticCustomError(UNSUPPORTED, "not supported yet; {hint}", {"hint": self.hint})


def _with_rules(schema: dict[str, Any], cls: Any) -> None:
    # Conditions between fields, so that the schema refuses what the validators refuse.
    schema["allOf"] = list(cls.SCHEMA_RULES)


Penalty = Annotated[float, Field(ge=PENALTY_MIN, le=PENALTY_MAX)]
LogitBias = Annotated[
    dict[Annotated[str, Field(pattern=TOKEN_ID)], Annotated[float, Field(ge=LOGIT_BIAS_MIN, le=LOGIT_BIAS_MAX)]],
    Field(max_length=MAX_LOGIT_BIASES),
]


class SamplingFields(OpenAIRequestBody):
    """The part of a generation request that chat and completions have in common."""

    model_config = ConfigDict(json_schema_extra=_with_rules)
    SCHEMA_RULES: ClassVar[list[dict[str, Any]]] = [STREAM_OPTIONS_RULE]

    model: Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
    temperature: Annotated[float, Field(ge=TEMPERATURE_MIN, le=TEMPERATURE_MAX)] | None = None
    top_p: Annotated[
        Annotated[float, Field(ge=TOP_P_MIN, le=TOP_P_MAX)] | None,
        Field(description="Nucleus sampling mass; 0 keeps only the most likely token (greedy)."),
    ] = None
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT), AS_INT] | None = None
    stop: Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES), WithJsonSchema(STOP_SCHEMA)] = []
    seed: Annotated[
        int, AS_INT, AfterValidator(as_int64),
        Field(description="Makes sampling reproducible. Any integer: it is reduced to a signed "
                          "64-bit seed (modulo 2^64), so every value has one meaning."),
    ] | None = None
    n: Annotated[
        Annotated[int, Field(ge=1, le=MAX_CHOICES), AS_INT] | None,
        Field(description=f"How many completions (choices) to generate, 1 to {MAX_CHOICES}; each is "
                          "generated on its own (with a seed, choice i uses seed + i). Usage counts "
                          "the prompt once and every choice's tokens."),
    ] = None
    stream: bool = False
    stream_options: Annotated[StreamOptions | None, Field(
        description="Only with `stream: true`.")] = None
    user: Annotated[str, Field(
        max_length=MAX_NAME_CHARS,
        description="The end user the request is made for: accepted and recorded with the request.",
        json_schema_extra={"pattern": NO_NUL},
    )] | None = None
    presence_penalty: Annotated[Penalty | None, Field(
        description="Subtracted once from the logit of every token already in the completion.")] = None
    frequency_penalty: Annotated[Penalty | None, Field(
        description="Subtracted from a token's logit once per time it is already in the completion.")] = None
    logit_bias: Annotated[LogitBias | None, WithJsonSchema(LOGIT_BIAS_SCHEMA)] = None

    @field_validator("stop", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        for n, sequence in enumerate(value):
            if not sequence:
                raise ValueError(f"stop[{n}]: must not be empty")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def recorded(self) -> dict[str, Any]:
        """Informational fields the caller set (`user`...), to be logged with the request."""
        return {"user": self.user} if self.user is not None else {}

    def sampling_proto(self, request_id: str) -> inference_pb2.ChatRequest:
        """A `ChatRequest` with the model, sampling parameters, user and request id set."""
        request = inference_pb2.ChatRequest(model=self.model, request_id=request_id,
                                            user=self.user or "")
        request.stop.extend(self.stop)
        if self.temperature is not None:
            request.temperature = self.temperature
        if self.top_p is not None:
            request.top_p = self.top_p
        if self.max_tokens is not None:
            request.max_tokens = self.max_tokens
        if self.seed is not None:
            request.seed = self.seed
        if self.presence_penalty is not None:
            request.presence_penalty = self.presence_penalty
        if self.frequency_penalty is not None:
            request.frequency_penalty = self.frequency_penalty
        for token, bias in (self.logit_bias or {}).items():
            request.logit_bias[int(token)] = bias
        if self.n is not None:
            request.n = self.n
        return request

    @property
    def choices(self) -> int:
        """How many choices the answer has."""
        return self.n or 1


__all__ = ["SamplingFields", "Unsupported"]
