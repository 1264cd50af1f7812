"""`POST /v1/embeddings`: the OpenAI request and response shapes.

`input` is a string, a list of strings, one token array, or a list of token arrays; the
vectors come back as JSON floats or, with `encoding_format: base64`, as little-endian
float32 bytes in base64 (what the official clients ask for by default).

The response models describe the body (the OpenAPI document, validation in tests);
`response_body` writes it, with no model per vector.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import numpy as np
import orjson
from pydantic import Field, WithJsonSchema, field_validator

from roundhouse.v1 import inference_pb2
from services.common.inference_requests import (
    MAX_INPUT_TOKENS,
    MAX_INPUTS,
    MAX_NAME_CHARS,
    MAX_TEXT_CHARS,
    MAX_TOKEN_ID,
)
from services.router.http.protocol import AS_INT, NO_NUL, OpenAIRequestBody, OpenAIResponse, integral

EmbeddingInput = str | list[int]

TEXT: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": MAX_TEXT_CHARS}
TOKENS: dict[str, Any] = {
    "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": MAX_TOKEN_ID}, "minItems": 1,
    "maxItems": MAX_INPUT_TOKENS,
}
INPUT_SCHEMA: dict[str, Any] = {
    "anyOf": [
        TEXT,
        TOKENS,
        {"type": "array", "items": {"anyOf": [TEXT, TOKENS]}, "minItems": 1, "maxItems": MAX_INPUTS},
    ],
    "description": f"A non-empty string, one token array, or a list of 1 to {MAX_INPUTS} of "
                   "either. Fewer fit when the model's vectors are long: every vector must come "
                   "back in one response of at most 4 MiB (the error says how many).",
}


class EmbeddingRequest(OpenAIRequestBody):
    """The body of `POST /v1/embeddings`."""

    model: Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
    input: Annotated[list[EmbeddingInput], WithJsonSchema(INPUT_SCHEMA)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1), AS_INT] | None = None
    user: Annotated[str, Field(
        max_length=MAX_NAME_CHARS,
        description="The end user the request is made for: accepted and recorded with the request.",
        json_schema_extra={"pattern": NO_NUL},
    )] | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _inputs(cls, value: Any) -> list[EmbeddingInput]:
        single = isinstance(value, str) or _is_token_array(value)
        items = _as_list_of_inputs(value)
        if not items:
            raise ValueError("must not be empty")
        if len(items) > MAX_INPUTS:
            raise ValueError(f"{len(items)} inputs, but at most {MAX_INPUTS} fit in one request; "
                             "split it into several requests")
        for index, item in enumerate(items):
            _check_input("input" if single else f"input[{index}]", item)
        return [item if isinstance(item, str) else [integral(t) for t in item] for item in items]

    def recorded(self) -> dict[str, Any]:
        """Informational fields the caller set (`user`), to be logged with the request."""
        return {"user": self.user} if self.user is not None else {}

    def to_proto(self, request_id: str) -> inference_pb2.EmbedRequest:
        """The request as the router's gateway takes it."""
        request = inference_pb2.EmbedRequest(model=self.model, request_id=request_id,
                                             user=self.user or "")
        for item in self.input:
            if isinstance(item, str):
                request.inputs.add(text=item)
            else:
                request.inputs.add(tokens=inference_pb2.TokenIds(ids=item))
        return request


def _is_token_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_int(v) for v in value)


def _is_int(value: Any) -> bool:
    return isinstance(integral(value), int) and not isinstance(value, bool)


def _as_list_of_inputs(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ValueError("must be a string, a list of strings, or token arrays")
    # A flat list of integers is one pre-tokenized input, not many.
    return [value] if _is_token_array(value) else value


def _check_input(path: str, item: Any) -> None:
    if isinstance(item, str):
        if not item:
            raise ValueError(f"{path}: must not be an empty string")
        if len(item) > MAX_TEXT_CHARS:
            raise ValueError(f"{path}: {len(item)} characters; at most {MAX_TEXT_CHARS} fit in one input")
        return
    if not isinstance(item, list) or not item:
        raise ValueError(f"{path}: must be a non-empty string or token array")
    if len(item) > MAX_INPUT_TOKENS:
        raise ValueError(f"{path}: {len(item)} token ids; at most {MAX_INPUT_TOKENS}")
    if not all(_is_int(t) and 0 <= integral(t) <= MAX_TOKEN_ID for t in item):
        raise ValueError(f"{path}: token ids must be integers from 0 to {MAX_TOKEN_ID}")


def encode_vector(values: Sequence[float], encoding_format: str) -> list[float] | str:
    """One vector in the requested encoding: floats, or its little-endian float32 bytes in
    base64 (what `values` is on the worker's wire; numpy copies them back in one go)."""
    if encoding_format == "float":
        return list(values)
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode("ascii")


def response_body(reply: inference_pb2.EmbedResponse, model: str, encoding_format: str) -> bytes:
    """The worker's reply as the JSON of an `EmbeddingResponse`, vectors in input order.

    Written by orjson from plain values: validating and dumping one `EmbeddingData` per
    vector cost several times more than the rest of the route. The text is the models'
    own (the same keys in the same order, the same float digits).
    """
    return orjson.dumps({
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": encode_vector(e.values, encoding_format)}
            for index, e in enumerate(reply.embeddings)
        ],
        "model": model,
        "usage": EmbeddingUsage.from_proto(reply.usage).model_dump(),
    })


class EmbeddingData(OpenAIResponse):
    """One vector, at the index of its input."""

    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(OpenAIResponse):
    """Tokens read; embeddings generate none."""

    prompt_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def from_proto(cls, usage: inference_pb2.Usage) -> EmbeddingUsage:
        """Counts reported by the worker → OpenAI's embedding usage."""
        return cls(
            prompt_tokens=usage.prompt_tokens,
            total_tokens=usage.total_tokens or usage.prompt_tokens,
        )


class EmbeddingResponse(OpenAIResponse):
    """The vectors of one request, in input order."""

    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage
