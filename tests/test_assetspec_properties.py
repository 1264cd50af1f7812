"""Properties of the asset spec parser, whatever it is handed.

`parse_spec` reads every asset: the YAML of `roundhouse apply` (through `parse_yaml`) and the
`AssetSpec` messages the registry is sent (through `spec_from_proto`). For any input, the
parser either returns a spec, which is then written back (`to_document`, YAML, the wire)
and read again unchanged, or raises `InvalidSpec` listing each problem with the field it is
in; never any other exception. Inputs: arbitrary JSON- and YAML-like values, the catalog's
specs and a few hand-written ones mutated field by field (wrong types, huge and non-finite
numbers, NUL characters and lone surrogates, deep nesting), random text as YAML, and random
`AssetSpec` messages. Examples are derandomized, so CI tries the same inputs each time.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from roundhouse.v1 import asset_pb2
from services.common.asset_proto import (
    AssetRecord,
    record_from_proto,
    record_to_proto,
    spec_from_proto,
    spec_to_proto,
)
from services.common.assetspec import AssetSpec, parse_spec
from services.common.documents import parse_yaml
from services.common.errors import InvalidSpec
from services.common.route_proto import (
    RouteRecord,
    declared_from_proto,
    declared_to_proto,
    stored_from_proto,
    stored_to_proto,
)
from services.common.routespec import RouteSpec, parse_route

ROOT = Path("/srv/roundhouse-sources")
"""The source root the parser is given: absolute `path` sources must lie under it."""
CATALOG = Path(__file__).resolve().parents[1] / "deploy" / "catalog"
BASE = {"asset_id": "base", "interface": "llm-runtime", "source": {"kind": "pypi", "package": "p"}}
HAND_WRITTEN: list[dict[str, Any]] = [
    {"asset_id": "local-chat", "interface": ["llm-runtime"], "source": {"kind": "path", "path": "models/chat"},
     "generation": {"temperature": 0.7, "top_p": 0.95, "max_tokens": 256}, "labels": {"team/a": "x"}},
    {"asset_id": "rooted", "interface": "embedding-runtime",
     "source": {"kind": "path", "path": str(ROOT / "minilm")}, "lifecycle": {"desired": "on-demand",
                                                                           "auto_sleep_min": 0}},
    {"asset_id": "quantized", "interface": "llm-runtime", "source": {"kind": "gguf", "path": "q/m.Q4_0.gguf"},
     "resources": {"gpu_required": True, "min_vram_gb": 1.5, "disk_gb": 2}, "policy": {"queue_timeout_s": 2.5}},
    {"asset_id": "hub.model", "interface": "llm-runtime", "aliases": ["hub-alias", "other"],
     "source": {"kind": "hf", "repo": "org/name", "revision": "main", "file": "w/model.safetensors"},
     "metadata": {"context_length": 2048, "precision": "bf16", "license": "apache-2.0"}},
    {"asset_id": "remote", "interface": ["llm-runtime", "embedding-runtime"], "runtime": "openai",
     "source": {"kind": "url", "url": "https://api.example.com/v1", "api_key_env": "OPENAI_API_KEY",
                "upstream_model": "gpt-x"},
     "pricing": {"input_per_1m": 2, "output_per_1m": 0.25}, "lifecycle": {"desired": "running"}},
]
FIELDS = ("asset_id", "display_name", "version", "class", "interface", "interface_version", "runtime",
          "source", "resources", "lifecycle", "policy", "generation", "metadata", "pricing", "aliases",
          "labels", "kind", "path", "package", "file", "repo", "url", "api_key_env", "desired",
          "auto_sleep_min", "min_resident_s", "max_concurrency", "memory_mb", "temperature")
"""Names the parser knows, so random mappings often hold a field it reads."""
ODD_STRINGS = ("", "\x00", "a\x00b", "\ud800", "x\udfff", "..", "../../etc/passwd", "/", "/etc/passwd",
               str(ROOT / ".." / "escape"), "C:\\model", "model.gguf", "https://", "http://169.254.169.254/",
               "http://metadata.google.internal/v1", "ROUNDHOUSE_DATABASE_URL", "OPENAI_API_KEY",
               "llm-runtime", "on-demand", "NaN", "1e999", "-0", "é" * 300, "x" * 5000, " ", "\n", "~")
ODD_NUMBERS = (0, -1, 1, 2**31 - 1, 2**31, -(2**31) - 1, 2**63, 2**64, 10**400, -(10**400), 0.0, -0.0,
               1e-320, 1.7976931348623157e308, math.inf, -math.inf, math.nan)

numbers = st.one_of(st.sampled_from(ODD_NUMBERS), st.integers(), st.floats())
strings = st.one_of(st.sampled_from(ODD_STRINGS), st.text(st.characters(exclude_categories=()), max_size=12))
scalars = st.one_of(st.none(), st.booleans(), numbers, strings)
"""Every scalar JSON or YAML can hold, lone surrogates, NaN and integers beyond any float included."""
keys = st.one_of(st.sampled_from(FIELDS), st.text(max_size=8), st.integers(), st.none(), st.booleans())
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=16)
PROPERTY = settings(max_examples=400, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


def catalog_documents() -> list[dict[str, Any]]:
    """The default catalog's specs, as YAML reads them."""
    return [yaml.safe_load(p.read_text()) for p in sorted(CATALOG.glob("*.yaml"))]


VALID = [*catalog_documents(), *HAND_WRITTEN]


def paths(value: Any, here: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Where a value could be replaced or removed: every key and index below `value`."""
    found = [here]
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths(item, (*here, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += paths(item, (*here, index))
    return found


def like(value: Any) -> st.SearchStrategy[Any]:
    """Values of the same kind as `value` (any number for a number, any text for text)."""
    if isinstance(value, bool):
        return scalars
    if isinstance(value, int | float):
        return numbers
    return strings if isinstance(value, str) else values


@st.composite
def mutated(draw: st.DrawFn) -> Any:
    """A valid document with a few of its values replaced, removed, wrapped or added to."""
    document = copy.deepcopy(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(paths(document)))
        if not where:
            continue
        parent = document
        for step in where[:-1]:
            parent = parent[step]
        last = where[-1]
        action = draw(st.sampled_from(("perturb", "replace", "remove", "wrap", "add")))
        if action == "perturb":
            parent[last] = draw(like(parent[last]))
        elif action == "replace":
            parent[last] = draw(values)
        elif action == "wrap":
            parent[last] = [parent[last]]
        elif action == "remove" and isinstance(parent, dict):
            del parent[last]
        elif action == "add" and isinstance(parent[last], dict):
            parent[last][draw(keys)] = draw(values)
    return document


def parsed(document: Any) -> AssetSpec | None:
    """The spec, or None when the parser refused it as it should: `InvalidSpec` with at least
    one problem, each with a reason and, in a mapping, the field it is in."""
    try:
        spec = parse_spec(document, source_roots=[ROOT])
    except InvalidSpec as exc:
        event("refused")
        assert exc.problems, exc
        for problem in exc.problems:
            assert problem.reason, exc
            assert problem.path or not isinstance(document, dict), exc
        return None
    event("parsed")
    return spec


def assert_round_trips(spec: AssetSpec) -> None:
    """The spec is written back and read again unchanged: as a document, as YAML, as an
    `AssetSpec` message on the wire, and as the `Asset` a client is handed."""
    document = spec.to_document()
    assert json.loads(json.dumps(document, allow_nan=False)) == document
    assert parse_spec(document, source_roots=[ROOT]).to_document() == document
    [loaded] = parse_yaml(yaml.safe_dump(document), "spec.yaml", source_roots=[ROOT])
    assert loaded.spec.to_document() == document
    wire = asset_pb2.AssetSpec.FromString(spec_to_proto(spec).SerializeToString())
    assert spec_from_proto(wire, source_roots=[ROOT]).to_document() == document
    now = datetime.now(UTC)
    record = asset_pb2.Asset.FromString(record_to_proto(AssetRecord(spec, 1, now, now)).SerializeToString())
    assert record_from_proto(record).spec.to_document() == document


@pytest.mark.parametrize("document", VALID, ids=[d["asset_id"] for d in VALID])
def test_the_documents_mutated_here_are_valid_and_round_trip(document: dict[str, Any]) -> None:
    assert_round_trips(parse_spec(document, source_roots=[ROOT]))


@PROPERTY
@given(mutated())
def test_a_mutated_spec_parses_and_round_trips_or_is_refused_by_field(document: Any) -> None:
    spec = parsed(document)
    if spec is not None:
        assert_round_trips(spec)


@PROPERTY
@given(st.one_of(values, st.dictionaries(st.sampled_from(FIELDS), values, max_size=8)))
def test_any_value_parses_and_round_trips_or_is_refused(document: Any) -> None:
    spec = parsed(document)
    if spec is not None:
        assert_round_trips(spec)


@PROPERTY
@given(st.one_of(st.text(), st.builds(yaml.safe_dump, mutated()),
                 st.from_regex(r"\A([a-z_]{1,8}: [^\n]{0,20}\n){1,6}\Z")))
def test_any_text_is_read_as_specs_or_refused(text: str) -> None:
    try:
        loaded = parse_yaml(text, "apply.yaml", source_roots=[ROOT])
    except InvalidSpec as exc:
        event("refused")
        assert exc.problems and all(p.path.startswith("apply.yaml") for p in exc.problems), exc
        return
    event(f"{len(loaded)} specs")
    for item in loaded:
        assert_round_trips(item.spec)


def document_fields(model: type[BaseModel] = AssetSpec, prefix: str = "") -> list[str]:
    """Every field of a spec document below `model`, as a dotted path (YAML names)."""
    found = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{info.alias or name}"
        found.append(path)
        nested = [t for t in (info.annotation, *get_args(info.annotation))
                  if isinstance(t, type) and issubclass(t, BaseModel)]
        if nested:
            found += document_fields(nested[0], f"{path}.")
    return found


@pytest.mark.parametrize("path", document_fields())
@settings(PROPERTY, max_examples=30)
@given(st.data())
def test_any_value_of_a_document_field_parses_and_round_trips_or_is_refused(
    path: str, data: st.DataObject
) -> None:
    document = copy.deepcopy(data.draw(st.sampled_from(VALID)))
    *parents, name = path.split(".")
    owner = document
    for parent in parents:
        if not isinstance(owner.get(parent), dict):
            owner[parent] = {}
        owner = owner[parent]
    owner[name] = data.draw(st.one_of(like(owner.get(name, "")), numbers, values))
    spec = parsed(document)
    if spec is not None:
        assert_round_trips(spec)


def deep(levels: int) -> Any:
    """A list nested `levels` deep."""
    nested: list[Any] = []
    for _ in range(levels):
        nested = [nested]
    return nested


@pytest.mark.parametrize("field", ["labels", "source", "interface", "aliases", "display_name"])
def test_deep_nesting_is_refused_naming_the_field(field: str) -> None:
    with pytest.raises(InvalidSpec) as refused:
        parse_spec({**BASE, field: deep(100_000)})
    assert refused.value.problems[0].path.startswith(field)


@pytest.mark.parametrize("text", ["[" * 5_000 + "]" * 5_000, "{a: " * 5_000 + "1" + "}" * 5_000])
def test_deeply_nested_yaml_is_refused(text: str) -> None:
    with pytest.raises(InvalidSpec):
        parse_yaml(text, "apply.yaml")


@pytest.mark.parametrize(("change", "field"), [
    ({"resources": {"min_vram_gb": math.inf}}, "resources.min_vram_gb"),
    ({"resources": {"disk_gb": math.nan}}, "resources.disk_gb"),
    ({"resources": {"min_vram_gb": 10**400}}, "resources.min_vram_gb"),
    ({"resources": {"memory_mb": 2**31}}, "resources.memory_mb"),
    ({"generation": {"max_tokens": 2**40}}, "generation.max_tokens"),
    ({"metadata": {"context_length": 2**63}}, "metadata.context_length"),
    ({"lifecycle": {"auto_sleep_min": 2**31}}, "lifecycle.auto_sleep_min"),
    ({"display_name": "a\x00b"}, "display_name"),
    ({"labels": {"team": "\x00"}}, "labels.team"),
    ({"source": {"kind": "pypi", "package": "p", "revision": "\ud800"}}, "source.revision"),
])
def test_what_the_wire_or_json_cannot_carry_is_refused_naming_the_field(change: dict, field: str) -> None:
    with pytest.raises(InvalidSpec) as refused:
        parse_spec({**BASE, **change})
    assert [p.path for p in refused.value.problems] == [field]


int32s = st.one_of(st.sampled_from([0, -1, 2**31 - 1, -(2**31)]), st.integers(-(2**31), 2**31 - 1))
doubles = st.one_of(st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324]), st.floats())
enums = st.integers(-3, 9)
wire_text = st.one_of(st.text(max_size=12), st.sampled_from(
    [s for s in ODD_STRINGS if not any("\ud800" <= c <= "\udfff" for c in s)]))
"""Text a message can carry: any but lone surrogates, which protobuf cannot encode."""
WIRE_VALUES: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_STRING: wire_text, FieldDescriptor.TYPE_DOUBLE: doubles,
    FieldDescriptor.TYPE_INT32: int32s, FieldDescriptor.TYPE_ENUM: enums,
    FieldDescriptor.TYPE_BOOL: st.booleans(),
}


SUB_MESSAGES = tuple(f.name for f in asset_pb2.AssetSpec.DESCRIPTOR.fields
                     if f.message_type is not None and not f.message_type.GetOptions().map_entry)


def message_fields(descriptor: Descriptor = asset_pb2.AssetSpec.DESCRIPTOR, prefix: str = "",
                   skip: tuple[str, ...] = ("route",)) -> list[str]:
    """Every field of an `AssetSpec` message below `descriptor` a client sets, as a dotted path
    (a repeated message field as one path: its entries are drawn whole). `skip`: fields left
    out (a model's message carries no route)."""
    found = []
    for field in descriptor.fields:
        path = f"{prefix}{field.name}"
        entry = field.message_type
        if path in skip:
            continue
        if entry is not None and not entry.GetOptions().map_entry and not field.is_repeated:
            found += message_fields(entry, f"{path}.", skip)
        else:
            found.append(path)
    return found


def set_field(message: Message, path: str, draw: Callable[[st.SearchStrategy[Any]], Any]) -> None:
    """Set the field at `path` to any value its wire type holds (lists and maps included)."""
    *parents, name = path.split(".")
    owner = message
    for parent in parents:
        owner = getattr(owner, parent)
    field = owner.DESCRIPTOR.fields_by_name[name]
    if field.message_type is not None and field.is_repeated and not field.message_type.GetOptions().map_entry:
        del getattr(owner, name)[:]  # entries of a repeated message (a route's targets)
        for _ in range(draw(st.integers(0, 3))):
            entry = getattr(owner, name).add()
            for sub in entry.DESCRIPTOR.fields:
                if draw(st.booleans()):
                    set_field(entry, sub.name, draw)
    elif field.message_type is not None:  # a map of text to text (labels)
        getattr(owner, name).clear()
        getattr(owner, name).update(draw(st.dictionaries(wire_text, wire_text, max_size=3)))
    elif field.is_repeated:
        del getattr(owner, name)[:]
        getattr(owner, name).extend(draw(st.lists(WIRE_VALUES[field.type], max_size=3)))
    else:
        setattr(owner, name, draw(WIRE_VALUES[field.type]))


@pytest.mark.parametrize("path", message_fields())
@settings(PROPERTY, max_examples=30)
@given(st.data())
def test_any_value_of_a_message_field_is_a_spec_or_refused_by_field(path: str, data: st.DataObject) -> None:
    message = spec_to_proto(parse_spec(data.draw(st.sampled_from(VALID)), source_roots=[ROOT]))
    set_field(message, path, data.draw)
    if data.draw(st.booleans()):
        message.ClearField(data.draw(st.sampled_from(SUB_MESSAGES)))
    try:
        spec = spec_from_proto(message, source_roots=[ROOT])
    except InvalidSpec as exc:
        assert exc.problems and all(p.path and p.reason for p in exc.problems), exc
        return
    assert_round_trips(spec)


ROUTE = {"asset_id": "chat", "class": "route", "interface": "llm-runtime",
         "targets": [{"asset": "a", "weight": 90}, {"asset": "b", "weight": 10}], "sticky": "user",
         "shadow": [{"asset": "c", "sample": 0.2}], "fallback": ["d"],
         "cache": {"ttl_s": 600, "scope": "shared"}, "aliases": ["default-chat"]}


def assert_route_round_trips(route: RouteSpec) -> None:
    """The route is written back and read again unchanged: as a document, as YAML, on the wire
    and as the `Asset` a client is handed."""
    document = route.to_document()
    assert json.loads(json.dumps(document, allow_nan=False)) == document
    assert parse_route(document).to_document() == document
    [loaded] = parse_yaml(yaml.safe_dump(document), "route.yaml")
    assert loaded.spec.to_document() == document
    wire = asset_pb2.AssetSpec.FromString(declared_to_proto(route).SerializeToString())
    assert declared_from_proto(wire).to_document() == document
    now = datetime.now(UTC)
    stored = asset_pb2.Asset.FromString(stored_to_proto(RouteRecord(route, 1, now, now)).SerializeToString())
    assert stored_from_proto(stored).spec.to_document() == document


@pytest.mark.parametrize("path", ["asset_id", "display_name", "interfaces", "aliases", "labels",
                                  *message_fields(asset_pb2.Route.DESCRIPTOR, "route.", ())])
@settings(PROPERTY, max_examples=30)
@given(st.data())
def test_any_value_of_a_route_field_is_a_route_or_refused_by_field(path: str, data: st.DataObject) -> None:
    message = declared_to_proto(parse_route(ROUTE))
    set_field(message, path, data.draw)
    try:
        route = declared_from_proto(message)
    except InvalidSpec as exc:
        assert exc.problems and all(p.path and p.reason for p in exc.problems), exc
        return
    assert isinstance(route, RouteSpec)
    assert_route_round_trips(route)
