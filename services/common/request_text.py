"""Text a request may carry: what protobuf can encode and Postgres can store.

JSON admits lone UTF-16 surrogates (`"\\ud800"`), which no UTF-8 encoder takes, and NUL
characters, which Postgres refuses in `text` and `jsonb`. Every service checks the text it
is handed here, before it builds a message or runs a query, and refuses it as
`InvalidArgument` naming the field instead of failing with an internal error.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from services.common.errors import FieldProblem, InvalidArgument

_SURROGATE = re.compile("[\ud800-\udfff]")
_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
NUL_REASON = "must not contain NUL (\\u0000) characters"
SURROGATE_REASON = "not valid Unicode: contains a lone UTF-16 surrogate"
SHOWN_CHARS = 80


def text_problem(path: str, value: str, *, nul: bool = True) -> FieldProblem | None:
    """Why `value` cannot be taken as text, or None. `nul=False` lets NUL characters pass
    (text that only reaches a model, never a database)."""
    if nul and "\x00" in value:
        return FieldProblem(path, NUL_REASON)
    if _SURROGATE.search(value):
        return FieldProblem(path, SURROGATE_REASON)
    return None


def check_text(fields: Mapping[str, str]) -> None:
    """Raise `InvalidArgument` listing every field (path → value) that holds unusable text."""
    problems = [p for path, value in fields.items() if (p := text_problem(path, value))]
    if problems:
        raise InvalidArgument.from_problems(problems)


def check_message_text(message: Message) -> None:
    """Raise `InvalidArgument` if any string of `message` (nested messages, lists and maps
    included) contains a NUL character: ids, names, filters and documents bound for
    Postgres are checked in one sweep. The path names the first field at fault."""
    for path, value in _strings(message, ""):
        if "\x00" in value:
            raise InvalidArgument.from_problems([FieldProblem(path, NUL_REASON)])


def surrogate_path(value: Any, path: str = "") -> str | None:
    """Where the first lone surrogate sits in parsed JSON (`messages[0].content`), or None.

    Object keys that are not plain identifiers end the path at their parent.
    """
    if isinstance(value, str):
        return path if _SURROGATE.search(value) else None
    if isinstance(value, Mapping):
        for key, item in value.items():
            plain = isinstance(key, str) and _PLAIN_KEY.match(key)
            here = (f"{path}.{key}" if path else key) if plain else path
            if isinstance(key, str) and _SURROGATE.search(key):
                return here
            if (found := surrogate_path(item, here)) is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            if (found := surrogate_path(item, f"{path}[{index}]")) is not None:
                return found
    return None


def shown(value: str) -> str:
    """`value` quoted for an error message: control characters escaped, long text cut."""
    text = value if len(value) <= SHOWN_CHARS else value[:SHOWN_CHARS] + "…"
    return repr(text)


def _strings(message: Message, prefix: str) -> Iterator[tuple[str, str]]:
    kind = message.DESCRIPTOR.full_name
    if kind in _JSON_TYPES:
        yield from _json_strings(message, prefix)
        return
    for field, value in message.ListFields():
        path = f"{prefix}.{field.name}" if prefix else field.name
        if _is_map(field) and field.message_type is not None:
            value_field = field.message_type.fields_by_name["value"]
            for key, item in value.items():
                if isinstance(key, str):
                    yield path, key
                if value_field.type == FieldDescriptor.TYPE_STRING:
                    yield f"{path}.{key}", item
                elif value_field.type == FieldDescriptor.TYPE_MESSAGE:
                    yield from _strings(item, f"{path}.{key}")
        elif field.is_repeated:
            for index, item in enumerate(value):
                yield from _one(field, item, f"{path}[{index}]")
        else:
            yield from _one(field, value, path)


_JSON_TYPES = frozenset({"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"})


def _json_strings(message: Any, path: str) -> Iterator[tuple[str, str]]:
    # Paths of `Struct` documents read as JSON paths (`source.path`), not as wire fields.
    kind = message.DESCRIPTOR.full_name
    if kind == "google.protobuf.Struct":
        for key, item in message.fields.items():
            yield path, key
            yield from _json_strings(item, f"{path}.{key}" if path else key)
    elif kind == "google.protobuf.ListValue":
        for index, item in enumerate(message.values):
            yield from _json_strings(item, f"{path}[{index}]")
    else:
        which = message.WhichOneof("kind")
        if which == "string_value":
            yield path, message.string_value
        elif which in ("struct_value", "list_value"):
            yield from _json_strings(getattr(message, which), path)


def _one(field: FieldDescriptor, value: Any, path: str) -> Iterator[tuple[str, str]]:
    if field.type == FieldDescriptor.TYPE_STRING:
        yield path, value
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        yield from _strings(value, path)


def _is_map(field: FieldDescriptor) -> bool:
    entry = field.message_type
    return field.is_repeated and entry is not None and entry.GetOptions().map_entry
