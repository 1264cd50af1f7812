"""Ollama's `options`, `format` and `keep_alive`: what Roundhouse does with each.

Implemented options map onto the `roundhouse.v1.ChatRequest` sampling fields: `temperature`,
`top_p`, `top_k`, `seed`, `num_predict` (-1 and -2, Ollama's "no limit" and "fill the
context", leave it unset), `stop`, `presence_penalty`, `frequency_penalty`, and `num_ctx`,
accepted when it is within the model's context length (Roundhouse does not resize a
model's context; a prompt beyond the real one is refused either way) and refused while that
length is not known (before the model's first load, unless its metadata declares it). Every
other option Ollama knows (`repeat_penalty`, `min_p`, `mirostat`, `num_gpu`...) is refused
with a 400 naming it, and so is any option Ollama does not know: none is silently ignored.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from roundhouse.v1 import inference_pb2
from services.common.errors import FieldProblem, InvalidArgument
from services.common.inference_requests import (
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
from services.router.http.sampling import as_int64

NOT_IMPLEMENTED = frozenset({
    "numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all", "vocab_only",
    "use_mmap", "use_mlock", "embedding_only", "num_thread", "num_keep", "tfs_z", "typical_p",
    "repeat_last_n", "repeat_penalty", "mirostat", "mirostat_tau", "mirostat_eta",
    "penalize_newline", "min_p",
})
"""Options Ollama documents that Roundhouse does not implement."""
NO_LIMIT = (-1, -2)
"""`num_predict` values meaning "until the model stops" and "until the context is full"."""
FOREVER_S = math.inf
LONGEST_S = (2**63 - 1) / 1e9
"""The longest `keep_alive` Ollama takes (Go's longest duration), in seconds."""
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class Options(BaseModel):
    """The implemented options, each checked against the bounds the gateway enforces."""

    model_config = ConfigDict(extra="forbid")

    temperature: Annotated[float, Field(ge=TEMPERATURE_MIN, le=TEMPERATURE_MAX)] | None = None
    top_p: Annotated[float, Field(ge=TOP_P_MIN, le=TOP_P_MAX)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    seed: int | None = None
    num_predict: Annotated[int, Field(ge=-2, le=MAX_TOKENS_LIMIT)] | None = None
    stop: Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    presence_penalty: Annotated[float, Field(ge=PENALTY_MIN, le=PENALTY_MAX)] | None = None
    frequency_penalty: Annotated[float, Field(ge=PENALTY_MIN, le=PENALTY_MAX)] | None = None
    num_ctx: Annotated[int, Field(ge=1)] | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("num_predict")
    @classmethod
    def _positive_or_no_limit(cls, value: int | None) -> int | None:
        if value is not None and value < 1 and value not in NO_LIMIT:
            raise ValueError("must be at least 1, or -1 (no limit) or -2 (fill the context)")
        return value

    def apply(self, request: inference_pb2.ChatRequest, context_length: int) -> None:
        """Set the sampling fields of `request`; `num_ctx` is checked against the model's
        `context_length` (see `check_num_ctx`)."""
        check_num_ctx(self.num_ctx, context_length)
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
            if (value := getattr(self, name)) is not None:
                setattr(request, name, value)
        if self.top_k:
            request.top_k = self.top_k
        if self.seed is not None:
            request.seed = as_int64(self.seed)
        if self.num_predict is not None and self.num_predict not in NO_LIMIT:
            request.max_tokens = self.num_predict
        request.stop.extend(self.stop or [])


def check_num_ctx(num_ctx: int | None, context_length: int) -> None:
    """A 400 naming `options.num_ctx` unless it is absent or within `context_length` (0: not
    known yet, declared in the asset's `metadata.context_length` nor detected by a load)."""
    if num_ctx is None:
        return
    if not context_length:
        raise InvalidArgument.from_problems([FieldProblem(
            "options.num_ctx", "the model's context length is not known yet (it is learnt when the "
            "model first loads, or declared as metadata.context_length), so num_ctx cannot be "
            "honoured; leave it out, or retry once the model has loaded")])
    if num_ctx > context_length:
        raise InvalidArgument.from_problems([FieldProblem(
            "options.num_ctx", f"{num_ctx} exceeds the model's context length of "
            f"{context_length} tokens; leave it out or send at most {context_length}")])


def parse_options(value: Any) -> Options | None:
    """`options` as sent: refused naming the first option Roundhouse does not implement or
    Ollama does not know, before the types of the rest are checked."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("options: must be an object")
    for name in value:
        if name in NOT_IMPLEMENTED:
            raise PydanticCustomError(UNSUPPORTED, "options.{name}: not implemented by Roundhouse; "
                                      "leave it out", {"name": name})
        if name not in Options.model_fields:
            raise PydanticCustomError(UNSUPPORTED, "options.{name}: not an option Roundhouse knows; "
                                      "leave it out", {"name": name})
    return Options.model_validate(value)


def response_format(value: Any) -> inference_pb2.ResponseFormat | None:
    """Ollama's `format`: "json" is any JSON object, an object is a JSON schema to follow;
    empty or absent is free text."""
    if value is None or value == "":
        return None
    if value == "json":
        return inference_pb2.ResponseFormat(type="json_object")
    if isinstance(value, dict):
        return inference_pb2.ResponseFormat(type="json_schema", schema_json=json.dumps(value),
                                            name="response", strict=True)
    raise ValueError('format: must be "json" or a JSON schema (an object)')


def keep_alive_seconds(value: Any) -> float | None:
    """Ollama's `keep_alive` in seconds: a number is seconds, a string a Go duration ("5m",
    "1h30m", "0") or a number of seconds; any negative value is forever (`FOREVER_S`).
    None when absent."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("keep_alive: must be a duration such as \"5m\", or a number of seconds")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _duration_s(value.strip())
    else:
        raise ValueError("keep_alive: must be a duration such as \"5m\", or a number of seconds")
    if math.isnan(seconds):
        raise ValueError("keep_alive: must be a number")
    if seconds > LONGEST_S:
        raise ValueError(f"keep_alive: {value!r} is longer than the longest duration ({LONGEST_S:.0f}s, "
                         "about 292 years); send -1 to keep the model loaded for good")
    return FOREVER_S if seconds < 0 else seconds


def _duration_s(text: str) -> float:
    sign, body = (-1.0, text[1:]) if text.startswith("-") else (1.0, text.removeprefix("+"))
    try:
        return sign * float(body)
    except ValueError:
        pass
    parts = _DURATION_PART.findall(body)
    if not body or "".join(number + unit for number, unit in parts) != body:
        raise ValueError(f"keep_alive: {text!r} is not a duration (such as \"5m\", \"1h30m\", \"-1\")")
    return sign * sum(float(number) * _UNIT_S[unit] for number, unit in parts)
