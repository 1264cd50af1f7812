"""Bounds on the JSON Schemas a chat request brings, checked at every door.

A local model compiles a request's `response_format` schema, or its tools' `parameters`, into a
grammar before it decodes (`services.worker.models.structured`); the time and memory that takes
grow with the schema, faster than its size. `schema_problems` refuses, naming the parameter,
what would take long: the router before any worker (through `inference_requests.check_chat`),
a worker for what it is sent directly (the same check, and `ChatParams.validate`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

from services.common.errors import FieldProblem
from services.common.request_text import shown

MAX_SCHEMA_CHARS = 64 * 1024
"""Longest JSON Schema a request brings, as compact JSON: `response_format`'s, or the tools'
`parameters` together (one grammar is compiled from all of them). A local model compiles it
into a grammar before decoding, in a time that grows faster than its size: under a second at
this bound on one CPU core with a 49k-token vocabulary, ten times that at four times the size."""
MAX_SCHEMA_DEPTH = 32
"""Deepest nesting of objects and arrays in a JSON Schema (a nested object property takes two
levels: its `properties` and its own schema)."""
MAX_SCHEMA_ENUM_VALUES = 1000
"""Most `enum` values in one JSON Schema, all its enums together (OpenAI's limit)."""
MAX_PATTERN_REPEAT = 1000
"""Largest count of a repetition (`{n}`, `{n,m}`) in a schema's `pattern`: the grammar spells
out every repetition, and its compile time grows with the square of the count."""

_REPEAT = re.compile(r"\{(\d+)(?:,(\d*))?\}")
RESPONSE_SCHEMA = "response_format.json_schema.schema"
"""Where a request's `response_format` schema is, as an OpenAI parameter path."""


def schema_problems(response_schema: Any | None, tool_parameters: Sequence[Any]) -> list[FieldProblem]:
    """What makes a request's JSON Schemas too big to compile into a grammar (the bounds
    `MAX_SCHEMA_*`, `MAX_PATTERN_REPEAT`): the `response_format` schema (None: none) and each
    tool's `parameters` (empty: none), parsed. Each problem names the schema's parameter; the
    tools' schemas together are bounded as one."""
    problems = []
    if response_schema is not None:
        problems += _one_schema_problems(RESPONSE_SCHEMA, response_schema)
    total = 0
    for n, parameters in enumerate(tool_parameters):
        if parameters:
            found = _one_schema_problems(f"tools[{n}].function.parameters", parameters)
            problems += found
            total += 0 if found else _compact_chars(parameters)
    if total > MAX_SCHEMA_CHARS and not problems:
        problems.append(FieldProblem("tools", f"the tools' parameter schemas take {total} characters together "
                                              f"(as compact JSON); at most {MAX_SCHEMA_CHARS}"))
    return problems


def _one_schema_problems(path: str, schema: Any) -> list[FieldProblem]:
    enums = 0
    pending: list[tuple[Any, int]] = [(schema, 1)]
    while pending:  # not recursive: the nesting is what is being bounded
        value, depth = pending.pop()
        children: Iterable[Any] = ()
        if isinstance(value, dict):
            enum, pattern = value.get("enum"), value.get("pattern")
            enums += len(enum) if isinstance(enum, list) else 0
            if isinstance(pattern, str) and (repeat := _largest_repeat(pattern)) > MAX_PATTERN_REPEAT:
                return [FieldProblem(path, f"the pattern {shown(pattern[:80])} repeats {repeat} times; "
                                           f"at most {MAX_PATTERN_REPEAT} in one repetition")]
            children = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > MAX_SCHEMA_DEPTH:
            return [FieldProblem(path, f"nested more than {MAX_SCHEMA_DEPTH} levels deep (objects and arrays); "
                                       "flatten it, or describe the deep part as a plain object")]
        pending.extend((child, depth + 1) for child in children)
    if enums > MAX_SCHEMA_ENUM_VALUES:
        return [FieldProblem(path, f"{enums} enum values; at most {MAX_SCHEMA_ENUM_VALUES} in one schema")]
    chars = _compact_chars(schema)
    if chars > MAX_SCHEMA_CHARS:
        return [FieldProblem(path, f"{chars} characters as compact JSON; at most {MAX_SCHEMA_CHARS}")]
    return []


def _largest_repeat(pattern: str) -> int:
    counts = [int(n) for match in _REPEAT.finditer(pattern) for n in match.groups() if n]
    return max(counts, default=0)


def _compact_chars(schema: Any) -> int:
    try:
        return len(json.dumps(schema, separators=(",", ":"), ensure_ascii=False))
    except (TypeError, ValueError):  # not JSON data: whoever built it is told by its own check
        return 0
