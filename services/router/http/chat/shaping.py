"""What shapes a chat answer: `response_format` (free text, any JSON object, or JSON that
follows a schema) and `tool_choice` (whether and which tools the model calls), with the rules
between them and `tools` that the published schema states and the request checks.

Both are enforced on local models by constrained decoding (the answer always parses and
validates); remote upstreams get them passed through.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag

from roundhouse.v1 import inference_pb2
from services.common.inference_requests import FUNCTION_NAME, MAX_TEXT_CHARS
from services.router.http.protocol import OpenAIRequest

SCHEMA_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class TextFormat(OpenAIRequest):
    """`{"type": "text"}`: free text (the default)."""

    type: Literal["text"]


class JsonObjectFormat(OpenAIRequest):
    """`{"type": "json_object"}`: the answer is one JSON object (any)."""

    type: Literal["json_object"]


class JsonSchemaSpec(OpenAIRequest):
    """The schema of a `json_schema` answer."""

    name: Annotated[str, Field(pattern=SCHEMA_NAME, description="The schema's name.")]
    description: Annotated[str, Field(max_length=MAX_TEXT_CHARS)] | None = None
    schema_: Annotated[dict[str, Any] | None, Field(
        alias="schema", description="A JSON Schema the answer follows; absent: any JSON value.")] = None
    strict: Annotated[bool | None, Field(
        description="Accepted either way: the schema is always enforced while decoding.")] = None


class JsonSchemaFormat(OpenAIRequest):
    """`{"type": "json_schema", "json_schema": {...}}`: JSON that validates against the schema."""

    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


FORMATS = ("text", "json_object", "json_schema")


def _format_tag(value: Any) -> str | None:
    # Tags in brackets: an error's location names the field, not the format (see `errors`).
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return f"[{kind}]" if kind in FORMATS else None


ResponseFormat = Annotated[
    Annotated[TextFormat, Tag("[text]")] | Annotated[JsonObjectFormat, Tag("[json_object]")]
    | Annotated[JsonSchemaFormat, Tag("[json_schema]")],
    Discriminator(_format_tag, custom_error_type="invalid_value",
                  custom_error_message="must be an object whose type is 'text', 'json_object' or 'json_schema'"),
]


def format_proto(value: TextFormat | JsonObjectFormat | JsonSchemaFormat) -> inference_pb2.ResponseFormat:
    """`response_format` as the worker takes it."""
    if isinstance(value, JsonSchemaFormat):
        spec = value.json_schema
        return inference_pb2.ResponseFormat(
            type=value.type, name=spec.name, description=spec.description or "", strict=bool(spec.strict),
            schema_json=json.dumps(spec.schema_ if spec.schema_ is not None else {}))
    return inference_pb2.ResponseFormat(type=value.type)


class NamedFunction(OpenAIRequest):
    """The function of a named `tool_choice`."""

    name: Annotated[str, Field(pattern=FUNCTION_NAME)]


class FunctionChoice(OpenAIRequest):
    """`{"type": "function", "function": {"name": ...}}`: exactly one call of that function."""

    type: Literal["function"]
    function: NamedFunction


ToolChoice = Annotated[Literal["none", "auto", "required"] | FunctionChoice | None, Field(
    description="'none': no call, free text. 'auto' (the default with tools): the model answers "
                "in text or calls tools. 'required': one or more calls. A named function: exactly "
                "one call of it, which must be among `tools`. All but 'none' need tools.")]


def choice_proto(value: str | FunctionChoice) -> inference_pb2.ToolChoice:
    """`tool_choice` as the worker takes it."""
    if isinstance(value, FunctionChoice):
        return inference_pb2.ToolChoice(mode="function", function_name=value.function.name)
    return inference_pb2.ToolChoice(mode=value)


def _with_tools(condition: dict[str, Any]) -> dict[str, Any]:
    """A rule: when `condition` holds, the request has at least one tool."""
    return {"if": condition,
            "then": {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}}}


SHAPING_RULES: list[dict[str, Any]] = [
    _with_tools({"required": ["tool_choice"],
                 "properties": {"tool_choice": {"anyOf": [{"enum": ["auto", "required"]}, {"type": "object"}]}}}),
    _with_tools({"required": ["parallel_tool_calls"],
                 "properties": {"parallel_tool_calls": {"type": "boolean"}}}),
    {"if": {"required": ["response_format", "tools"], "properties": {
        "response_format": {"type": "object", "required": ["type"],
                            "properties": {"type": {"enum": ["json_object", "json_schema"]}}},
        "tools": {"type": "array", "minItems": 1}}},
     "then": {"required": ["tool_choice"], "properties": {"tool_choice": {"const": "none"}}}},
    {"if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer", "minimum": 1}}},
     "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}},
]
"""What the schema says between fields: a tool choice other than 'none' and
`parallel_tool_calls` need tools; a JSON answer and tool calls exclude each other; top log
probabilities need `logprobs: true`."""
